"""Collation: turn block-id pairs into few large byte regions.

With the block-major layout a block's K/V for every layer is one contiguous region, and a run
of consecutive block ids is one larger region. A transfer pairs the i-th source block with the
i-th destination block, so a region ends where either side stops being consecutive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Region(NamedTuple):
    src_offset: int  # bytes from the start of the source KV tensor
    dst_offset: int  # bytes from the start of the destination KV tensor
    nbytes: int


def collate(
    src_blocks: Sequence[int], dst_blocks: Sequence[int], bytes_per_block: int
) -> list[Region]:
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(
            f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks"
        )
    regions: list[Region] = []
    run_src = run_dst = run_len = 0
    for s, d in zip(src_blocks, dst_blocks, strict=True):
        if run_len and s == run_src + run_len and d == run_dst + run_len:
            run_len += 1
            continue
        if run_len:
            regions.append(
                Region(
                    run_src * bytes_per_block, run_dst * bytes_per_block, run_len * bytes_per_block
                )
            )
        run_src, run_dst, run_len = s, d, 1
    if run_len:
        regions.append(
            Region(run_src * bytes_per_block, run_dst * bytes_per_block, run_len * bytes_per_block)
        )
    return regions


def per_page(
    src_blocks: Sequence[int], dst_blocks: Sequence[int], bytes_per_block: int, num_layers: int
) -> list[Region]:
    """The uncollated baseline, as a per-layer paged layout forces: one region per block per
    layer. Used only by the benchmark to show what collation buys."""
    per_layer = bytes_per_block // num_layers
    return [
        Region(
            s * bytes_per_block + layer * per_layer,
            d * bytes_per_block + layer * per_layer,
            per_layer,
        )
        for s, d in zip(src_blocks, dst_blocks, strict=True)
        for layer in range(num_layers)
    ]
