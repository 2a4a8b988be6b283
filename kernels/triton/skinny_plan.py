"""Which linears of a decode batch run on the skinny GEMM (kernels/triton/skinny_gemm.py), and
with which tile: picked per batch size at start-up by timing each candidate against the cuBLAS
path on the model's own weights, so the choice fits the device and the model at hand.

Why at start-up and not a table: the best tile moved with the batch size and the weight shape
on the H200 (benchmarks/results/2026-12-02-skinny-gemm*.md), cuBLAS won some shapes outright
(qkv at every batch measured, every shape at 128 rows), and other GPUs and models were never
measured. Timing both on the device decides each case on its merits and falls back to cuBLAS
wherever the skinny kernel does not win by `MIN_GAIN`.

What is tuned: the three linears the skinny kernel can fuse an epilogue into,
- o_proj + the residual add,
- gate|up + SiLU·mul (the RMSNorm before it stays a separate kernel),
- down_proj + the residual add;
qkv always takes cuBLAS (it lost to cuBLAS at 16-128 rows on the H200). Each candidate is timed
as a CUDA graph of one call per layer (the model's 32 different weights, as the decode graph
streams them: no L2 reuse), the cuBLAS side including its separate SiLU·mul / add kernels.

Where the model's RMSNorm weights are folded into qkv and gate|up (`DecoderLayer.fold_norms`),
decode batches off the fused layer path run `DecoderLayer._forward_folded`: no norm kernels,
the residual adds inside the o / down GEMMs (beta = 1), the norm factor inside SiLU·mul. For
those row counts (`folded_rows`) the fused path is timed with its two norm kernels and against
that block's linears. Only the rotate-and-store kernel's extra read of the hidden state for the
norm factor is left out (a [rows, hidden] read per layer, under 1 us at 64 rows of 4096).

The plan is process-wide (`kernels.ops.fuses_linears` asks it which row counts run the fused
layer path) and only covers the row counts tuned: the decode CUDA-graph buckets.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from triton.runtime.errors import OutOfResources

from kernels import blas_plan
from kernels.cuda_timing import graph_us
from kernels.triton.skinny_gemm import MAX_ROWS, SkinnyConfig, skinny_linear

# A skinny tile replaces cuBLAS only when it is at least this much faster (timing noise).
MIN_GAIN = 1.02
# Tried for each batch size; the fastest two per kind on the H200 sweeps (bench_skinny_gemm).
CANDIDATES: dict[str, tuple[SkinnyConfig, ...]] = {
    "residual": (SkinnyConfig(64, 128, 4, 4, 2, True), SkinnyConfig(64, 128, 4, 4, 1, True)),
    "gated": (SkinnyConfig(64, 128, 4, 4, 1, True), SkinnyConfig(128, 128, 4, 3, 1, True)),
}
MAX_TUNED_ROWS = 64  # 128 rows lost to cuBLAS on every shape (H200)

Key = tuple[int, int, int, bool, bool]  # rows, weight rows, K, gated, residual
_PLAN: dict[Key, SkinnyConfig] = {}
_ROWS: frozenset[int] = frozenset()


def lookup(m: int, weight: torch.Tensor, gated: bool, residual: bool) -> SkinnyConfig | None:
    """The tile planned for an [m, K] input times `weight`, or None: take cuBLAS."""
    return _PLAN.get((m, weight.shape[0], weight.shape[1], gated, residual))


def planned_rows() -> frozenset[int]:
    """Row counts for which at least one linear runs on the skinny kernel."""
    return _ROWS


def set_plan(plan: dict[Key, SkinnyConfig]) -> None:
    """Replace the plan (tests; `tune` calls it)."""
    global _ROWS
    _PLAN.clear()
    _PLAN.update(plan)
    _ROWS = frozenset(k[0] for k in plan)


def cublas_path(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gated: bool,
                residual: torch.Tensor | None) -> torch.Tensor:
    """What a linear runs where the plan keeps cuBLAS: the matmul (on the BLAS library
    `kernels.blas_plan` picked for it), then the SiLU·mul and residual-add kernels (the
    roundings of `kernels.ops.fused_linear_ref`)."""
    from kernels.triton.silu_mul import silu_and_mul

    y = blas_plan.linear(x, w, bias)
    if gated:
        y = silu_and_mul(y)
    return y if residual is None else y + residual


def _time_kind(x, weights, gated: bool, r, cfg: SkinnyConfig | None) -> float:
    """us per call of one linear over every layer's weight: cuBLAS path (cfg None) or skinny."""
    if cfg is None:
        return graph_us(lambda i: cublas_path(x, weights[i], None, gated, r), len(weights))
    return graph_us(lambda i: skinny_linear(x, weights[i], silu_mul=gated, residual=r, config=cfg),
                     len(weights))


def _time_folded(x, weights, gated: bool, r, eps: float) -> float:
    """us per call of one linear as `DecoderLayer._forward_folded` runs it: gate|up then SiLU·mul
    with x's rows' norm factors, o / down as an in-place GEMM into the residual."""
    from kernels.triton.silu_mul import silu_and_mul

    if gated:
        return graph_us(lambda i: silu_and_mul(blas_plan.linear(x, weights[i]), x, eps), len(weights))
    return graph_us(lambda i: blas_plan.linear_add_(r, x, weights[i]), len(weights))


def _time_norms(h, layers) -> float:
    """us per layer of the fused path's two RMSNorm kernels (before qkv and gate|up)."""
    from kernels.triton.rms_norm import rms_norm

    def norms(i: int) -> None:
        for norm in (layers[i].input_layernorm, layers[i].post_attention_layernorm):
            rms_norm(h, norm.weight, norm.eps)

    return graph_us(norms, len(layers))


@torch.inference_mode()
def tune(layers: Iterable[torch.nn.Module], rows: Iterable[int], folded_rows: Iterable[int] = ()) -> list[str]:
    """Time cuBLAS against the candidate tiles for each decode layer linear at each row count
    in `rows` (2..MAX_TUNED_ROWS; others are skipped), install the winners (`set_plan`) and
    return one line per row count saying what was picked and the times.

    A row count goes onto the fused layer path (`planned_rows`) only if its three linears
    there (each the faster of skinny and cuBLAS + a separate SiLU·mul / residual add kernel)
    beat the unfused path's (cuBLAS, the residual adds folded into the next norms): a lone
    winning tile need not pay for the add kernels the others then need. For row counts in
    `folded_rows` the other path is the folded block (module docstring): its linears are timed
    as it runs them, and the fused path's two norm kernels are counted, which it alone runs
    (the layers need `input_layernorm` / `post_attention_layernorm` then). Each skinny tile has
    already won its own linear by MIN_GAIN, so the layer needs no second margin: with one
    (H100, 64 rows, 146.5 vs 148.6 us) the unfused path was kept and the engine's batch-64
    step ran 9.44 ms against 9.36 ms on the fused path (2026-12-06-skinny-layer-margin.md)."""
    layers = list(layers)
    kinds = {
        "o": ([m.o_proj.weight for m in layers], False, True),
        "gate_up": ([m.gate_up_proj.weight for m in layers], True, False),
        "down": ([m.down_proj.weight for m in layers], False, True),
    }
    w0 = layers[0].o_proj.weight
    if w0.dtype not in (torch.bfloat16, torch.float16) or not w0.is_cuda:
        set_plan({})
        return [f"skinny GEMM: not tuned ({w0.dtype} on {w0.device.type})"]
    gen = torch.Generator(device=w0.device).manual_seed(0)
    folded_rows = frozenset(folded_rows)
    eps = layers[0].post_attention_layernorm.eps if folded_rows else 0.0
    plan: dict[Key, SkinnyConfig] = {}
    lines = []
    for m in sorted(set(rows)):
        if not 2 <= m <= min(MAX_TUNED_ROWS, MAX_ROWS):
            continue
        folded = m in folded_rows
        other = "folded" if folded else "unfused"
        parts, chosen = [], {}
        fused_us = unfused_us = 0.0
        if folded:
            h = torch.randn(m, w0.shape[0], generator=gen, device=w0.device).to(w0.dtype)
            norms_us = _time_norms(h, layers)
            fused_us += norms_us
            parts.append(f"norms {norms_us:.1f} us")
        for name, (weights, gated, res) in kinds.items():
            n_rows, k = weights[0].shape
            n = n_rows // 2 if gated else n_rows
            x = torch.randn(m, k, generator=gen, device=w0.device).to(w0.dtype)
            r = torch.randn(m, n, generator=gen, device=w0.device).to(w0.dtype) if res else None
            base = _time_kind(x, weights, gated, r, None)
            if folded:
                unfused_us += _time_folded(x, weights, gated, r, eps)
            else:
                # The unfused layer path adds the residual inside the next norm: no add kernel.
                unfused_us += _time_kind(x, weights, gated, None, None) if res else base
            best, best_us = None, base
            for cfg in CANDIDATES["gated" if gated else "residual"]:
                try:
                    us = _time_kind(x, weights, gated, r, cfg)
                except OutOfResources:  # the tile's pipeline does not fit this device's smem
                    continue
                if us * MIN_GAIN < best_us:
                    best, best_us = cfg, us
            fused_us += best_us
            if best is not None:
                chosen[(m, n_rows, k, gated, res)] = best
            parts.append(f"{name} {'cuBLAS' if best is None else 'skinny'} {best_us:.1f} us"
                         f" (cuBLAS {base:.1f})")
        # The row count takes the fused layer path only if it beats the other one as a whole.
        take = bool(chosen) and fused_us < unfused_us
        if take:
            plan.update(chosen)
        lines.append(f"skinny GEMM at {m} rows: {'fused' if take else other} layer path, "
                     f"{fused_us:.1f} vs {unfused_us:.1f} us {other}: " + ", ".join(parts))
    set_plan(plan)
    torch.cuda.empty_cache()  # the timing graphs' buffers: the KV cache was sized before this ran
    return lines
