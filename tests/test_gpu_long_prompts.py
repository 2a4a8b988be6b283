"""Long prompts (2k-8k tokens, chunked at 2048) arriving while others decode, on an
8B-shaped model: the serving pattern of the goodput study. Every request must finish with all
its tokens, with CUDA graphs and without.

Honest limit: this offline loop passed on an H200 even before the FlashInfer plan race was
fixed (kernels/attention/flashinfer_backend.py, `_wait_previous_plan`); the race needed a
server's timing (steps that sample nothing while the GPU runs behind the host). What showed the
crash and its fix was `benchmarks/bench_goodput.py --configs single --workloads long`
(benchmarks/results/2026-11-22-goodput-h200x2-long.md).
"""

from __future__ import annotations

import gc

import pytest
import torch

from benchmarks.workloads import make_workload
from server.engine.engine import EngineConfig, EngineCore
from server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
NEW = 24


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_long_prompts_join_running_decodes(eager: bool) -> None:
    engine = EngineCore(EngineConfig(
        model="random:llama-3.1-8b", dtype="bfloat16", device="cuda", max_num_seqs=64,
        max_model_len=8704, gpu_memory_utilization=0.6, enforce_eager=eager, progress=False,
    ))  # fmt: skip
    try:
        specs = make_workload("mix", 40, seed=3)
        params = SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=0.0)
        produced: dict[str, int] = {}
        finished: dict[str, str] = {}
        pending = list(enumerate(specs))
        steps = 0
        while pending or engine.has_unfinished_requests():
            # one new request every other step: prefill chunks keep meeting running decodes
            if pending and steps % 2 == 0:
                i, spec = pending.pop(0)
                engine.add_request(f"r{i}", spec.prompt, params)
            for out in engine.step():
                produced[out.request_id] = produced.get(out.request_id, 0) + len(out.new_token_ids)
                if out.finished:
                    finished[out.request_id] = out.finish_reason
            steps += 1
        torch.cuda.synchronize()
        assert len(finished) == len(specs)
        assert set(finished.values()) == {"length"}
        assert all(n == NEW for n in produced.values()), produced
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
