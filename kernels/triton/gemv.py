"""One-row linear layers with their neighbours fused in: the batch-1 decode GEMV.

At one row a linear layer streams its weight once and does almost no arithmetic, and the ops
around it (RMSNorm before qkv and gate|up, SiLU·mul before down, the residual add after o and
down) are tiny kernels whose launches and round trips cost as much as they compute. Here one
kernel does

    y = act(linear(pre(x), W, bias)) [+ residual]
    pre = RMSNorm(x) * w_norm | x        act = SiLU(gate) * up (W = gate | up) | identity

with the same roundings as the unfused torch references (`kernels.ops.fused_linear_ref`): the
normed row is rounded to the input dtype before the weight multiply, gate and up are rounded,
SiLU is rounded before the multiply by up, y is rounded before the residual add. A decode
layer becomes four GEMVs (norm+qkv, o+residual, norm+gate|up+SiLU·mul, down+residual), the
rope/store kernel and attention, with no norm, SiLU or split-K reduction kernels between.

Each program owns BLOCK_N weight rows and walks K in BLOCK_K slices, statically unrolled so
many 16-byte loads are in flight per thread, accumulating a [BLOCK_N, BLOCK_K] float32 tile that
is reduced once at the end: no split-K, no second kernel, deterministic. The norm is
recomputed by every program from the activation row, which stays in L2 (8 KB at 4096).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.capabilities import pdl_choice


@triton.jit
def _gemv_kernel(
    X, W, Y, B, NW, R,
    N, stride_wn, eps,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    PDL: tl.constexpr,
):
    """N output columns; with GATED the weight has 2N rows (gate | up) and each program
    accumulates its gate rows and the matching up rows side by side.

    PDL (launched with programmatic dependent launch, sm90+, see `pdl_enabled`): the next
    kernel may be scheduled as soon as all of this one's programs run, and this one waits for
    the previous kernel's writes before reading anything. (Asking L2 for the program's weight
    slice before that wait measured slower: 1.13x on every GEMV of the 8B batch-1 decode graph,
    1.01x on o_proj alone, benchmarks/results/2026-12-02-gpu-llama8b-b1-7.md.)"""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = W + rn.to(tl.int64)[:, None] * stride_wn
    up_rows = w_rows + N * stride_wn
    NUM_K: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    dt = X.dtype.element_ty  # the roundings; Y may be wider (float32 logits)
    rstd = 0.0
    if NORM:
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in tl.static_range(NUM_K):
            rk = i * BLOCK_K + tl.arange(0, BLOCK_K)
            xs = tl.load(X + rk, mask=rk < K, other=0.0).to(tl.float32)
            ss += xs * xs
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(NUM_K):
        rk = i * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w_mask = n_ok[:, None] if EVEN_K else n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + rk[None, :], mask=w_mask, other=0.0)
        w_up = w
        if GATED:
            w_up = tl.load(up_rows + rk[None, :], mask=w_mask, other=0.0)
        xs = tl.load(X + rk, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            g = tl.load(NW + rk, mask=k_ok, other=0.0).to(tl.float32)
            xs = ((xs * rstd).to(dt).to(tl.float32) * g).to(dt).to(tl.float32)
        acc += w.to(tl.float32) * xs[None, :]
        if GATED:
            acc_up += w_up.to(tl.float32) * xs[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)
    if GATED:
        # gate and up rounded as the linear's output, SiLU rounded, then the product
        gate = y.to(dt).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(dt).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up
    if HAS_RES:
        y = y.to(dt).to(tl.float32) + tl.load(R + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + rn, y.to(dt).to(Y.dtype.element_ty), mask=n_ok)


# (BLOCK_N, BLOCK_K, num_warps) per (output columns, K), measured on an H200 with
# benchmarks/bench_gemv.py (2026-12-02-gemv.md: the 8B model's qkv, o, gate|up, down). Other
# shapes: 8192 weights a program (BLOCK_K up to 2048), 4 warps, the shape of the winners there.
CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (6144, 4096): (4, 2048, 4),
    (4096, 4096): (8, 1024, 4),
    (14336, 4096): (2, 2048, 4),  # gated: 2 gate + 2 up rows a program
    (4096, 14336): (2, 2048, 4),
}


def _pdl_default() -> bool:
    """Programmatic dependent launch for the one-row decode kernels (these GEMVs and the fused
    decode attention, kernels/triton/decode_attention.py) on the current device: the rule of
    `kernels.capabilities.pdl_choice` (sm90+, unless PDSERVE_PDL=0). In the batch-1 decode
    graph of the 8B model it measured 1.02x faster in three runs on two H200s
    (benchmarks/results/2026-12-02-gpu-llama8b-b1-2.md, -b1-4.md, -b1-5.md); an earlier
    variant that loaded its first weight tile before waiting measured 4% slower (-b1.md) and
    is gone."""
    if not torch.cuda.is_available():
        return False
    return pdl_choice(torch.device("cuda", torch.cuda.current_device())).name == "on"


USE_PDL: bool | None = None  # None: decided at the first launch (_pdl_default); benchmarks set it


def pdl_enabled() -> bool:
    """Whether the decode kernels launch with programmatic dependent launch (`_pdl_default`,
    unless a benchmark set USE_PDL)."""
    global USE_PDL
    if USE_PDL is None:
        USE_PDL = _pdl_default()
    return USE_PDL


def config_for(n: int, k: int, gated: bool) -> tuple[int, int, int]:
    if (n, k) in CONFIGS:
        return CONFIGS[n, k]
    bk = min(2048, triton.next_power_of_2(k))
    return max(1, 8192 // bk // (2 if gated else 1)), bk, 4


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """One row: x [1, K] -> [1, N] in x's dtype, N = weight rows (half of them with silu_mul).

    norm_weight: RMSNorm x first (eps); bias: added in float32 before the output's rounding
    (as F.linear); silu_mul: the weight is gate | up, the output SiLU(gate) * up; residual
    [1, N]: added last; out_dtype: the output, rounded to x's dtype first, is stored widened
    to it (float32 logits without a second kernel). config = (BLOCK_N, BLOCK_K, num_warps),
    default from CONFIGS."""
    rows, k = weight.shape
    n = rows // 2 if silu_mul else rows
    if silu_mul and (rows % 2 or bias is not None):
        raise ValueError("silu_mul takes an even number of weight rows (gate | up) and no bias")
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != k:
        raise ValueError(f"gemv takes one row [1, {k}], got {tuple(x.shape)}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gemv needs unit stride along K")
    if residual is not None and (tuple(residual.shape) != (1, n) or residual.stride(1) != 1):
        raise ValueError(f"residual must be [1, {n}] with unit stride, got {tuple(residual.shape)}")
    bn, bk, warps = config or config_for(n, k, silu_mul)
    pdl = x.is_cuda and pdl_enabled()
    y = torch.empty((1, n), dtype=out_dtype or x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, weight, y,
        bias if bias is not None else y, norm_weight if norm_weight is not None else y,
        residual if residual is not None else y,
        n, weight.stride(0), eps,
        K=k, BLOCK_N=bn, BLOCK_K=bk, NORM=norm_weight is not None, GATED=silu_mul,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, PDL=pdl, num_warps=warps,
        launch_pdl=pdl,
    )  # fmt: skip
    return y
