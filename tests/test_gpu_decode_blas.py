"""The decode graphs' cuBLAS front end (kernels/decode_blas.py) on the GPU: start-up timing
plans only the sizes whose graphs run GEMMs on cuBLAS, a graph captured through cuBLASLt
computes what the default capture computes (within bf16 GEMM rounding), and the process-wide
preference is back to the default after every capture."""

from __future__ import annotations

import pytest
import torch

from tests.paged_batch import rel_err

pytestmark = pytest.mark.gpu


def test_decode_graphs_through_cublaslt_agree_with_the_default():
    from kernels import decode_blas, ops
    from server.engine.cuda_graphs import DecodeBatch
    from server.engine.engine import EngineConfig, EngineCore
    from server.engine.sampling_params import SamplingParams

    engine = EngineCore(EngineConfig(
        model="random:smollm2-135m", dtype="bfloat16", device="cuda", max_num_seqs=8,
        gpu_memory_utilization=0, kv_cache_memory="256MiB", progress=False,
    ))  # fmt: skip
    engine.config.step_lookahead = engine.config.step_overlap = False
    graphs, default = engine.runner.cuda_graphs, torch.backends.cuda.preferred_blas_library()
    hidden = engine.model_config.hidden_size
    one_row_fused = ops.fuses_linears(torch.empty(1, hidden, dtype=torch.bfloat16, device="cuda"))
    lines = decode_blas.tune(engine.model, [1, 2, 8])
    assert len(lines) == (2 if one_row_fused else 3), lines
    assert set(decode_blas._PLAN) <= {1, 2, 8} and set(decode_blas._PLAN.values()) <= {decode_blas.LT}
    assert torch.backends.cuda.preferred_blas_library() == default

    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        ids = torch.randint(0, engine.vocab_size, (20 + 7 * i,), generator=gen).tolist()
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    out = engine.scheduler.schedule()
    assert len(out.scheduled) == 3 and out.num_batched_tokens == 3  # one decode step of three
    ids, pos, slots, _, seq_lens, _, tables = engine.runner._host_batch(out)
    batch = DecodeBatch(ids, pos, slots, seq_lens, tables)
    logits = []
    for plan in ({}, {b: decode_blas.LT for b in graphs.sizes}):
        decode_blas.set_plan(plan)
        graphs.recapture()
        assert torch.backends.cuda.preferred_blas_library() == default
        logits.append(graphs.run(batch).clone())  # the step's K/V store writes the same values
    assert rel_err(logits[1], logits[0]) < 2e-2
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean() >= 2 / 3
    tokens = logits[0].argmax(-1).tolist()
    engine.scheduler.update(out, {s.request.request_id: (t, None) for s, t in zip(out.scheduled, tokens, strict=True)})
    engine.abort([f"r{i}" for i in range(3)])
    engine.step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.check_integrity()
