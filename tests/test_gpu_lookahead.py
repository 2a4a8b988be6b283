"""Step lookahead on the GPU (SmolLM2, bf16, CUDA graphs): the engine stages the predicted next
decode step while the current one runs (`ModelRunner.prepare_ahead`), and with step overlap
launches it before the current step's tokens are read back (`launch_ahead`). The same
staggered, mixed workload run with lookahead off, on, and on with overlap must give the same
tokens and logprobs, with the prepared / launched-ahead steps actually used, and leave the
cache clean. The scheduler's prediction itself is
unit-tested on the CPU (tests/test_scheduler.py, test_lookahead_*), and the runner's matching
and token gathering run in CI with an eager stand-in for the graphs (tests/test_lookahead_cpu.py)."""

from __future__ import annotations

import gc

import pytest
import torch

from server.engine.engine import EngineConfig, EngineCore
from tests.lookahead_workload import drive

pytestmark = pytest.mark.gpu


def run(step_lookahead: bool, backend: str, overlap: bool = False):
    eng = EngineCore(EngineConfig(
        dtype="bfloat16", device="cuda", max_num_seqs=8, attention_backend=backend, progress=False,
        gpu_memory_utilization=0, kv_cache_memory="256MiB", step_lookahead=step_lookahead,
        step_overlap=overlap,
    ))
    return drive(eng), eng


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_lookahead_gives_the_same_tokens(backend):
    base, eng = run(False, backend)
    assert eng.runner.ahead_used == 0 and eng.runner.launched_ahead == 0
    del eng
    gc.collect()
    ahead, eng = run(True, backend)
    print(f"\n[{backend}] prepared steps used {eng.runner.ahead_used}, missed {eng.runner.ahead_missed}")
    assert eng.runner.ahead_used > 50  # the prepared path really ran
    assert eng.runner.ahead_missed > 0  # and so did the fallback (arrivals, EOS stops)
    check_same(base, ahead, eng)
    del eng
    gc.collect()
    # Step overlap: the next step launched before this one's tokens are read back.
    over, eng = run(True, backend, overlap=True)
    print(f"[{backend}] overlap: launched ahead {eng.runner.launched_ahead}, "
          f"prepared used {eng.runner.ahead_used}, missed {eng.runner.ahead_missed}")
    assert eng.runner.launched_ahead > 50
    assert eng.scheduler.num_steps_in_flight == 0
    check_same(base, over, eng)
    del eng
    gc.collect()
    torch.cuda.empty_cache()


def check_same(base, other, eng) -> None:
    for rid, (toks, lps) in base.items():
        assert other[rid][0] == toks, rid
        assert other[rid][1] == pytest.approx(lps, abs=1e-3), rid
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.check_integrity()
