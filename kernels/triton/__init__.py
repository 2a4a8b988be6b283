"""Triton kernels for CUDA devices, one file per kernel. Importing this package imports
triton: only code that has checked for CUDA and Triton (`kernels.capabilities`) imports it.

`install()` routes `kernels.ops` (RMSNorm with fused residual add, SiLU·mul, the one-row fused
linear, the sampler's row argmax) to these kernels for CUDA tensors; tensors on other devices
still take the torch references, so a CPU model in the same process is unaffected. One-token
batches (decode at batch 1) run the model's linears fused with their norms / SiLU / residual
adds (`kernels/triton/gemv.py`); PDSERVE_FUSED_GEMV=0 turns that off. Decode batches of the
row counts that `kernels/triton/skinny_plan.py` tuned at start-up run the same fused layer
path with a separate RMSNorm kernel and, per linear, the skinny GEMM with its epilogue fused
(SiLU·mul, residual add) or cuBLAS, whichever the tuning timed faster.
"""

from __future__ import annotations

import torch

from kernels import ops
from kernels.capabilities import fused_gemv_enabled
from kernels.triton.argmax import argmax as _argmax
from kernels.triton.gemv import gemv as _gemv
from kernels.triton.rms_norm import add_rms_norm as _add_rms_norm
from kernels.triton.rms_norm import rms_norm as _rms_norm
from kernels.triton.silu_mul import silu_and_mul as _silu_and_mul
from kernels.triton.skinny_gemm import skinny_linear as _skinny_linear
from kernels.triton.skinny_plan import cublas_path as _cublas_path
from kernels.triton.skinny_plan import lookup as _skinny_lookup
from kernels.triton.skinny_plan import planned_rows as _skinny_rows


def _rms_norm_dispatch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda and x.dim() == 2:
        return _rms_norm(x, weight, eps)
    return ops.rms_norm_ref(x, weight, eps)


def _add_rms_norm_dispatch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda and x.dim() == 2:
        return _add_rms_norm(x, residual, weight, eps)
    return ops.add_rms_norm_ref(x, residual, weight, eps)


def _silu_and_mul_dispatch(gate_up: torch.Tensor, norm_of: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    if gate_up.is_cuda and gate_up.dim() == 2:
        return _silu_and_mul(gate_up, norm_of, eps)
    return ops.silu_and_mul_ref(gate_up, norm_of, eps)


def _argmax_dispatch(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] > 0:
        return _argmax(x)
    return ops.argmax_ref(x)


def one_cuda_row(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dim() == 2 and x.shape[0] == 1


def _multi_row_fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias=None, *, norm_weight=None, eps: float = 0.0,
    silu_mul: bool = False, residual: torch.Tensor | None = None, out_dtype=None,
) -> torch.Tensor:
    """`ops.fused_linear` for several CUDA rows: the norm as its own kernel, then the skinny
    GEMM with its epilogue where the plan picked it, else cuBLAS and the SiLU·mul / add kernels
    (the roundings of `ops.fused_linear_ref` either way)."""
    if norm_weight is not None:
        x = _rms_norm(x, norm_weight, eps)
    cfg = None
    if bias is None and x.stride(1) == 1 and weight.stride(1) == 1:
        cfg = _skinny_lookup(x.shape[0], weight, silu_mul, residual is not None)
    if cfg is not None:
        y = _skinny_linear(x, weight, silu_mul=silu_mul, residual=residual, config=cfg)
    else:
        y = _cublas_path(x, weight, bias, silu_mul, residual)
    return y if out_dtype is None else y.to(out_dtype)


def _fused_linear_dispatch(x: torch.Tensor, weight: torch.Tensor, bias=None, **fused) -> torch.Tensor:
    if one_cuda_row(x):
        return _gemv(x, weight, bias, **fused)
    if x.is_cuda and x.dim() == 2:
        return _multi_row_fused_linear(x, weight, bias, **fused)
    return ops.fused_linear_ref(x, weight, bias, **fused)


def _fused_layer_rows(gemv: bool):
    """`ops.fuses_linears`: one CUDA row when the fused GEMVs are on, or a row count that the
    skinny plan covers."""

    def fuses(x: torch.Tensor) -> bool:
        if not (x.is_cuda and x.dim() == 2):
            return False
        return gemv if x.shape[0] == 1 else x.shape[0] in _skinny_rows()

    return fuses


def install() -> None:
    """Make `kernels.ops` use the Triton kernels for CUDA tensors (idempotent)."""
    ops.set_impl(
        rms_norm=_rms_norm_dispatch,
        add_rms_norm=_add_rms_norm_dispatch,
        silu_and_mul=_silu_and_mul_dispatch,
        fused_linear=_fused_linear_dispatch,
        fuses_linears=_fused_layer_rows(fused_gemv_enabled()),
        argmax=_argmax_dispatch,
    )


def uninstall() -> None:
    """Back to the torch references (tests use this to compare both paths in one process)."""
    ops.set_impl(rms_norm=ops.rms_norm_ref, add_rms_norm=ops.add_rms_norm_ref,
                 silu_and_mul=ops.silu_and_mul_ref, fused_linear=ops.fused_linear_ref,
                 fuses_linears=ops.never, argmax=ops.argmax_ref)
