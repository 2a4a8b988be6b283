"""Rounding to the model dtype that the compiler cannot fold away.

`x.to(tl.bfloat16).to(tl.float32)` reads as "round x to bf16", but Triton narrows such
round trips: `(a*b).to(bf16).to(f32) + (c*d).to(bf16).to(f32)` becomes bf16 `fmul`, `fmul`,
`fadd` in LLVM IR, and the NVPTX backend contracts one fmul with the fadd into
`fma.rn.bf16x2`, one rounding fewer than written (seen on an H200 with Triton 3.6: 25% of
`x*cos + y*sin` elements off by one bf16 ulp from torch's `x * cos + y * sin`). Rounding with
integer ops (round to nearest, ties to even, on the float32 bits) leaves nothing to narrow.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dt: tl.constexpr):
    """float32 x rounded to dt (round to nearest even), returned as float32. bf16: on the bits,
    NaN kept; other dtypes: a cast round trip (fp16 products followed by an add may still be
    contracted into an FMA: launch such kernels with enable_fp_fusion=False)."""
    if dt == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)
    else:
        return x.to(dt).to(tl.float32)
