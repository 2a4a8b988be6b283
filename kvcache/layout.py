"""The paged KV tensor: its shape, its size, and how block ids map to memory.

One tensor per worker, block-major (the contract in `kernels/attention/base.py`):

    kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]   (2 = K, V)

- All layers of a block are one contiguous region of `bytes_per_block` bytes at offset
  `block_id * bytes_per_block`, so blocks [s, s + n) are one region of n * bytes_per_block
  bytes: a run of consecutive ids is one transfer (`contiguous_runs`, `run_byte_range`).
- `kv_cache[:, layer]` is FlashInfer's NHD paged layout
  [num_pages, 2, page_size, num_kv_heads, head_dim], a strided view (page stride
  num_layers * 2 * block_size * num_kv_heads * head_dim elements), never a copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCacheSpec.{name} must be a positive int, got {value!r}")

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def shape(self, num_blocks: int) -> tuple[int, int, int, int, int, int]:
        return (
            num_blocks,
            self.num_layers,
            2,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )


def num_blocks_for_budget(
    spec: KVCacheSpec, budget_bytes: int, max_model_len: int | None = None
) -> int:
    """How many blocks fit in `budget_bytes`. Raises ValueError if not even one block fits, or
    (given `max_model_len`) if one sequence of that length would not fit."""
    num_blocks = budget_bytes // spec.bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes is smaller than one block "
            f"({spec.bytes_per_block} bytes = {spec.block_size} tokens x "
            f"{spec.bytes_per_token} bytes/token); raise the KV cache memory budget"
        )
    if max_model_len is not None:
        needed = -(-max_model_len // spec.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"KV cache budget of {budget_bytes} bytes holds {num_blocks} blocks "
                f"({num_blocks * spec.block_size} tokens), but one sequence of max_model_len "
                f"{max_model_len} needs {needed} blocks ({needed * spec.bytes_per_block} "
                "bytes); raise the KV cache memory budget or lower max_model_len"
            )
    return num_blocks


def allocate_kv_cache(
    spec: KVCacheSpec, num_blocks: int, device: torch.device | str
) -> torch.Tensor:
    """The worker's KV tensor, zero-filled: attention never reads past a sequence's length,
    but zeros keep a masked-out garbage slot from turning into NaN (0 * NaN) in kernels that
    multiply by a mask instead of skipping."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
    shape = spec.shape(num_blocks)
    if torch.device(device).type == "cpu":
        # calloc'd (numpy zeros): the OS hands out zero pages as they are first touched, so a
        # 1 GiB CPU cache costs nothing at start-up (torch.zeros writes every page: ~1 s on
        # the 2-core CI machine, and the whole budget resident from the start).
        nbytes = math.prod(shape) * spec.dtype.itemsize
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(spec.dtype).view(shape)
    return torch.zeros(shape, dtype=spec.dtype, device=device)


def layer_view(kv_cache: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer`'s paged KV in FlashInfer NHD layout: [num_blocks, 2, block_size,
    num_kv_heads, head_dim]. A view: writes go to `kv_cache`."""
    return kv_cache[:, layer]


def contiguous_runs(block_ids: Iterable[int]) -> list[tuple[int, int]]:
    """Coalesce ids that follow each other (b, b + 1, ...) into (start, length) runs, keeping
    the given order (a transfer pairs the i-th local block with the i-th remote one, so the
    order is never sorted here). [3, 4, 5, 9, 2] -> [(3, 3), (9, 1), (2, 1)]."""
    runs: list[tuple[int, int]] = []
    for block_id in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs


def run_byte_range(spec: KVCacheSpec, start: int, length: int) -> tuple[int, int]:
    """(offset, nbytes) of blocks [start, start + length) within the KV tensor's storage."""
    return start * spec.bytes_per_block, length * spec.bytes_per_block
