"""Step lookahead on the GPU (SmolLM2, bf16, CUDA graphs): the engine stages the predicted next
decode step while the current one runs (`ModelRunner.prepare_ahead`). The same staggered,
mixed workload run with lookahead on and off must give the same tokens and logprobs, with the
prepared steps actually used, and leave the cache clean. The scheduler's prediction itself is
unit-tested on the CPU (tests/test_scheduler.py, test_lookahead_*)."""

from __future__ import annotations

import gc

import pytest
import torch

from server.engine.engine import EngineConfig, EngineCore
from server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def run(step_lookahead: bool, backend: str) -> tuple[dict[str, tuple[list[int], list[float]]], EngineCore]:
    eng = EngineCore(EngineConfig(
        dtype="bfloat16", device="cuda", max_num_seqs=8, attention_backend=backend, progress=False,
        gpu_memory_utilization=0, kv_cache_memory="256MiB", step_lookahead=step_lookahead,
    ))
    gen = torch.Generator().manual_seed(0)
    plans = []  # (step at which it arrives, request id, prompt, params)
    for i in range(14):
        prompt = torch.randint(100, 40000, (int(torch.randint(3, 60, (1,), generator=gen)),), generator=gen).tolist()
        kinds = [
            SamplingParams(max_tokens=24 + 3 * i, temperature=0.0, ignore_eos=True, logprobs=2),
            SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True),
            SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=1.3, min_tokens=5),
            SamplingParams(max_tokens=1 + i, temperature=0.0),  # stops early, some by EOS
        ]
        plans.append((5 * i, f"r{i}", prompt, kinds[i % len(kinds)]))
    tokens: dict[str, list[int]] = {rid: [] for _, rid, _, _ in plans}
    logprobs: dict[str, list[float]] = {rid: [] for _, rid, _, _ in plans}
    step = 0
    while plans or eng.has_unfinished_requests():
        while plans and plans[0][0] <= step:
            _, rid, prompt, params = plans.pop(0)
            eng.add_request(rid, prompt, params)
        for o in eng.step():
            tokens[o.request_id] += o.new_token_ids
            logprobs[o.request_id] += [lp.logprob for lp in o.new_logprobs or []]
        step += 1
    return {rid: (tokens[rid], logprobs[rid]) for rid in tokens}, eng


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_lookahead_gives_the_same_tokens(backend):
    base, eng = run(False, backend)
    assert eng.runner.ahead_used == 0
    del eng
    gc.collect()
    ahead, eng = run(True, backend)
    print(f"\n[{backend}] prepared steps used {eng.runner.ahead_used}, missed {eng.runner.ahead_missed}")
    assert eng.runner.ahead_used > 50  # the prepared path really ran
    assert eng.runner.ahead_missed > 0  # and so did the fallback (arrivals, EOS stops)
    for rid, (toks, lps) in base.items():
        assert ahead[rid][0] == toks, rid
        assert ahead[rid][1] == pytest.approx(lps, abs=1e-3), rid
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.check_integrity()
    del eng
    gc.collect()
    torch.cuda.empty_cache()
