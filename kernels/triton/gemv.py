"""One-row linear layers with their neighbours fused in: the batch-1 decode GEMV.

At one row a linear layer streams its weight once and does almost no arithmetic, and the ops
around it (RMSNorm before qkv and gate|up, SiLU·mul before down, the residual add after o and
down) are tiny kernels whose launches and round trips cost as much as they compute. Here one
kernel does

    y = linear(pre(x), W, bias) [+ residual]     pre = RMSNorm(x) * w_norm | SiLU(gate) * up | x

with the same roundings as the unfused torch references (`kernels.ops.fused_linear_ref`): the
normed row is rounded to the input dtype before the weight multiply, SiLU is rounded before
the multiply by up, y is rounded before the residual add. A decode layer becomes four GEMVs,
the rope/store kernel and attention, with no norm, SiLU or split-K reduction kernels between.

Each program owns BLOCK_N weight rows and walks K in BLOCK_K slices, statically unrolled so
many 16-byte loads are in flight per thread, accumulating a [BLOCK_N, BLOCK_K] float32 tile that
is reduced once at the end: no split-K, no second kernel, deterministic. The prologue is
recomputed by every program from the activation row, which stays in L2 (8-57 KB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NONE, RMSNORM, SILU_MUL = 0, 1, 2


@triton.jit
def _gemv_kernel(
    X, W, Y, B, NW, R,
    N, stride_wn, eps,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = W + rn.to(tl.int64)[:, None] * stride_wn
    NUM_K: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    dt = Y.dtype.element_ty
    rstd = 0.0
    if PROLOGUE == 1:
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in tl.static_range(NUM_K):
            rk = i * BLOCK_K + tl.arange(0, BLOCK_K)
            xs = tl.load(X + rk, mask=rk < K, other=0.0).to(tl.float32)
            ss += xs * xs
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(NUM_K):
        rk = i * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        if EVEN_K:
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None], other=0.0)
        else:
            w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if PROLOGUE == 1:
            xs = tl.load(X + rk, mask=k_ok, other=0.0).to(tl.float32)
            g = tl.load(NW + rk, mask=k_ok, other=0.0).to(tl.float32)
            xs = ((xs * rstd).to(dt).to(tl.float32) * g).to(dt).to(tl.float32)
        elif PROLOGUE == 2:
            gate = tl.load(X + rk, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(X + K + rk, mask=k_ok, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
            xs = (silu * up).to(dt).to(tl.float32)
        else:
            xs = tl.load(X + rk, mask=k_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * xs[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        y = y.to(dt).to(tl.float32) + tl.load(R + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + rn, y.to(dt), mask=n_ok)


# (BLOCK_N, BLOCK_K, num_warps) per (N, K, prologue), measured on an H200 with
# benchmarks/bench_gemv.py (2026-12-02-gemv.md); shapes not listed take DEFAULT_CONFIG.
CONFIGS: dict[tuple[int, int, int], tuple[int, int, int]] = {}
DEFAULT_CONFIG = (8, 512, 4)


def config_for(n: int, k: int, prologue: int) -> tuple[int, int, int]:
    bn, bk, warps = CONFIGS.get((n, k, prologue), DEFAULT_CONFIG)
    return bn, min(bk, triton.next_power_of_2(k)), warps


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    silu: bool = False,
    residual: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """One row: x [1, K] (or [1, 2K] with `silu`: gate | up) -> [1, N] in x's dtype.

    norm_weight: RMSNorm x first (eps); silu: SiLU(gate) * up first; bias: added in float32
    before the one rounding (as F.linear); residual [1, N]: added after it. config =
    (BLOCK_N, BLOCK_K, num_warps), default from CONFIGS."""
    n, k = weight.shape
    if norm_weight is not None and silu:
        raise ValueError("gemv takes one prologue: norm_weight or silu, not both")
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != (2 * k if silu else k):
        raise ValueError(f"gemv takes one row [1, {2 * k if silu else k}], got {tuple(x.shape)}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gemv needs unit stride along K")
    if residual is not None and (residual.shape != (1, n) or residual.stride(1) != 1):
        raise ValueError(f"residual must be [1, {n}] with unit stride, got {tuple(residual.shape)}")
    prologue = RMSNORM if norm_weight is not None else SILU_MUL if silu else NONE
    bn, bk, warps = config or config_for(n, k, prologue)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, weight, y,
        bias if bias is not None else y, norm_weight if norm_weight is not None else y,
        residual if residual is not None else y,
        n, weight.stride(0), eps,
        K=k, BLOCK_N=bn, BLOCK_K=bk, PROLOGUE=prologue,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, num_warps=warps,
    )  # fmt: skip
    return y
