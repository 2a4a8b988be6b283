"""Which BLAS library, cuBLAS or cuBLASLt, runs each decode linear: picked per (row count,
weight shape) at start-up by timing both on the model's own weights.

Why: torch sends a bf16 matmul to cuBLAS unless told otherwise, and the two libraries'
heuristics pick different kernels for the same small-M GEMM, neither winning every shape.
H100, Llama-3.1-8B shape (benchmarks/results/2026-12-06-gpu-llama8b-6.md / -7.md, one
machine): at 128 rows cuBLAS runs the down projection (128 x 14336 @ 14336 x 4096) as a split-K
kernel plus a reduce, 48.7 + 3.1 us, cuBLASLt as one 64x64-tile kernel, ~46.6 us; every matmul
on cuBLASLt took the batch-128 decode step from 12.88 to 12.59 ms but the batch-64 step from
9.33 to 9.42 ms. So each linear of each decode batch size is timed on both and keeps the
faster; the library that is not torch's current default must win by `MIN_GAIN`.

The plan is process-wide and covers the decode CUDA-graph row counts it was tuned for; any
other call (prefill GEMMs of hundreds of rows and up, CPU tensors) takes torch's default.
`plan_linears` swaps the model's `nn.Linear` modules for `PlannedLinear` (same parameters),
whose forward asks the plan. The switch is torch's process-wide preferred-library flag, set
around the one call and restored after it; torch logs a one-time "experimental feature"
warning the first time it is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# The library that is not torch's default replaces it only when at least this much faster.
MIN_GAIN = 1.02
LIBRARIES = ("cublas", "cublaslt")

Key = tuple[int, int, int]  # rows, weight rows (N), K
_PLAN: dict[Key, str] = {}


def lookup(rows: int, weight: torch.Tensor) -> str | None:
    """The library planned for an [rows, K] input times `weight` [N, K], or None: torch's
    default."""
    return _PLAN.get((rows, weight.shape[0], weight.shape[1]))


def set_plan(plan: dict[Key, str]) -> None:
    """Replace the plan (tests; `tune` calls it)."""
    for lib in plan.values():
        if lib not in LIBRARIES:
            raise ValueError(f"unknown BLAS library {lib!r}; expected one of {LIBRARIES}")
    _PLAN.clear()
    _PLAN.update(plan)


def default_library() -> str:
    """torch's preferred BLAS library now ("cublas" unless TORCH_BLAS_PREFER_CUBLASLT=1 or
    someone set it)."""
    return "cublaslt" if torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt else "cublas"


@contextmanager
def library(name: str) -> Iterator[None]:
    """Calls inside run on BLAS library `name`; torch's preference is restored after."""
    prev = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(prev)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on the library the plan picked for this shape (torch's default otherwise)."""
    lib = lookup(x.shape[0], weight) if _PLAN and x.dim() == 2 and x.is_cuda else None
    if lib is None:
        return F.linear(x, weight, bias)
    with library(lib):
        return F.linear(x, weight, bias)


def linear_add_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """residual += x @ weight.T as one GEMM (beta = 1: the add in its epilogue, rounded once),
    on the library the plan picked for this shape; returns `residual`. In place: out of place,
    torch first copies the residual into the output (a 1.6 us memcpy per call at 128 rows of
    4096 on an H100, two a layer)."""
    lib = lookup(x.shape[0], weight) if _PLAN and x.dim() == 2 and x.is_cuda else None
    if lib is None:
        return residual.addmm_(x, weight.t())
    with library(lib):
        return residual.addmm_(x, weight.t())


class PlannedLinear(nn.Module):
    """An `nn.Linear` whose matmul runs on the planned BLAS library. Holds the replaced
    module's own parameters (no copy; a weight tied to the embedding stays tied)."""

    def __init__(self, linear_module: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear_module.in_features
        self.out_features = linear_module.out_features
        self.weight = linear_module.weight
        self.bias = linear_module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def plan_linears(model: nn.Module) -> int:
    """Replace every CUDA `nn.Linear` under `model` with a `PlannedLinear`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.is_cuda:
                setattr(parent, name, PlannedLinear(child))
                count += 1
    return count


def _decode_linears(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Each decode linear's weights over the layers (the graphs stream 32 different ones: no
    L2 reuse between calls), plus lm_head."""
    layers = list(model.layers)
    return {
        "qkv": [m.qkv_proj.weight for m in layers],
        "o": [m.o_proj.weight for m in layers],
        "gate_up": [m.gate_up_proj.weight for m in layers],
        "down": [m.down_proj.weight for m in layers],
        "lm_head": [model.lm_head.weight],
    }


@torch.inference_mode()
def tune(model: nn.Module, rows: list[int]) -> list[str]:
    """Time both libraries for each decode linear of `model` (a LlamaForCausalLM on CUDA) at
    each row count in `rows`, install the winners (`set_plan`) and return one line per row
    count saying what was picked and the times."""
    from kernels.cuda_timing import graph_us

    linears = _decode_linears(model)
    w0 = linears["o"][0]
    if not w0.is_cuda or w0.dtype not in (torch.bfloat16, torch.float16):
        set_plan({})
        return [f"BLAS plan: not tuned ({w0.dtype} on {w0.device.type})"]
    # After fold_norms the o and down linears run as `linear_add_` (beta = 1) in the layers
    # that batches like these take (DecoderLayer._forward_folded): timed that way.
    adds = {"o", "down"} if getattr(model.layers[0], "norms_folded", False) else set()
    default = default_library()
    other = next(lib for lib in LIBRARIES if lib != default)
    gen = torch.Generator(device=w0.device).manual_seed(0)
    plan: dict[Key, str] = {}
    lines = []
    set_plan({})
    for m in sorted(set(rows)):
        parts = []
        for name, weights in linears.items():
            n, k = weights[0].shape
            x = torch.randn(m, k, generator=gen, device=w0.device).to(w0.dtype)
            r = torch.randn(m, n, generator=gen, device=w0.device).to(w0.dtype) if name in adds else None

            def run(i: int, x=x, r=r, weights=weights) -> torch.Tensor:
                return F.linear(x, weights[i]) if r is None else r.addmm_(x, weights[i].t())

            times = {}
            for lib in (default, other):
                with library(lib):
                    times[lib] = graph_us(run, len(weights))
            pick = other if times[other] * MIN_GAIN < times[default] else default
            if pick != default:
                plan[(m, n, k)] = pick
            parts.append(f"{name} {pick} ({default} {times[default]:.1f}, {other} {times[other]:.1f} us)")
        lines.append(f"BLAS plan at {m} rows: " + ", ".join(parts))
    set_plan(plan)
    torch.cuda.empty_cache()  # the timing graphs' buffers: the KV cache was sized before this ran
    return lines
