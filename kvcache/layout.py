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
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

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


# Decimal units follow SI, binary ones IEC (as Kubernetes does): "2G" is 2e9, "2GiB" 2**31.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "4GiB", "512MiB", "2G", "1e9", "1.5 GB" or 1073741824.

    Units are case-insensitive: K/M/G/T (optionally with B) are powers of 1000, Ki/Mi/Gi/Ti
    (optionally with B) powers of 1024. A fractional result is rounded down. Raises ValueError
    for anything else, including negative sizes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must be non-negative, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"size must be a string or int, got {text!r}")
    match = _SIZE_RE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "(B, K/KB, M/MB, G/GB, T/TB, KiB, MiB, GiB, TiB), e.g. '4GiB' or '1e9'"
        )
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:  # the regex should make this unreachable
        raise ValueError(f"invalid size {text!r}") from exc
    return int(number * unit)
