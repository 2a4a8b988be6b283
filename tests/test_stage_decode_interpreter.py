"""The decode graphs' one-kernel input staging (kernels/triton/stage_decode.py) under Triton's
CPU interpreter, against the torch ops it replaces in CudaGraphRunner._stage (index_select of
the sampled tokens, int32 conversions of seq_lens and the packed block table into the static
buffers). Skipped where triton is not installed (CI's CPU install) and where CUDA is
(tests/test_gpu_lookahead.py runs the engine with it on a GPU)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import interpreted_module


@pytest.fixture(scope="module")
def stage():
    yield from (m.stage_decode for m in interpreted_module("kernels.triton.stage_decode"))


def packed(n, bs, w, max_bs, width, gen):
    """A buffer laid out as CudaGraphRunner's: [ids | pos | slots | lens | src | table]."""
    o_len, o_src, o_tab = 3 * max_bs, 4 * max_bs, 5 * max_bs
    dev = torch.zeros(5 * max_bs + max_bs * width, dtype=torch.int64)
    dev[:bs] = torch.randint(0, 1000, (bs,), generator=gen)
    dev[o_len : o_len + bs] = torch.randint(1, 5000, (bs,), generator=gen)
    dev[o_src : o_src + n] = torch.randperm(n, generator=gen)
    dev[o_tab : o_tab + bs * w] = torch.randint(0, 3000, (bs * w,), generator=gen)
    return dev, o_len, o_src, o_tab


@pytest.mark.parametrize(("n", "bs", "w"), [(1, 1, 1), (3, 4, 7), (5, 8, 1500)])
@pytest.mark.parametrize("with_tokens", [False, True])
def test_matches_the_torch_staging(stage, n, bs, w, with_tokens):
    gen = torch.Generator().manual_seed(n * 100 + w)
    max_bs, width = 8, 1600
    dev, o_len, o_src, o_tab = packed(n, bs, w, max_bs, width, gen)
    tokens = torch.randint(0, 50000, (n + 2,), generator=gen) if with_tokens else None
    seq_lens = torch.full((max_bs,), -7, dtype=torch.int32)
    tables = torch.full((max_bs, width), -7, dtype=torch.int32)
    ref_dev, ref_lens, ref_tables = dev.clone(), seq_lens.clone(), tables.clone()
    if tokens is not None:  # what _stage does in torch
        ref_dev[:n].copy_(tokens.index_select(0, ref_dev[o_src : o_src + n]))
    ref_lens[:bs].copy_(ref_dev[o_len : o_len + bs])
    ref_tables[:bs, :w].copy_(ref_dev[o_tab : o_tab + bs * w].view(bs, w))

    stage(dev, tokens, n, bs, w, o_len, o_src, o_tab, seq_lens, tables)
    assert torch.equal(dev, ref_dev)  # ids gathered, nothing else in the buffer touched
    assert torch.equal(seq_lens, ref_lens)
    assert torch.equal(tables, ref_tables)  # rows >= bs and columns >= w untouched


def test_rejects_wrong_dtypes(stage):
    dev = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(ValueError):
        stage(dev, None, 1, 1, 1, 3, 4, 5, torch.zeros(8, dtype=torch.int64), torch.zeros(8, 8, dtype=torch.int32))
