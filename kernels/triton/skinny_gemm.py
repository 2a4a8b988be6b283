"""Skinny linear layers (M <= 128 rows) with their epilogues fused: the decode-batch GEMM.

At decode batch 64 the 8B model's linears are still bound by streaming the weights, yet cuBLAS
ran them at 1.14-1.5x the weight-read time on the H200 (gate_up 62 vs 54.5 us, down 34 vs 27,
qkv 16.8 vs 11.7, o 11.7 vs 7.8; benchmarks/results/2026-12-02-gpu-llama8b-4.md) and the
SiLU·mul and residual adds around them are separate kernels. Here each program owns BLOCK_N
output columns for all M rows (padded to BLOCK_M for the tensor cores) and streams its weight
rows once over K in BLOCK_K slices (Triton pipelines the loads over `num_stages`), with

    y = act(x @ W.T) [+ residual]        act = SiLU(gate) * up (W = gate | up) | identity

and the roundings of `kernels.ops.fused_linear_ref` (gate and up rounded, SiLU rounded before
the product, y rounded before the residual add). No split-K: deterministic, one kernel.

Not wired into the engine yet: benchmarks/bench_skinny_gemm.py measures it against cuBLAS per
shape first (the GPU budget of the session that wrote it was spent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _skinny_gemm_kernel(
    X, W, Y, R,
    M, N, K,
    stride_xm, stride_wn, stride_ym, stride_rm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptr = X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptr = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    up_ptr = w_ptr + N * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if GATED:
            w_up = tl.load(up_ptr + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up)
    dt = X.dtype.element_ty
    y = acc
    if GATED:
        gate = acc.to(dt).to(tl.float32)
        up = acc_up.to(dt).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        res = tl.load(R + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        y = y.to(dt).to(tl.float32) + res.to(tl.float32)
    tl.store(Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y.to(dt), mask=mask)


MAX_ROWS = 128

# (BLOCK_N, BLOCK_K, num_warps, num_stages): a first guess for weights of K 4096-14336 on
# Hopper, 64+ programs for N >= 2048; bench_skinny_gemm.py sweeps the alternatives.
DEFAULT_CONFIG = (32, 128, 4, 4)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 128) @ weight[N', K].T -> [M, N] in x's dtype; silu_mul: weight is
    gate | up (N' = 2N) and the output SiLU(gate) * up; residual [M, N]: added last.
    config = (BLOCK_N, BLOCK_K, num_warps, num_stages), default DEFAULT_CONFIG."""
    m, k = x.shape
    rows, kw = weight.shape
    if kw != k:
        raise ValueError(f"x has K={k}, weight has K={kw}")
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"skinny_linear takes 1..{MAX_ROWS} rows, got {m}")
    if silu_mul and rows % 2:
        raise ValueError("silu_mul takes an even number of weight rows (gate | up)")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny_linear needs unit stride along K")
    n = rows // 2 if silu_mul else rows
    if residual is not None and (tuple(residual.shape) != (m, n) or residual.stride(1) != 1):
        raise ValueError(f"residual must be [{m}, {n}] with unit stride, got {tuple(residual.shape)}")
    bn, bk, warps, stages = config or DEFAULT_CONFIG
    block_m = max(16, triton.next_power_of_2(m))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _skinny_gemm_kernel[(triton.cdiv(n, bn),)](
        x, weight, y, residual if residual is not None else y,
        m, n, k,
        x.stride(0), weight.stride(0), y.stride(0), residual.stride(0) if residual is not None else 0,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GATED=silu_mul, HAS_RES=residual is not None,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y
