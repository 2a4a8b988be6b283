"""SiLU(gate) * up over the fused gate|up projection output: one read, one write."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(X, Y, stride_x, stride_y, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # silu rounded to the input dtype first, as F.silu(gate) * up does in that dtype.
    silu = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (silu * up).to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up, [T, I] in gate_up's dtype."""
    if gate_up.stride(-1) != 1:
        raise ValueError("silu_and_mul needs a unit stride along the last dimension")
    t, two_i = gate_up.shape
    inter = two_i // 2
    y = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(2048, triton.next_power_of_2(inter))
    if t:
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](
            gate_up, y, gate_up.stride(0), y.stride(0), inter, BLOCK=block, num_warps=4
        )
    return y
