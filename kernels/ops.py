"""Fused elementwise ops used by the model, with torch reference implementations.

The model calls these functions only; a device-specific implementation (Triton on CUDA) can be
installed with `set_impl(...)` at start-up. Each reference here is the ground truth the fast
versions are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> [T, H] in x's dtype; normalised in float32 as transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused into the norm."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def rms_factor_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> [T, 1] float32: each row's RMSNorm factor rsqrt(mean(x^2) + eps)."""
    xf = x.float()
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def silu_and_mul_ref(
    gate_up: torch.Tensor, norm_of: torch.Tensor | None = None, eps: float = 0.0
) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up, [T, I]. With `norm_of` [T, H] (the hidden rows that
    gate|up was projected from by a weight with the RMSNorm weight folded in), gate and up are
    first scaled by `rms_factor_ref(norm_of)` in float32; silu is rounded to gate_up's dtype
    before the product either way, as F.silu(gate) * up does."""
    gate, up = gate_up.chunk(2, dim=-1)
    if norm_of is None:
        return F.silu(gate) * up
    r = rms_factor_ref(norm_of, eps)
    g, u = gate.float() * r, up.float() * r
    return (F.silu(g).to(gate_up.dtype).float() * u).to(gate_up.dtype)


def fused_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A linear layer with its neighbours: act(linear(pre(x), weight, bias)) [+ residual], where
    pre is rms_norm(x) * norm_weight or nothing, act is silu(gate) * up over the output
    (weight = gate | up) or nothing; out_dtype: the result (in x's dtype) widened to it."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    y = F.linear(x, weight, bias)
    if silu_mul:
        y = silu_and_mul_ref(y)
    y = y if residual is None else y + residual
    return y if out_dtype is None else y.to(out_dtype)


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64, each row's first maximum (the sampler's greedy pick). On the CPU a
    bf16 / fp16 row is widened first: torch's CPU argmax over bf16 is ~3x slower than the cast
    plus a float32 argmax (16 x 49152 SmolLM2 logits, 2-core EPYC: 1.48 ms vs 0.4-0.74 ms),
    and widening is exact, so the pick is the same."""
    if x.device.type == "cpu" and x.dtype != torch.float32:
        x = x.float()
    return x.argmax(dim=-1)


rms_norm = rms_norm_ref
add_rms_norm = add_rms_norm_ref
argmax = argmax_ref
silu_and_mul = silu_and_mul_ref
fused_linear = fused_linear_ref


def never(x: torch.Tensor) -> bool:
    return False


# fuses_linears(hidden [T, H]) -> whether the model runs this batch's layers as fused linears
# (one kernel per linear, norms / SiLU / residual adds inside): installed with the fast
# implementation for the batches it serves (one token on CUDA).
fuses_linears = never


def set_impl(**impls) -> None:
    """Replace op implementations, e.g. `set_impl(rms_norm=triton_rms_norm)`."""
    g = globals()
    for name, fn in impls.items():
        if name not in ("rms_norm", "add_rms_norm", "silu_and_mul", "fused_linear", "fuses_linears", "argmax"):
            raise KeyError(f"unknown op {name!r}")
        g[name] = fn
