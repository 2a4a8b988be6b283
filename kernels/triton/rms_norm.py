"""RMSNorm with the residual add fused in: one read of x (and residual), one write of the
normed output (and of the sum). Matches `kernels.ops.rms_norm_ref` / `add_rms_norm_ref`: the sum
is rounded to the input dtype, normalised in float32, rounded, then scaled by the weight."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    X,  # [T, H]
    R,  # [T, H] residual (read only when HAS_RES)
    W,  # [H]
    Y,  # [T, H] normed output
    S,  # [T, H] x + residual (written only when HAS_RES)
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    H,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(
            X.dtype.element_ty
        )
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs a unit stride along the hidden dimension")
    t, h = x.shape
    y = torch.empty((t, h), dtype=x.dtype, device=x.device)
    s = torch.empty((t, h), dtype=x.dtype, device=x.device) if residual is not None else y
    block = triton.next_power_of_2(h)
    if t:
        _rms_norm_kernel[(t,)](
            x, residual if residual is not None else x, weight, y, s,
            x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), s.stride(0),
            h, eps,
            HAS_RES=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 512)),
        )
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> rms_norm(x) * weight, [T, H] in x's dtype."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, H] -> (rms_norm(x + residual) * weight, x + residual), new tensors."""
    return _launch(x, residual, weight, eps)
