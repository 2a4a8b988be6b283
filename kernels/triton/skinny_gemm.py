"""Skinny linear layers (M <= 128 rows) with their epilogues fused: the decode-batch GEMM.

At decode batch 64 the 8B model's linears are still bound by streaming the weights, yet cuBLAS
ran them at 1.14-1.5x the weight-read time on the H200 (gate_up 62 vs 54.5 us, down 34 vs 27,
qkv 16.8 vs 11.7, o 11.7 vs 7.8; benchmarks/results/2026-12-02-gpu-llama8b-4.md) and the
SiLU·mul and residual adds around them are separate kernels. Here each program owns BLOCK_N
output columns for all M rows (padded to BLOCK_M for the tensor cores) and streams its weight
rows once over its K range in BLOCK_K slices (Triton pipelines the loads over `num_stages`):

    y = act(x @ W.T) [+ residual]        act = SiLU(gate) * up (W = gate | up) | identity

with the roundings of `kernels.ops.fused_linear_ref` (gate and up rounded, SiLU rounded before
the product, y rounded before the residual add).

Two knobs beyond the tile sizes (`SkinnyConfig`):
- swap: the tensor-core product is computed as W_tile @ x_tile.T (weight rows as the MMA's M
  dimension, the batch rows as its N) instead of x_tile @ W_tile.T. Hopper's wgmma wants 64
  rows in M; swapped, a batch of 16 or 32 rows is not padded to 64.
- split_k: the K range is cut into split_k slices, one program each, so that a weight of few
  output columns (o_proj: 4096) still keeps every SM streaming. Each slice stores its float32
  partial tile to a workspace and bumps the tile's counter; the program that arrives last sums
  the partials in slice order (deterministic: the same sum whatever the arrival order), runs
  the epilogue and resets the counter for the next launch (CUDA-graph replays included).
  One kernel: no separate reduction.

The counters are a per-device buffer shared by every launch: launches that overlap on
different streams must not both use split_k > 1 (the engine runs one forward at a time).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class SkinnyConfig(NamedTuple):
    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1
    swap: bool = False


@triton.jit
def _skinny_gemm_kernel(
    X, W, Y, R, WS, CNT,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_ym, stride_rm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SWAP: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    up_off = N * stride_wn
    if SWAP:  # acc [BLOCK_N, BLOCK_M] = W_tile @ x_tile.T
        w_ptr = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        x_ptr = X + rm.to(tl.int64)[None, :] * stride_xm + rk[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = (k0 + rk) < k_hi
            xt = tl.load(x_ptr + k0, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            w = tl.load(w_ptr + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(w, xt, acc)
            if GATED:
                w_up = tl.load(w_ptr + up_off + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc_up = tl.dot(w_up, xt, acc_up)
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    else:  # acc [BLOCK_M, BLOCK_N] = x_tile @ W_tile.T
        x_ptr = X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
        w_ptr = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = (k0 + rk) < k_hi
            x = tl.load(x_ptr + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            if GATED:
                w_up = tl.load(w_ptr + up_off + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc_up = tl.dot(x, tl.trans(w_up), acc_up)
    # acc, acc_up: [BLOCK_M, BLOCK_N] float32 partial sums over this program's K range
    if SPLIT_K > 1:
        # Workspace [SPLIT_K, n_tiles, (2 if GATED), BLOCK_M, BLOCK_N] float32, tile-major.
        PARTS: tl.constexpr = 2 if GATED else 1
        tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        n_tiles = tl.num_programs(0)
        TILE: tl.constexpr = BLOCK_M * BLOCK_N
        slot = WS + ((pid_k * n_tiles + pid_n) * PARTS) * TILE
        tl.store(slot + tile, acc)
        if GATED:
            tl.store(slot + TILE + tile, acc_up)
        # acq_rel: this program's partials are visible to whoever sees the bumped count.
        arrived = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):  # slice order: the same sum whoever arrives last
                part = WS + ((s * n_tiles + pid_n) * PARTS) * TILE
                acc += tl.load(part + tile, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(part + TILE + tile, cache_modifier=".cg")
            tl.store(CNT + pid_n, 0)
            _epilogue(acc, acc_up, X, Y, R, rm, rn, m_ok, n_ok, stride_ym, stride_rm, GATED, HAS_RES)
    else:
        _epilogue(acc, acc_up, X, Y, R, rm, rn, m_ok, n_ok, stride_ym, stride_rm, GATED, HAS_RES)


@triton.jit
def _epilogue(acc, acc_up, X, Y, R, rm, rn, m_ok, n_ok, stride_ym, stride_rm,
              GATED: tl.constexpr, HAS_RES: tl.constexpr):  # fmt: skip
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

# A first guess for weights of K 4096-14336 on Hopper; bench_skinny_gemm.py sweeps the rest.
DEFAULT_CONFIG = SkinnyConfig()

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tile counters, at least n; every split-K launch leaves them zero."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    config: SkinnyConfig | tuple | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 128) @ weight[N', K].T -> [M, N] in x's dtype; silu_mul: weight is
    gate | up (N' = 2N) and the output SiLU(gate) * up; residual [M, N]: added last.
    config: a SkinnyConfig (or its fields as a tuple), default DEFAULT_CONFIG."""
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
    cfg = SkinnyConfig(*config) if config is not None else DEFAULT_CONFIG
    block_m = max(16, triton.next_power_of_2(m))
    n_tiles = triton.cdiv(n, cfg.block_n)
    # Every slice gets a whole number of BLOCK_K steps; no slice is empty.
    k_per = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split > 1:
        parts = 2 if silu_mul else 1
        ws = torch.empty(split * n_tiles * parts * block_m * cfg.block_n, dtype=torch.float32, device=x.device)
        cnt = _counters(x.device, n_tiles)
    else:
        ws = cnt = y
    _skinny_gemm_kernel[(n_tiles, split)](
        x, weight, y, residual if residual is not None else y, ws, cnt,
        m, n, k, k_per,
        x.stride(0), weight.stride(0), y.stride(0), residual.stride(0) if residual is not None else 0,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, SWAP=cfg.swap,
        GATED=silu_mul, HAS_RES=residual is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
