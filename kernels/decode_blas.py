"""Which cuBLAS front end each decode CUDA graph captures its GEMMs with: PyTorch's default
(cuBLAS) or cuBLASLt (`torch.backends.cuda.preferred_blas_library`), picked per batch size at
engine start by timing the GEMMs that graph runs on cuBLAS, on the model's own weights.

Why: the two pick different kernels for the same skinny shapes. On an H100 the down
projection (4096 x 14336) at 64 / 128 rows took 47.2 / 51.8 us through cuBLAS (a split-K
kernel plus its reduce) and 43.4 / 44.8 us through cuBLASLt, while qkv, o, gate|up and 256-row
shapes tied or went the other way by up to 3%. Timing both on the device decides each batch
size on the whole graph's GEMMs, on the device and model at hand.

What is timed at `rows` rows: the linears that the decode graph of that size runs on cuBLAS:
lm_head and qkv always; o, gate|up and down unless the skinny plan (kernels/triton/skinny_plan.py,
tuned first) runs them; nothing at one row on the fused GEMV path. Each as a CUDA graph of one
call per layer's weight (no L2 reuse). A size takes cuBLASLt only if the sum wins by `MIN_GAIN`.
The preference is process-wide state that a GEMM reads when it is launched, so it is set only
around a graph's warm-up and capture (`preferred`); everything else runs on the default.

Opt-in (`kernels.capabilities.decode_blas_enabled`, PDSERVE_DECODE_BLAS=1) until an engine run
on a GPU has measured it end to end; tests/test_gpu_decode_blas.py checks the mechanism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

MIN_GAIN = 1.02
LT = "cublaslt"

_PLAN: dict[int, str] = {}


def library_for(rows: int) -> str | None:
    """The front end planned for the decode graph of `rows` rows, or None: the default."""
    return _PLAN.get(rows)


def set_plan(plan: dict[int, str]) -> None:
    _PLAN.clear()
    _PLAN.update(plan)


@contextlib.contextmanager
def preferred(library: str | None) -> Iterator[None]:
    """GEMMs launched inside run through `library` ("cublas" / "cublaslt"; None: unchanged)."""
    if library is None:
        yield
        return
    backends = torch.backends.cuda
    before = backends.preferred_blas_library()
    backends.preferred_blas_library(library)
    try:
        yield
    finally:
        backends.preferred_blas_library(before)


def cublas_linears(model: torch.nn.Module, rows: int) -> dict[str, list[torch.Tensor]]:
    """name -> the weights (one per layer) that the decode graph of `rows` rows multiplies on
    cuBLAS, as `LlamaForCausalLM.forward_logits` and `kernels.ops.fused_linear` route them."""
    from kernels import ops

    layers = list(model.layers)
    w0 = layers[0].qkv_proj.weight
    fused = ops.fuses_linears(torch.empty(rows, w0.shape[1], dtype=w0.dtype, device=w0.device))
    if fused and rows == 1:
        return {}  # one row: every linear is a fused GEMV
    out = {"lm_head": [model.lm_head.weight], "qkv": [m.qkv_proj.weight for m in layers]}
    for name, gated, res in (("o_proj", False, True), ("gate_up_proj", True, False), ("down_proj", False, True)):
        weights = [getattr(m, name).weight for m in layers]
        if not (fused and _skinny_runs(rows, weights[0], gated, res)):
            out[name] = weights
    return out


def _skinny_runs(rows: int, weight: torch.Tensor, gated: bool, residual: bool) -> bool:
    """Whether the skinny plan runs this linear at `rows` (only asked on the fused layer path,
    which exists only where the Triton ops are installed)."""
    from kernels.triton import skinny_plan

    return skinny_plan.lookup(rows, weight, gated, residual) is not None


@torch.inference_mode()
def tune(model: torch.nn.Module, rows: Iterable[int]) -> list[str]:
    """Time each decode graph size's cuBLAS GEMMs through cuBLAS and cuBLASLt, install the
    winners (`set_plan`) and return one line per size."""
    w0 = model.lm_head.weight
    if not w0.is_cuda:
        set_plan({})
        return []
    from kernels.triton.skinny_plan import (
        _graph_us,  # the skinny tuner's timing: one graph a linear
    )

    gen = torch.Generator(device=w0.device).manual_seed(0)
    plan, lines = {}, []
    for m in sorted(set(rows)):
        linears = cublas_linears(model, m)
        if not linears:
            continue
        totals = {}
        for lib in ("cublas", LT):
            with preferred(lib):
                us = 0.0
                for weights in linears.values():
                    x = torch.randn(m, weights[0].shape[1], generator=gen, device=w0.device).to(w0.dtype)
                    per_call = _graph_us(lambda i, x=x, weights=weights: F.linear(x, weights[i % len(weights)]),
                                         max(len(weights), 2))
                    us += per_call * len(weights)
                totals[lib] = us
        take = totals[LT] * MIN_GAIN < totals["cublas"]
        if take:
            plan[m] = LT
        lines.append(f"decode graph at {m} rows: {'cuBLASLt' if take else 'cuBLAS'} for "
                     f"{', '.join(linears)}: cuBLAS {totals['cublas']:.1f} us, cuBLASLt {totals[LT]:.1f} us "
                     "a step")
    set_plan(plan)
    torch.cuda.empty_cache()
    return lines
