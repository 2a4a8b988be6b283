"""Step lookahead on the GPU (SmolLM2, bf16, CUDA graphs): the engine stages the predicted next
decode step while the current one runs (`ModelRunner.prepare_ahead`), and with step overlap
launches it before the current step's tokens are read back (`launch_ahead`). Staging ahead
never changes a step's batch, so a staggered, mixed workload must give the same tokens and
logprobs with lookahead on and off. Overlap may batch a step differently when requests arrive
or stop early (bf16 kernels then round differently), so its token check runs on a workload
whose batches cannot differ, and the mixed workload checks that it completes and leaks
nothing. The prepared / launched-ahead paths must actually run. The scheduler's prediction
itself is unit-tested on the CPU (tests/test_scheduler.py, test_lookahead_*), and the runner's matching
and token gathering run in CI with an eager stand-in for the graphs (tests/test_lookahead_cpu.py)."""

from __future__ import annotations

import gc

import pytest
import torch

from server.engine.engine import EngineConfig, EngineCore
from tests.lookahead_workload import drive, drive_batch

pytestmark = pytest.mark.gpu


def engine(step_lookahead: bool, backend: str, overlap: bool = False) -> EngineCore:
    return EngineCore(EngineConfig(
        dtype="bfloat16", device="cuda", max_num_seqs=8, attention_backend=backend, progress=False,
        gpu_memory_utilization=0, kv_cache_memory="256MiB", step_lookahead=step_lookahead,
        step_overlap=overlap,
    ))


def run(step_lookahead: bool, backend: str, overlap: bool = False):
    eng = engine(step_lookahead, backend, overlap)
    return drive(eng), eng


def check_same(base, other, eng) -> None:
    for rid, (toks, lps) in base.items():
        assert other[rid][0] == toks, rid
        assert other[rid][1] == pytest.approx(lps, abs=1e-3), rid
    check_clean(eng)


def check_clean(eng) -> None:
    assert eng.scheduler.num_steps_in_flight == 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.check_integrity()


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_lookahead_gives_the_same_tokens(backend):
    """Staggered arrivals, EOS stops, penalties: staging ahead never changes a step's batch."""
    base, eng = run(False, backend)
    assert eng.runner.ahead_used == 0 and eng.runner.launched_ahead == 0
    del eng
    gc.collect()
    ahead, eng = run(True, backend)
    print(f"\n[{backend}] prepared steps used {eng.runner.ahead_used}, missed {eng.runner.ahead_missed}")
    assert eng.runner.ahead_used > 50  # the prepared path really ran
    assert eng.runner.ahead_missed > 0  # and so did the fallback (arrivals, EOS stops)
    check_same(base, ahead, eng)


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_overlap_gives_the_same_tokens(backend):
    """Step overlap (the next step launched before this one's tokens are read back) on a
    workload whose batches cannot differ (all at once, stops by length): same tokens and
    logprobs as the plain engine. Then the staggered, mixed workload, where overlap may batch
    differently (a new arrival joins a step later; a row that stops early is computed once
    more and dropped): every request completes and nothing leaks."""
    eng = engine(False, backend)
    base = drive_batch(eng)
    del eng
    gc.collect()
    eng = engine(True, backend, overlap=True)
    over = drive_batch(eng)
    print(f"\n[{backend}] batch workload, overlap: launched ahead {eng.runner.launched_ahead}")
    assert eng.runner.launched_ahead > 50
    check_same(base, over, eng)
    del eng
    gc.collect()
    mixed, eng = run(True, backend, overlap=True)
    print(f"[{backend}] mixed workload, overlap: launched ahead {eng.runner.launched_ahead}, "
          f"prepared used {eng.runner.ahead_used}, missed {eng.runner.ahead_missed}")
    assert eng.runner.launched_ahead > 30  # (49 on an H200: batches with penalties stage only)
    for rid, (toks, _) in mixed.items():
        assert toks, rid
    check_clean(eng)
    del eng
    gc.collect()
    base_mixed, eng = run(False, backend)
    same = sum(mixed[rid][0] == toks for rid, (toks, _) in base_mixed.items())
    first = {rid: next((i for i, (a, b) in enumerate(zip(toks, mixed[rid][0], strict=False)) if a != b), None)
             for rid, (toks, _) in base_mixed.items()}
    print(f"[{backend}] mixed workload: {same}/{len(base_mixed)} requests token-identical to the "
          f"plain engine; first differing token per request: {first}")
    del eng
    gc.collect()
    torch.cuda.empty_cache()


def test_stage_kernel_gives_the_same_tokens(monkeypatch):
    """The graphs' inputs filled by kernels/triton/stage_decode.py (the default) instead of
    the torch ops (PDSERVE_STAGE_KERNEL=0): with lookahead (ids gathered from the sampled
    tokens) the mixed workload gives the plain engine's tokens staged by the torch ops."""
    from server.engine import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "STAGE_KERNEL", False)
    base, eng = run(False, "flashinfer")
    del eng
    gc.collect()
    monkeypatch.setattr(cuda_graphs, "STAGE_KERNEL", True)
    staged, eng = run(True, "flashinfer")
    assert eng.runner.ahead_used > 50
    check_same(base, staged, eng)
