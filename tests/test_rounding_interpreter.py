"""kernels/triton/rounding.py `round_to` under Triton's CPU interpreter against torch's float32
-> bf16 / fp16 casts: random values, exact halfway cases (ties to even), values that round up
to the next binade or to inf, inf, NaN. (On the GPU, tests/test_gpu_kernels.py checks the
kernels that use it bit for bit against the torch reference.) Skipped where triton is not
installed (CI's CPU install) and where CUDA is."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import interpreted_module


@pytest.fixture(scope="module")
def rounding():
    yield from interpreted_module("kernels.triton.rounding")


_round_to = None  # the interpreted kernels.triton.rounding.round_to, set by `kernel`


@pytest.fixture(scope="module")
def kernel(rounding):
    import triton
    import triton.language as tl

    global _round_to
    _round_to = rounding.round_to

    @triton.jit
    def _round_kernel(X, Y, N, DT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        tl.store(Y + i, _round_to(tl.load(X + i, mask=m), DT), mask=m)

    def run(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = torch.empty_like(x)
        dt = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
        _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), DT=dt, BLOCK=1024)
        return y

    return run


def _cases(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(4000, generator=gen) * torch.logspace(-6, 6, 4000)
    lo = torch.randn(500, generator=gen).to(dtype).float()
    mant_bits = 8 if dtype == torch.bfloat16 else 11
    ulp = torch.ldexp(torch.ones_like(lo), torch.frexp(lo).exponent - mant_bits)
    halfway = lo + ulp / 2  # exactly between two neighbours: ties to even
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.00390625, 1.01171875, 3.3895e38, 3.4e38,
                            float("inf"), float("-inf"), 65504.0, 65520.0, 1e-5, -2.5e-8])
    return torch.cat([rand, lo, halfway, special]).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_matches_torch_cast(kernel, dtype):
    x = _cases(dtype)
    assert torch.equal(kernel(x, dtype), x.to(dtype).float())


def test_round_to_keeps_nan(kernel):
    x = torch.tensor([float("nan"), 1.0, float("nan")])
    y = kernel(x, torch.bfloat16)
    assert torch.isnan(y[[0, 2]]).all() and y[1] == 1.0
