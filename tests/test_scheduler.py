"""Scheduler logic on the CPU with a real KVCacheManager and no model: the "model" is the
test, which feeds back a token for every request that samples."""

from __future__ import annotations

from kvcache.manager import KVCacheManager
from server.engine.request import Request, RequestStatus
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig

BS = 4


def make(num_blocks=64, **cfg) -> Scheduler:
    config = SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 256, **cfg})
    return Scheduler(config, KVCacheManager(num_blocks, BS), clock=lambda: 0.0)


def req(rid: str, n_prompt: int, max_tokens=4, start=1, **kw) -> Request:
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=frozenset({0}))


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {sr.request.request_id: (token, None) for sr in out.scheduled if sr.samples}
    return out, s.update(out, sampled)


def drain(s: Scheduler, max_steps=1000):
    finished = {}
    for _ in range(max_steps):
        if not s.has_unfinished():
            return finished
        _, outs = run_step(s)
        for o in outs:
            if o.finished:
                finished[o.request_id] = o
    raise AssertionError("did not finish")


def test_prefill_then_decode_one_token_per_step():
    s = make()
    r = req("a", 10, max_tokens=3)
    s.add(r)
    out, outs = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 10)]
    assert outs[0].new_token_ids == [7]
    out, _ = run_step(s)
    assert out.scheduled[0].num_new_tokens == 1
    _, outs = run_step(s)
    assert outs[0].finish_reason == "length" and r.num_output_tokens == 3
    assert s.kv.num_free_blocks == s.kv.num_blocks
    s.kv.check_integrity()


def test_token_budget_chunks_prefill_and_decodes_go_first():
    s = make(max_num_batched_tokens=16)
    s.add(req("a", 5, max_tokens=10))
    run_step(s)  # a prefilled
    s.add(req("b", 40, start=100))
    out, outs = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 15)]
    assert [o.request_id for o in outs] == ["a"]  # b is mid-prefill: no token yet
    out, _ = run_step(s)
    assert [x.num_new_tokens for x in out.scheduled] == [1, 15]
    out, outs = run_step(s)
    assert [x.num_new_tokens for x in out.scheduled] == [1, 10]
    assert {o.request_id for o in outs} == {"a", "b"}


def test_long_prefill_threshold_caps_chunks():
    s = make(long_prefill_token_threshold=8)
    s.add(req("a", 20))
    sizes = [run_step(s)[0].scheduled[0].num_new_tokens for _ in range(3)]
    assert sizes == [8, 8, 4]


def test_max_num_seqs_limits_admission():
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(req(f"r{i}", 4, start=10 * i + 1))
    out, _ = run_step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 1
    drain(s)
    s.kv.check_integrity()


def test_prefix_hit_skips_cached_tokens():
    s = make()
    s.add(req("a", 12, max_tokens=1))
    drain(s)
    b = req("b", 14, max_tokens=1)  # same first 12 tokens, then 2 more
    s.add(b)
    out, _ = run_step(s)
    assert b.num_cached_tokens == 12
    assert out.scheduled[0].num_new_tokens == 2


def test_prompt_logprobs_bypass_the_prefix_cache_until_handed_out():
    """Cached positions have no logits: a request for prompt logprobs computes its whole
    prompt, in chunks, and its scores go out once, with its first token."""
    from server.engine.outputs import TokenLogprobs

    s = make(max_num_batched_tokens=8)
    s.add(req("warm", 12, max_tokens=1))
    drain(s)
    r = req("scored", 12, max_tokens=2, prompt_logprobs=0)
    s.add(r)
    outs = []
    while not outs:
        out = s.schedule()
        (sr,) = out.scheduled
        first = sr.request.num_computed_tokens
        # what the model runner returns: the positions of this chunk that score a prompt token
        n = min(first + sr.num_new_tokens, 11) - first
        lps = [TokenLogprobs(first + 1 + i, -1.0, 1, [], []) for i in range(n)]
        sampled = {"scored": (7, None)} if sr.samples else {}
        outs = s.update(out, sampled, {"scored": (first + 1, lps)})
    assert r.num_cached_tokens == 0
    assert [lp and lp.token_id for lp in outs[0].prompt_logprobs] == [None, *range(1, 12)]
    assert r.prompt_logprobs is None
    _, outs = run_step(s)
    assert outs[0].prompt_logprobs is None and outs[0].finished
    again = req("again", 12, max_tokens=1)
    s.add(again)
    drain(s)
    assert again.num_cached_tokens == 8  # plain requests still hit the cache
    s.kv.check_integrity()


def test_preemption_when_blocks_run_out_and_recompute():
    s = make(num_blocks=6)  # 24 token slots
    a, b = req("a", 8, max_tokens=12), req("b", 8, max_tokens=12, start=50)
    s.add(a)
    s.add(b)
    finished = drain(s)
    assert set(finished) == {"a", "b"}
    assert s.num_preemptions > 0
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert s.kv.num_free_blocks == 6
    s.kv.check_integrity()


def test_newest_request_is_preempted_first():
    s = make(num_blocks=5)
    s.add(req("old", 8, max_tokens=20))
    run_step(s)
    s.add(req("new", 8, max_tokens=20, start=50))
    preempted = []
    for _ in range(12):
        out, _ = run_step(s)
        preempted += [r.request_id for r in out.preempted]
        if preempted:
            break
    assert preempted[0] == "new"


def test_abort_in_every_state_frees_everything():
    s = make(num_blocks=16, max_num_batched_tokens=8)
    s.add(req("waiting", 4, start=200))
    s.add(req("prefilling", 30, start=1))
    s.add(req("decoding", 3, start=100))
    run_step(s)  # prefilling takes the whole budget
    s.abort(["prefilling"])
    run_step(s)
    run_step(s)
    assert s.requests["decoding"].status == RequestStatus.RUNNING
    s.add(req("queued", 4, start=300))
    aborted = s.abort(["waiting", "decoding", "queued", "unknown"])
    assert {r.request_id for r in aborted} <= {"waiting", "decoding", "queued"}
    s.abort(list(s.requests))
    assert not s.has_unfinished()
    assert s.kv.num_free_blocks == 16
    s.kv.check_integrity()


def test_stop_conditions():
    s = make()
    s.add(req("eos", 4, max_tokens=10))
    s.add(req("ignore", 4, max_tokens=3, start=20, ignore_eos=True))
    s.add(req("min", 4, max_tokens=10, start=40, min_tokens=2))
    s.add(req("stopid", 4, max_tokens=10, start=60, stop_token_ids=[0]))
    outs = []
    for _ in range(3):
        out = s.schedule()
        sampled = {sr.request.request_id: (0, None) for sr in out.scheduled if sr.samples}
        outs += s.update(out, sampled)
    fin = {o.request_id: o for o in outs if o.finished}
    assert fin["eos"].finish_reason == "stop" and fin["eos"].stop_reason is None
    assert fin["ignore"].finish_reason == "length"
    assert fin["min"].finish_reason == "stop"  # EOS accepted once min_tokens=2 were generated
    assert s.requests.get("min") is None
    assert fin["stopid"].stop_reason == 0


def test_max_model_len_finishes_with_length():
    s = make(max_model_len=10)
    r = req("a", 8, max_tokens=100)
    s.add(r)
    f = drain(s)
    assert f["a"].finish_reason == "length" and r.num_tokens == 10


# -- disaggregation: remote KV into reserved blocks --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_clocked(num_blocks=32):
    clock = Clock()
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    return Scheduler(cfg, KVCacheManager(num_blocks, BS), clock=clock), clock


def test_remote_kv_arrival_joins_the_batch_without_prefill():
    s, clock = make_clocked()
    r = req("d", 10, max_tokens=3)
    match = s.reserve_remote(r, lease_s=5, grace_s=1)
    assert match.num_tokens == 0 and len(s.kv.block_table("d")) == 3  # ceil(10 / 4)
    assert not s.has_unfinished() and s.num_remote_reserved_blocks == 3
    assert run_step(s)[0].scheduled == []  # nothing to compute while the KV is on its way
    outs = s.remote_arrived("d", 7, None)
    assert outs[0].new_token_ids == [7] and r.num_computed_tokens == 10
    out, _ = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("d", 1)]
    drain(s)
    assert s.kv.num_free_blocks == 32
    s.kv.check_integrity()


def test_remote_reservation_reuses_the_local_prefix_cache():
    s, _ = make_clocked()
    s.add(req("a", 12, max_tokens=1))
    drain(s)
    match = s.reserve_remote(req("b", 14, max_tokens=2), lease_s=5, grace_s=1)
    assert match.num_tokens == 12  # only the last 2 tokens' block must come from the prefill worker


def test_lease_expiry_prefills_locally_and_quarantines_the_blocks():
    s, clock = make_clocked()
    r = req("d", 10, max_tokens=2)
    s.reserve_remote(r, lease_s=5, grace_s=1)
    clock.t = 5.0
    assert s.tick() == ["d"] and s.num_lease_expiries == 1
    out, _ = run_step(s)
    assert out.scheduled[0].num_new_tokens == 10  # the whole prompt, computed here
    drain(s)
    assert "d" in s.deferred and s.kv.num_free_blocks < 32  # a late writer may still land
    clock.t = 6.0
    s.tick()
    assert s.kv.num_free_blocks == 32
    s.kv.check_integrity()


def test_abort_while_waiting_for_remote_kv_frees_after_arrival_or_lease():
    s, clock = make_clocked()
    s.reserve_remote(req("x", 10), lease_s=5, grace_s=1)
    s.reserve_remote(req("y", 10, start=50), lease_s=5, grace_s=1)
    s.abort(["x", "y"])
    assert s.kv.num_free_blocks < 32  # not reusable while the prefill may be writing
    assert s.remote_arrived("x", 7, None) == []  # x's write landed: now it is safe
    assert "x" not in s.deferred
    clock.t = 6.0
    s.tick()  # y never arrived: freed at lease + grace
    assert s.kv.num_free_blocks == 32 and not s.has_unfinished()
    s.kv.check_integrity()


def test_prefill_side_keeps_kv_until_released():
    s, _ = make_clocked()
    r = req("p", 10, max_tokens=1)
    r.keep_kv_on_finish = True
    s.add(r)
    _, outs = run_step(s)
    assert outs[0].finish_reason == "length" and "p" in s.held
    assert len(s.kv.block_table("p")) == 3  # the prompt's blocks, ready to send
    s.release_held("p")
    assert s.kv.num_free_blocks == 32
    s.kv.check_integrity()


def test_first_remote_token_can_finish_the_request():
    s, _ = make_clocked()
    s.reserve_remote(req("e", 10, max_tokens=5), lease_s=5, grace_s=1)
    outs = s.remote_arrived("e", 0, None)  # EOS
    assert outs[0].finish_reason == "stop" and not s.requests
    assert s.kv.num_free_blocks == 32


# -- lookahead: the next step predicted while this one runs (CUDA-graph staging ahead) ---------


def step_with_lookahead(s: Scheduler, tokens: dict[str, int] | None = None, token: int = 7):
    """One engine step as EngineCore.step runs it with step lookahead: schedule, predict the
    next step (before this step's tokens are known), then update."""
    out = s.schedule()
    rows = s.lookahead(out)
    sampled = {sr.request.request_id: ((tokens or {}).get(sr.request.request_id, token), None)
               for sr in out.scheduled if sr.samples}
    return out, rows, s.update(out, sampled)


def test_lookahead_predicts_the_next_decode_step_across_block_boundaries():
    s = make()
    s.add(req("a", 5, max_tokens=20))
    s.add(req("b", 3, max_tokens=20, start=50))
    out, rows, _ = step_with_lookahead(s)  # both prefill and sample their first token
    for _ in range(12):
        assert rows is not None
        predicted = [(r.request.request_id, r.position) for r in rows]
        for r in rows:  # the block of the next token is already there
            assert len(s.kv.block_table(r.request.request_id)) * BS > r.position
        out, rows, _ = step_with_lookahead(s)
        assert [(x.request.request_id, x.request.num_computed_tokens - 1, x.num_new_tokens)
                for x in out.scheduled] == [(rid, pos, 1) for rid, pos in predicted]
    s.kv.check_integrity()


def test_lookahead_declines_while_a_prefill_continues_or_a_request_can_join():
    s = make(max_num_batched_tokens=8, max_num_seqs=2)
    s.add(req("a", 20, max_tokens=20))
    _, rows, _ = step_with_lookahead(s)  # chunk 1 of 3: samples nothing
    assert rows is None
    s2 = make(num_blocks=3, max_num_seqs=2)
    s2.add(req("a", 5, max_tokens=20))
    s2.add(req("b", 9, max_tokens=20, start=50))  # 3 blocks: waits for a's to be freed
    _, rows, _ = step_with_lookahead(s2)
    assert [r.request_id for r in s2.running] == ["a"] and rows is None  # b may fit any step
    s3 = make(max_num_seqs=1)
    s3.add(req("a", 5, max_tokens=20))
    s3.add(req("b", 5, max_tokens=20, start=50))  # no seat for b while a runs
    _, rows, _ = step_with_lookahead(s3)
    assert [r.request.request_id for r in rows] == ["a"]


def test_lookahead_leaves_out_requests_that_finish_by_length():
    s = make(max_model_len=12)
    s.add(req("a", 5, max_tokens=3))
    s.add(req("b", 9, max_tokens=50, start=50))
    _, rows, _ = step_with_lookahead(s)  # prefills; a samples 1 of 3 tokens, b token 10 of 12
    assert [(r.request.request_id, r.position) for r in rows] == [("a", 5), ("b", 9)]
    _, rows, _ = step_with_lookahead(s)  # a samples token 2, b token 11: both go on
    assert [(r.request.request_id, r.position) for r in rows] == [("a", 6), ("b", 10)]
    _, rows, _ = step_with_lookahead(s)  # a's 3rd token and b's 12th end them
    assert rows is None
    drain(s)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_lookahead_never_preempts_and_an_early_block_is_freed_with_its_request():
    s = make(num_blocks=4)  # 16 tokens in all
    s.add(req("a", 7, max_tokens=20))
    s.add(req("b", 7, max_tokens=20, start=50))
    _, rows, _ = step_with_lookahead(s)  # 2 + 2 blocks hold 8 tokens each; position 7 fits
    assert [r.position for r in rows] == [7, 7]
    _, rows, _ = step_with_lookahead(s)  # position 8 needs a 5th block: no prediction
    assert rows is None and s.num_preemptions == 0 and s.kv.num_free_blocks == 0
    s2 = make()
    s2.add(req("a", 4, max_tokens=20))
    _, rows, _ = step_with_lookahead(s2)  # position 4 opens block 2, allocated now
    assert len(s2.kv.block_table("a")) == 2
    _, _, outs = step_with_lookahead(s2, tokens={"a": 0})  # EOS: a stops with the early block
    assert outs[0].finish_reason == "stop"
    assert s2.kv.num_free_blocks == s2.kv.num_blocks
    s2.kv.check_integrity()


def test_lookahead_under_random_load_keeps_every_block_accounted():
    """Arrivals, EOS stops, aborts and preemptions with a prediction every step: whenever the
    next step decodes exactly the predicted requests, it decodes them at the predicted positions;
    at the end every block is free."""
    import random

    rng = random.Random(0)
    s = make(num_blocks=24, max_num_seqs=4, max_num_batched_tokens=16)
    rows = None
    checked = 0
    for step in range(400):
        if rng.random() < 0.15:
            s.add(req(f"r{step}", rng.randint(1, 12), max_tokens=rng.randint(1, 12), start=rng.randint(1, 99)))
        if rng.random() < 0.03 and s.running:
            s.abort([rng.choice(s.running).request_id])
            rows = None  # the engine's prediction would now miss: its runner checks
        out = s.schedule()
        if rows is not None and [x.request.request_id for x in out.scheduled] == [r.request.request_id for r in rows]:
            assert [x.request.num_computed_tokens for x in out.scheduled] == [r.position for r in rows]
            assert all(x.num_new_tokens == 1 for x in out.scheduled)
            checked += 1
        rows = s.lookahead(out)
        sampled = {sr.request.request_id: (0 if rng.random() < 0.05 else 7, None)
                   for sr in out.scheduled if sr.samples}
        s.update(out, sampled)
        s.kv.check_integrity()
    drain(s)
    assert checked > 20
    assert s.kv.num_free_blocks == s.kv.num_blocks


# -- step overlap: the predicted next step launched before this one's tokens are known --------


def test_overlapped_steps_drop_rows_of_stopped_requests_and_hold_their_blocks():
    """EngineCore.step with step overlap, as the scheduler sees it: step N+1 (the prediction)
    is launched before N's update; a request that stops at N (EOS) or is aborted meanwhile
    gets nothing from N+1, and its blocks stay allocated until N+1 is synced."""
    from server.engine.scheduler import ScheduledRequest, SchedulerOutput

    s = make()
    for i, rid in enumerate("abc"):
        s.add(req(rid, 6, max_tokens=20, start=10 * i + 1))
    out = s.schedule()
    s.update(out, {x.request.request_id: (7, None) for x in out.scheduled})  # prefills
    out = s.schedule()  # step N: decodes a, b, c
    nxt = SchedulerOutput([ScheduledRequest(r.request, 1) for r in s.lookahead(out)])
    s.step_launched(nxt)  # N+1 runs ahead
    free = s.kv.num_free_blocks
    outs = s.update(out, {"a": (0, None), "b": (7, None), "c": (7, None)})  # a hits EOS at N
    assert outs[0].finish_reason == "stop" and s.kv.num_free_blocks == free  # a's blocks held
    s.abort(["b"])
    assert s.kv.num_free_blocks == free
    try:  # an id whose blocks are still held cannot be reused yet
        s.add(req("a", 3))
        raise AssertionError("id reuse accepted")
    except ValueError:
        pass
    rows = s.lookahead(nxt)  # predicting N+2 from N+1: only c is still live
    assert [r.request.request_id for r in rows] == ["c"]
    s.step_synced()  # N+1 has run
    assert s.kv.num_free_blocks > free and s.num_steps_in_flight == 0
    outs = s.update(nxt, {"a": (7, None), "b": (7, None), "c": (7, None)})
    assert [o.request_id for o in outs] == ["c"] and s.requests["c"].num_output_tokens == 3
    s.add(req("a", 3))  # free again
    s.abort(["a", "c"])
    assert s.kv.num_free_blocks == s.kv.num_blocks
    s.kv.check_integrity()
