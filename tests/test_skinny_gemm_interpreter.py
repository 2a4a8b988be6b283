"""kernels/triton/skinny_gemm.py under Triton's CPU interpreter against the torch reference
(`kernels.ops.fused_linear_ref`): plain, SiLU·mul over gate | up, residual, both; row counts
1..128 (padded to the tensor-core tile), N and K not multiples of the blocks, strided rows.
Skipped where triton is not installed (CI's CPU install) and where CUDA is (the GPU runs it in
benchmarks/bench_skinny_gemm.py, which checks every output against cuBLAS)."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from tests.triton_interpreter import interpreted_module


@pytest.fixture(scope="module")
def sg():
    yield from interpreted_module("kernels.triton.skinny_gemm")


CASES = [  # (M, N, K, silu_mul, residual, config = (BLOCK_N, BLOCK_K, warps, stages, split_k, swap))
    (1, 40, 96, False, False, (32, 32, 4, 2)),
    (5, 64, 128, True, False, (32, 64, 4, 2)),
    (17, 70, 100, False, True, (32, 32, 4, 2)),
    (64, 96, 64, True, True, (64, 32, 4, 2)),
    (128, 33, 40, False, False, (16, 16, 4, 2)),
    # swapped operands (weight rows as the MMA's M)
    (3, 70, 100, True, True, (32, 32, 4, 2, 1, True)),
    (64, 40, 96, False, True, (16, 32, 4, 2, 1, True)),
    # split-K: K cut into slices whose partials the last program sums (uneven last slice,
    # a split count that K's blocks cannot fill: 3 asked, 2 slices of 64 over K=100)
    (9, 70, 200, True, True, (32, 32, 4, 2, 3, False)),
    (33, 40, 100, False, True, (16, 32, 4, 2, 3, True)),
    (128, 48, 256, True, False, (16, 64, 4, 2, 4, True)),
]


@pytest.mark.parametrize(("m", "n", "k", "silu", "res", "config"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_fused_linear_ref(sg, m, n, k, silu, res, config, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x_full = torch.randn(m, k + 8, generator=gen).to(dtype)
    x = x_full[:, :k]  # a strided row view, as a layer's slice of a wider buffer
    w = (torch.randn((2 * n if silu else n), k, generator=gen) / k**0.5).to(dtype)
    r = torch.randn(m, n, generator=gen).to(dtype) if res else None
    out = sg.skinny_linear(x, w, silu_mul=silu, residual=r, config=config)
    ref = ops.fused_linear_ref(x.float(), w.float(), silu_mul=silu, residual=None if r is None else r.float())
    assert out.shape == (m, n) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_split_k_leaves_counters_zero_and_repeats_exactly(sg):
    """The tile counters are shared by every launch: each split-K launch must leave them zero,
    and the sum must not depend on which slice arrived last (here: the same bits twice)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, 300, generator=gen)
    w = torch.randn(2 * 48, 300, generator=gen) / 300**0.5
    r = torch.randn(20, 48, generator=gen)
    cfg = (16, 32, 4, 2, 4, False)
    a = sg.skinny_linear(x, w, silu_mul=True, residual=r, config=cfg)
    assert int(sg._counters(x.device, 1).abs().sum()) == 0
    b = sg.skinny_linear(x, w, silu_mul=True, residual=r, config=cfg)
    assert torch.equal(a, b)
    ref = ops.fused_linear_ref(x, w, silu_mul=True, residual=r)
    torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-4)


def test_rejects_bad_shapes(sg):
    x = torch.zeros(129, 32)
    with pytest.raises(ValueError, match="rows"):
        sg.skinny_linear(x, torch.zeros(16, 32))
    with pytest.raises(ValueError, match="K="):
        sg.skinny_linear(torch.zeros(4, 32), torch.zeros(16, 31))
    with pytest.raises(ValueError, match="even"):
        sg.skinny_linear(torch.zeros(4, 32), torch.zeros(15, 32), silu_mul=True)
    with pytest.raises(ValueError, match="residual"):
        sg.skinny_linear(torch.zeros(4, 32), torch.zeros(16, 32), residual=torch.zeros(4, 8))
