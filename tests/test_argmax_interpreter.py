"""The sampler's row argmax (kernels/triton/argmax.py: per-chunk maxima, then the first index of
the largest) under Triton's CPU interpreter against torch.argmax: ties across and inside
chunks, rows of -inf, NaN, lengths around the chunk size. Skipped where triton is not
installed (CI's CPU install) and where CUDA is (tests/test_gpu_kernels.py runs the compiled
kernel there)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import interpreted_module


@pytest.fixture(scope="module")
def argmax():
    yield from (m.argmax for m in interpreted_module("kernels.triton.argmax"))


@pytest.mark.parametrize("vocab", [1, 7, 4096, 4097, 12289])
def test_matches_torch(argmax, vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(5, vocab, generator=gen)
    x[1] = float("-inf")  # a fully masked row: index 0
    if vocab > 1:
        x[2, -1] = 100.0  # the maximum in the last (partial) chunk
        x[3, :] = 0.0
        x[3, vocab // 2 :] = 5.0  # ties: the first one wins
    out = argmax(x)
    assert out.dtype == torch.int64
    assert torch.equal(out, x.argmax(dim=-1))


def test_ties_across_chunks_and_nan(argmax):
    x = torch.zeros(3, 3 * 4096 + 5)
    x[0, [5000, 9000, 12000]] = 7.0  # tied maxima in three chunks: the first
    x[1, 4096 * 2 + 3] = float("nan")  # NaN is the maximum, as for torch
    x[2, [4095, 4096]] = 1.0  # the chunk boundary
    assert torch.equal(argmax(x), x.argmax(dim=-1))
    assert argmax(x).tolist() == [5000, 4096 * 2 + 3, 4095]


def test_bf16_and_strided_rows(argmax):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 9000, generator=gen).to(torch.bfloat16)
    view = wide[:, :8000]  # rows with a stride larger than their length
    assert torch.equal(argmax(view), view.argmax(dim=-1))
    with pytest.raises(ValueError):
        argmax(wide.t())
