"""Stream-K skinny linear for Hopper: the decode batch's GEMM at 64-128 rows, TMA-fed.

At 128 rows cuBLAS runs a Llama-8B layer's linears at 1.19-1.71x their weight-read time on the
H100 (benchmarks/results/2026-12-06-skinny-gemm.md). Part of that is wave quantisation: 224
tiles of 128 weight rows on 132 SMs is 1.7 waves, 32 tiles of the down projection need a
split-K and a separate reduction. Here a fixed number of programs (about one per SM) split the
whole iteration space, (weight-row tile, K slice) flattened, evenly between them: every SM
streams the same number of weight bytes, whatever the shape (Osama et al., "Stream-K", 2023).

    y = act(x @ W.T) [+ residual]        act = SiLU(gate) * up (W = gate | up) | identity

with the roundings of `kernels.ops.fused_linear_ref` (as kernels/triton/skinny_gemm.py).

Each program walks its iterations tile by tile. A tile whose K range it covers whole gets the
epilogue at once; otherwise it stores its float32 partial tile to its own workspace slot
(slot 0: the first tile it touches, 1: the last) and bumps the tile's counter. The program
that arrives last sums every contributor's partial in program order (deterministic whatever
the arrival order), runs the epilogue and resets the counter for the next launch.

The weight and the activations are read through TMA descriptors (the weight tile is the
tensor-core product's M side, the batch rows its N side: W_tile @ x_tile.T), so the loads are
bulk copies that Triton pipelines `num_stages` deep.

The counters are a per-device buffer shared by every launch: launches that overlap on
different streams must not share it (the engine runs one forward at a time).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


class StreamKConfig(NamedTuple):
    block_n: int = 128  # weight rows a tile (a gated tile reads this many gate and up rows)
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4
    programs_per_sm: int = 1


@triton.jit
def _owner(it, TOTAL, P):
    """The program whose iteration range holds iteration `it` (range p: [p*T//P, (p+1)*T//P))."""
    return ((it + 1) * P - 1) // TOTAL


@triton.jit
def _streamk_kernel(
    w_desc, x_desc, Y, R, WS, CNT,
    M, N, TOTAL, K_ITERS, P,
    stride_ym, stride_rm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start = pid * TOTAL // P
    end = (pid + 1) * TOTAL // P
    PARTS: tl.constexpr = 2 if GATED else 1
    TILE: tl.constexpr = BLOCK_N * BLOCK_M
    tile_offs = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    it = start
    while it < end:
        tile = it // K_ITERS
        k_lo = it - tile * K_ITERS
        k_hi = k_lo + (end - it)
        if k_hi > K_ITERS:
            k_hi = K_ITERS
        row0 = tile * BLOCK_N
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for ki in range(k_lo, k_hi):
            kk = ki * BLOCK_K
            x = x_desc.load([0, kk])
            acc = tl.dot(w_desc.load([row0, kk]), x.T, acc)
            if GATED:
                acc_up = tl.dot(w_desc.load([N + row0, kk]), x.T, acc_up)
        rn = row0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if k_hi - k_lo == K_ITERS:
            _epilogue(acc, acc_up, Y, R, rm, rn, m_ok, n_ok, stride_ym, stride_rm, GATED, HAS_RES)
        else:
            seg = tl.where(it == start, 0, 1)
            slot = WS + ((pid * 2 + seg) * PARTS) * TILE
            tl.store(slot + tile_offs, acc)
            if GATED:
                tl.store(slot + TILE + tile_offs, acc_up)
            first = _owner(tile * K_ITERS, TOTAL, P)
            last = _owner(tile * K_ITERS + K_ITERS - 1, TOTAL, P)
            # acq_rel: this program's partial is visible to whoever sees the bumped count.
            arrived = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
            if arrived == last - first:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for q in range(first, last + 1):  # program order: the same sum every launch
                    q_seg = tl.where((q * TOTAL // P) // K_ITERS == tile, 0, 1)
                    part = WS + ((q * 2 + q_seg) * PARTS) * TILE
                    acc += tl.load(part + tile_offs, cache_modifier=".cg")
                    if GATED:
                        acc_up += tl.load(part + TILE + tile_offs, cache_modifier=".cg")
                tl.store(CNT + tile, 0)
                _epilogue(acc, acc_up, Y, R, rm, rn, m_ok, n_ok, stride_ym, stride_rm, GATED, HAS_RES)
        it += k_hi - k_lo


@triton.jit
def _epilogue(acc, acc_up, Y, R, rm, rn, m_ok, n_ok, stride_ym, stride_rm,
              GATED: tl.constexpr, HAS_RES: tl.constexpr):  # fmt: skip
    """acc, acc_up [BLOCK_N, BLOCK_M] (weight rows x batch rows) -> Y[rm, rn]."""
    dt = Y.dtype.element_ty
    y = acc
    if GATED:
        gate = acc.to(dt).to(tl.float32)
        up = acc_up.to(dt).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up
    mask = n_ok[:, None] & m_ok[None, :]
    offs = rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
    if HAS_RES:
        res = tl.load(R + rm.to(tl.int64)[None, :] * stride_rm + rn[:, None], mask=mask, other=0.0)
        y = y.to(dt).to(tl.float32) + res.to(tl.float32)
    tl.store(Y + offs, y.to(dt), mask=mask)


MAX_ROWS = 128
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_SMS: dict[torch.device, int] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tile counters, at least n; every launch leaves them zero."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter (CPU tests): a few programs, so tiles get split
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def streamk_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    config: StreamKConfig | tuple | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 128) @ weight[N', K].T -> [M, N] in x's dtype; silu_mul: weight is
    gate | up (N' = 2N) and the output SiLU(gate) * up; residual [M, N]: added last.
    programs: how many programs split the work (default: SMs x config.programs_per_sm)."""
    m, k = x.shape
    rows, kw = weight.shape
    cfg = StreamKConfig(*config) if config is not None else StreamKConfig()
    if kw != k:
        raise ValueError(f"x has K={k}, weight has K={kw}")
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"streamk_linear takes 1..{MAX_ROWS} rows, got {m}")
    if silu_mul and rows % 2:
        raise ValueError("silu_mul takes an even number of weight rows (gate | up)")
    if x.stride(1) != 1 or weight.stride(1) != 1 or k % cfg.block_k:
        raise ValueError(f"streamk_linear needs unit stride along K and K a multiple of {cfg.block_k}")
    n = rows // 2 if silu_mul else rows
    if residual is not None and (tuple(residual.shape) != (m, n) or residual.stride(1) != 1):
        raise ValueError(f"residual must be [{m}, {n}] with unit stride, got {tuple(residual.shape)}")
    block_m = max(16, triton.next_power_of_2(m))
    n_tiles = triton.cdiv(n, cfg.block_n)
    k_iters = k // cfg.block_k
    total = n_tiles * k_iters
    p = min(total, programs or _sm_count(x.device) * cfg.programs_per_sm)
    parts = 2 if silu_mul else 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws = torch.empty(p * 2 * parts * cfg.block_n * block_m, dtype=torch.float32, device=x.device)
    w_desc = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, cfg.block_k])
    _streamk_kernel[(p,)](
        w_desc, x_desc, y, residual if residual is not None else y, ws, _counters(x.device, n_tiles),
        m, n, total, k_iters, p,
        y.stride(0), residual.stride(0) if residual is not None else 0,
        BLOCK_N=cfg.block_n, BLOCK_M=block_m, BLOCK_K=cfg.block_k,
        GATED=silu_mul, HAS_RES=residual is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
