"""Dequantize GGUF tensors to float32 with torch: the legacy block formats the embedded model
uses (Q4_0, Q4_1, Q8_0) in a few vectorized ops, anything else through `gguf.quants`.

gguf's numpy path splits each tensor into row groups and runs ~10 numpy ops per group: 1.7 s
for the embedded SmolLM2 (210 Q4_1 tensors) on the 2-core CI machine, at every worker start.
Same arithmetic here (scale and minimum widened from fp16, `d * q` then `+ m` in float32), so
the results are bit-identical (tests/test_gguf_file.py).
"""

from __future__ import annotations

import numpy as np
import torch

# block layouts: bytes of fp16 scale (+ fp16 minimum) then the packed quants, 32 values a block
_BLOCK = 32


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """[n, 1] float32 from the fp16 stored at byte `start` of each block."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] packed bytes -> [n, 32] values 0..15: low nibbles are elements 0-15, high 16-31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def dequantize(data: np.ndarray, qtype) -> torch.Tensor:
    """A GGUF tensor's `data` (as gguf_file / GGUFReader give it) -> float32, numpy shape."""
    name = qtype.name
    if name == "F32":
        return torch.from_numpy(np.array(data, dtype=np.float32))
    if name == "F16":
        return torch.from_numpy(np.array(data)).float()
    if name not in ("Q4_0", "Q4_1", "Q8_0"):
        from gguf.quants import dequantize as gguf_dequantize

        return torch.from_numpy(np.array(gguf_dequantize(data, qtype), dtype=np.float32))
    rows_shape = data.shape[:-1]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8))  # a writable copy of the bytes
    if name == "Q8_0":
        blocks = raw.view(-1, 2 + _BLOCK)
        out = blocks[:, 2:].view(torch.int8).float() * _halves(blocks, 0)
    elif name == "Q4_0":
        blocks = raw.view(-1, 2 + _BLOCK // 2)
        q = (_nibbles(blocks[:, 2:]).view(torch.int8) - 8).float()
        out = _halves(blocks, 0) * q
    else:  # Q4_1
        blocks = raw.view(-1, 4 + _BLOCK // 2)
        out = _halves(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _halves(blocks, 2)
    return out.view(*rows_shape, -1)
