"""Row-wise argmax of a logits batch, for the sampler: x [N, V] float -> [N] int64, the first
index of each row's maximum, as `torch.argmax(x, dim=-1)`.

Why: torch's reduction takes 37 us for ONE row of Llama 3's 128256 logits on an H200 (one
thread block walks the row; benchmarks/results/2026-12-02-gpu-llama8b-b1-8.md, the step
timeline), ~1% of a 4 ms batch-1 token. Here the row is split over
programs that each read one BLOCK of it in a single memory round trip:

1. `_chunk_kernel`, grid (N, chunks): the maximum of the program's chunk and the first index
   holding it, to a float32 / int32 workspace;
2. `_finish_kernel`, grid (N,): the largest chunk maximum and, among the chunks holding it, the
   smallest index (chunks are in index order, so that is the row's first maximum).

NaN counts as larger than every number (torch's rule): a row with a NaN returns the first NaN,
unless a +inf comes before it (torch would still pick the NaN; logits never hold either).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements a program reads: 32 per thread at 4 warps, one round trip


@triton.jit
def _chunk_kernel(X, PartV, PartI, V, stride_x, CHUNKS, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    idx = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride_x + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN -> +inf
    m = tl.max(x, axis=0)
    first = tl.min(tl.where(x == m, idx, V), axis=0)
    tl.store(PartV + row * CHUNKS + chunk, m)
    tl.store(PartI + row * CHUNKS + chunk, first)


@triton.jit
def _finish_kernel(PartV, PartI, Out, V, CHUNKS, CHUNKS_P2: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_P2)
    ok = c < CHUNKS
    v = tl.load(PartV + row * CHUNKS + c, mask=ok, other=float("-inf"))
    i = tl.load(PartI + row * CHUNKS + c, mask=ok, other=V)
    m = tl.max(v, axis=0)
    # a row of -inf only: every chunk holds the maximum at its first index, the first is 0
    tl.store(Out + row, tl.min(tl.where(v == m, i, V), axis=0).to(tl.int64))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] (float16 / bfloat16 / float32, unit stride along V) -> [N] int64 on x's device."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"argmax takes [N, V] with unit stride along V, got {tuple(x.shape)}")
    n, v = x.shape
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0 or v == 0:
        if v == 0 and n:
            raise ValueError("argmax of an empty row")
        return out
    chunks = triton.cdiv(v, BLOCK)
    part_v = torch.empty((n, chunks), dtype=torch.float32, device=x.device)
    part_i = torch.empty((n, chunks), dtype=torch.int32, device=x.device)
    _chunk_kernel[(n, chunks)](x, part_v, part_i, v, x.stride(0), chunks, BLOCK=BLOCK, num_warps=4)
    _finish_kernel[(n,)](part_v, part_i, out, v, chunks, CHUNKS_P2=triton.next_power_of_2(chunks), num_warps=1)
    return out
