"""SiLU(gate) * up over the fused gate|up projection output: one read, one write.

With `norm_of` (the un-normalised hidden rows that gate|up was projected from, by a weight with
the RMSNorm weight folded in; see `DecoderLayer.fold_norms`) each row's gate and up are first
multiplied by its RMSNorm factor rsqrt(mean(row^2) + eps), in float32: the norm that would
otherwise be its own kernel before the projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(X, Y, Norm, stride_x, stride_y, stride_norm, inter, norm_dim, eps,
                     BLOCK: tl.constexpr, HAS_NORM: tl.constexpr, NORM_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        hcols = tl.arange(0, NORM_P2)
        h = tl.load(Norm + row * stride_norm + hcols, mask=hcols < norm_dim, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(h * h, axis=0) / norm_dim + eps)
        gate = gate * r
        up = up * r
    # silu rounded to the input dtype first, as F.silu(gate) * up does in that dtype.
    silu = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (silu * up).to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, norm_of: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up, [T, I] in gate_up's dtype; with `norm_of` [T, H], gate
    and up scaled by its rows' RMSNorm factors first (`kernels.ops.silu_and_mul_ref`)."""
    if gate_up.stride(-1) != 1:
        raise ValueError("silu_and_mul needs a unit stride along the last dimension")
    t, two_i = gate_up.shape
    if norm_of is not None and (norm_of.dim() != 2 or norm_of.shape[0] != t or norm_of.stride(-1) != 1):
        raise ValueError(f"norm_of must be [{t}, hidden] with unit innermost stride, got {tuple(norm_of.shape)}")
    inter = two_i // 2
    y = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(2048, triton.next_power_of_2(inter))
    if t:
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](
            gate_up, y, gate_up if norm_of is None else norm_of,
            gate_up.stride(0), y.stride(0), 0 if norm_of is None else norm_of.stride(0),
            inter, 1 if norm_of is None else norm_of.shape[1], eps,
            BLOCK=block, HAS_NORM=norm_of is not None,
            NORM_P2=1 if norm_of is None else triton.next_power_of_2(norm_of.shape[1]),
            num_warps=4,
        )
    return y
