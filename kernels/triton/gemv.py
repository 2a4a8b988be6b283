"""y = x @ W.T for a handful of rows (decode at small batch): a memory-bound GEMV in Triton.

NOT used by the model: measured against cuBLAS on an H200 it is slower on every 8B-model shape
(0.72-0.90x at one row, 0.35-0.47x at four; benchmarks/results/2026-12-01-gemv.md). It stays
as the baseline of that benchmark (benchmarks/bench_gemv.py) for a better kernel to beat.

At M = 1..4 a linear layer streams its weight once and does almost no arithmetic; cuBLAS picks
split-K GEMM kernels plus a reduction kernel there, which reach ~72% of the device's copy rate
on the 8B model's qkv and o projections (benchmarks/results/2026-11-22-gpu-llama8b-b1.md). Here
each program owns BLOCK_N output columns (weight rows) for all M rows, walks K in BLOCK_K
slices with fp32 accumulation, and writes its columns once: no split, no second kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_M = 4  # rows this kernel is meant for; more rows: a GEMM


@triton.jit
def _gemv_kernel(
    X, W, Y, M, N,
    stride_xm, stride_wn, stride_ym,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    w_ptr = W + rn.to(tl.int64)[:, None] * stride_wn
    x_ptr = X + rm[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_ptr + rk[None, :], mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptr + rk[None, :], mask=m_ok[:, None], other=0.0)
        else:
            k_ok = rk < K
            w = tl.load(w_ptr + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    y_ptr = Y + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemv(
    x: torch.Tensor, weight: torch.Tensor, block_n: int = 16, block_k: int = 256,
    num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_M, unit stride along K) @ weight [N, K].T -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_M or weight.shape[1] != k:
        raise ValueError(f"gemv takes [M <= {MAX_M}, K] @ [N, K].T, got {tuple(x.shape)} @ {tuple(weight.shape)}.T")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gemv needs unit stride along K")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, m, n, x.stride(0), weight.stride(0), y.stride(0),
        K=k, BLOCK_M=triton.next_power_of_2(max(m, 1)), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y
