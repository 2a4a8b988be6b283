"""Step lookahead's and step overlap's engine logic in CI, without a GPU: the scheduler's
prediction, the runner's prepare_ahead / exact-match check / fallback, launch_ahead (the next
step launched before this one's tokens are read back, its rows of requests that stop meanwhile
dropped, their blocks held until it has run), and the input ids gathered from the previous
step's sampled tokens, on the real SmolLM2 model in float32.

CUDA graphs cannot run on a CPU, so `EagerGraphs` stands in for `CudaGraphRunner` (the one
mock here): `stage` keeps the batch, taking the input ids from the given token tensor and rows
as the real one gathers them on the device, and `replay` runs the model eagerly on what was
staged, up to the logits as the real graphs do. A wrong gather or a prepared batch replayed for the wrong step would change tokens; the
real graphs are checked the same way on a GPU in tests/test_gpu_lookahead.py."""

from __future__ import annotations

import pytest
import torch

from server.engine.cuda_graphs import DecodeBatch, StagedDecode
from server.engine.engine import EngineConfig, EngineCore
from tests.lookahead_workload import drive

# Every engine of this module shares one loaded model (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("share_loaded_models")


class EagerGraphs:
    def __init__(self, runner) -> None:
        self.runner = runner
        self.staged: DecodeBatch | None = None
        self.stages = 0

    def can_run(self, batch_size: int, max_blocks: int) -> bool:
        return 0 < batch_size <= 64

    def stage(self, batch: DecodeBatch, tokens=None) -> StagedDecode:
        if tokens is not None:
            ids = tokens[0][torch.tensor(tokens[1])].tolist()
            batch = batch._replace(input_ids=ids)
        self.staged = batch
        self.stages += 1
        return StagedDecode(len(batch.input_ids), len(batch.input_ids))

    def replay(self, staged: StagedDecode) -> torch.Tensor:
        b = self.staged
        assert b is not None and len(b.input_ids) == staged.num_seqs
        n = staged.num_seqs
        ids, pos, meta = self.runner._to_device(
            b.input_ids, b.positions, b.slots, [1] * n, b.seq_lens, list(range(n + 1)), b.block_tables
        )
        self.runner.attn.plan(meta)
        return self.runner.model.forward_logits(ids, pos, self.runner.attn)


def engine(lookahead: bool, overlap: bool = False) -> EngineCore:
    eng = EngineCore(EngineConfig(dtype="float32", kv_cache_memory="64MiB", max_num_seqs=8,
                                  progress=False, step_lookahead=lookahead, step_overlap=overlap))
    eng.runner.cuda_graphs = EagerGraphs(eng.runner)
    return eng


@pytest.fixture(scope="module")
def baseline(share_loaded_models):
    eng = engine(False)
    return drive(eng, num_requests=10, scale=2), eng


def test_lookahead_matches_the_plain_engine(baseline):
    base, plain = baseline
    eng = engine(True)
    ahead = drive(eng, num_requests=10, scale=2)
    assert plain.runner.ahead_used == 0
    assert eng.runner.ahead_used > 20  # prepared steps replayed
    assert eng.runner.ahead_missed > 0  # and the fallback taken (arrivals, early stops)
    for rid, (toks, lps) in base.items():
        assert ahead[rid][0] == toks, rid
        assert ahead[rid][1] == pytest.approx(lps, abs=1e-4), rid
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.check_integrity()


def test_a_prepared_step_is_not_replayed_after_the_batch_changed(baseline):
    """An abort between two steps changes the batch: the next step must stage afresh, and a
    request that stopped keeps nothing (its early block is freed with it)."""
    eng = engine(True)
    p = list(range(200, 230))
    from server.engine.sampling_params import SamplingParams

    for i in range(3):
        eng.add_request(f"a{i}", p[i:], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    for _ in range(4):
        eng.step()
    used, missed = eng.runner.ahead_used, eng.runner.ahead_missed
    assert used >= 2
    eng.abort(["a1"])
    outs = eng.step()
    assert eng.runner.ahead_missed == missed + 1 and eng.runner.ahead_used == used
    assert sorted(o.request_id for o in outs) == ["a0", "a2"]
    eng.step()
    assert eng.runner.ahead_used == used + 1  # the next prediction holds again
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.check_integrity()


def test_overlap_matches_the_plain_engine(baseline):
    """Same workload with the next decode step launched ahead: same tokens and logprobs (the
    workload's EOS stops drop launched rows; its penalty / min_tokens rows fall back to
    staging only), nothing leaked."""
    base, _ = baseline
    eng = engine(True, overlap=True)
    ahead = drive(eng, num_requests=10, scale=2)
    assert eng.runner.launched_ahead > 10
    assert eng.runner.ahead_used > 0  # batches with penalties only stage ahead
    for rid, (toks, lps) in base.items():
        assert ahead[rid][0] == toks, rid
        assert ahead[rid][1] == pytest.approx(lps, abs=1e-4), rid
    assert eng.scheduler.num_steps_in_flight == 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.check_integrity()


def test_overlap_holds_blocks_of_a_request_stopped_while_a_step_computes_it():
    """A request that ends while the step launched ahead still computes it (here an abort; EOS
    and stop tokens take the same path) keeps its blocks until that step has run, gets no
    output from it, and the others go on."""
    from server.engine.sampling_params import SamplingParams

    eng = engine(True, overlap=True)
    p = list(range(200, 240))
    for i in range(3):
        eng.add_request(f"a{i}", p[i:], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    counts = {"a0": 0, "a1": 0, "a2": 0}
    for _ in range(3):
        for o in eng.step():
            counts[o.request_id] += len(o.new_token_ids)
    assert eng.scheduler.num_steps_in_flight == 1  # a decode step runs ahead
    held = len(eng.kv.block_table("a1"))
    free = eng.kv.num_free_blocks
    eng.abort(["a1"])
    assert eng.kv.num_free_blocks == free  # still being written by the step in flight
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == ["a0", "a2"]
    assert eng.kv.num_free_blocks >= free + held  # freed once that step ran
    for o in outs:
        counts[o.request_id] += len(o.new_token_ids)
    while eng.has_unfinished_requests():
        for o in eng.step():
            counts[o.request_id] += len(o.new_token_ids)
    assert counts["a0"] == counts["a2"] == 12 and counts["a1"] < 12
    assert eng.scheduler.num_steps_in_flight == 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    eng.check_integrity()
