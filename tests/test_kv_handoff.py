"""The worker half of disaggregation with real engines (the embedded model, float32) and real
KV connectors (NIXL and the ZMQ fallback) in one process: a prefill engine P writes the KV of
a prompt into blocks a decode engine D reserved, then D decodes. The handoff is driven step by
step here, so every lifecycle state (reserved, prefilling, sending, decoding, lease expired)
is reached deterministically; after every test both engines pass `check_integrity()` with
every block free."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import pytest

from kvcache.transfer import create_connector
from server.engine.engine import EngineConfig, EngineCore
from server.engine.sampling_params import SamplingParams
from server.worker.kv_handoff import DecodeHandoff, PrefillHandoff, kv_layout
from server.worker.messages import RemotePrefill, ReserveRemote

TRANSPORTS = ["zmq"]
try:
    import nixl  # noqa: F401

    TRANSPORTS.insert(0, "nixl")
except ImportError:  # the fallback is tested either way; NIXL is in the test extra
    pass

_names = itertools.count()


@pytest.fixture(scope="module")
def engines(share_loaded_models):  # P and D share one loaded model (conftest.py)
    cfg = dict(kv_cache_memory="16MiB", max_num_seqs=8, dtype="float32", progress=False)
    return (
        EngineCore(EngineConfig(worker_id="p", **cfg)),
        EngineCore(EngineConfig(worker_id="d", **cfg)),
    )


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Pair:
    p: EngineCore
    d: EngineCore
    prefill: PrefillHandoff
    decode: DecodeHandoff
    d_name: str  # D's KV peer id


@pytest.fixture(params=TRANSPORTS)
def pair(request, engines):
    p, d = engines
    n = next(_names)
    pc = create_connector(request.param, f"p{n}", p.kv_cache, kv_layout(p))
    dc = create_connector(request.param, f"d{n}", d.kv_cache, kv_layout(d))
    pc.add_peer(dc.endpoint())
    dc.add_peer(pc.endpoint())
    clock = d.scheduler.clock
    yield Pair(p, d, PrefillHandoff(p, pc), DecodeHandoff(d, dc), f"d{n}")
    d.scheduler.clock = clock
    pc.close()
    dc.close()
    for e in engines:
        e.check_integrity()
        assert e.kv.num_requests == 0 and e.kv.num_free_blocks == e.kv.num_blocks
        assert not e.scheduler.deferred and not e.scheduler.held


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def local(engine: EngineCore, rid: str, prompt: list[int], params: SamplingParams) -> list:
    """(token, logprobs) of a request run start to end on one engine."""
    engine.add_request(rid, prompt, params)
    got = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got += list(zip(out.new_token_ids, out.new_logprobs or [None], strict=False))
    return got


def prompt_of(pair: Pair, text: str) -> list[int]:
    """Unique per test (the engines' prefix caches outlive a test)."""
    return pair.p.tokenizer.encode(f"[{pair.d_name}] {text}")


LONG = (
    "In the valley below the mountain, the river ran past the old mill, where the miller's "
    "children kept a garden of beans and tomatoes, and every evening the light over the "
    "water turned the color of copper while the swallows came down to drink. "
)


def reserve(pair: Pair, rid: str, prompt, params, lease: float = 30.0):
    msg = ReserveRemote(request_id=rid, prompt_token_ids=prompt, params=params, lease_s=lease,
                        grace_s=1.0)  # fmt: skip
    got = pair.decode.reserve("d", msg)
    assert got.ok
    return got


def remote_prefill(pair: Pair, rid: str, prompt, params, res) -> RemotePrefill:
    return RemotePrefill(
        request_id=rid, prompt_token_ids=prompt, params=params, decode_worker=pair.d_name,
        first_block=res.first_block, block_ids=res.block_ids, lease_s=res.lease_s,
        deadline=res.deadline,
    )  # fmt: skip


def start(pair: Pair, rid: str, prompt, params, res) -> None:
    assert pair.prefill.start(remote_prefill(pair, rid, prompt, params, res)) is None


def drive(pair: Pair, rid: str, max_iters: int = 100_000):
    """Step both sides until D finished `rid` and P reported it; returns (tokens, outcome)."""
    outputs, outcomes = [], []
    for _ in range(max_iters):
        if pair.p.has_unfinished_requests():
            rest, failed = pair.prefill.on_outputs(pair.p.step())
            assert rest == [] and failed == []
        outcomes += pair.prefill.poll()
        outputs += pair.decode.poll()
        if pair.d.has_unfinished_requests():
            outputs += pair.d.step()
        if outcomes and any(o.finished for o in outputs):
            break
    else:
        raise AssertionError("the handoff did not finish")
    tokens = [
        (t, lp)
        for o in outputs
        if o.request_id == rid
        for t, lp in zip(o.new_token_ids, o.new_logprobs or [None], strict=False)
    ]
    (outcome,) = outcomes
    return tokens, outcome


def test_remote_prefill_matches_local_and_sends_only_what_d_lacks(pair):
    prompt = prompt_of(pair, "Story one. " + LONG)
    n_blocks = -(-len(prompt) // 16)
    params = greedy(12, logprobs=2)
    ref = local(pair.p, "ref", prompt, params)
    bpb = pair.prefill.connector.bytes_per_block

    res = reserve(pair, "r1", prompt, params)
    assert res.first_block == 0 and len(res.block_ids) == n_blocks
    start(pair, "r1", prompt, params, res)
    got, outcome = drive(pair, "r1")
    assert [t for t, _ in got] == [t for t, _ in ref]
    assert got[0][1].top_token_ids == ref[0][1].top_token_ids  # the first token's logprobs
    assert abs(got[0][1].logprob - ref[0][1].logprob) < 1e-4
    assert outcome.ok and outcome.nbytes == n_blocks * bpb
    assert outcome.num_descriptors <= 2  # a fresh pool hands out consecutive blocks: collated
    # P reused its own prefix cache (from the local run): every full block but the last token's.
    assert outcome.cached_tokens == (len(prompt) - 1) // 16 * 16

    # Now D holds the prefix too: only the blocks it lacks travel.
    res = reserve(pair, "r2", prompt, params)
    assert res.first_block == (len(prompt) - 1) // 16
    start(pair, "r2", prompt, params, res)
    got2, outcome2 = drive(pair, "r2")
    assert [t for t, _ in got2] == [t for t, _ in ref]
    assert outcome2.nbytes == (n_blocks - res.first_block) * bpb < outcome.nbytes


def test_seeded_sampling_continues_across_the_handoff(pair):
    prompt = prompt_of(pair, "Seeded. " + LONG)
    params = SamplingParams(max_tokens=10, temperature=0.9, seed=1234, ignore_eos=True)
    ref = local(pair.p, "ref-s", prompt, params)
    res = reserve(pair, "s1", prompt, params)
    start(pair, "s1", prompt, params, res)
    got, _ = drive(pair, "s1")
    assert [t for t, _ in got] == [t for t, _ in ref]


def test_abort_while_the_kv_is_being_sent_frees_both_sides(pair):
    prompt = prompt_of(pair, "Abort while sending. " + LONG)
    params = greedy(4)
    res = reserve(pair, "a1", prompt, params)
    start(pair, "a1", prompt, params, res)
    while not pair.prefill.jobs["a1"].started:
        rest, failed = pair.prefill.on_outputs(pair.p.step())
        assert not failed
    # The client goes away mid-transfer: the router aborts at both holders.
    assert pair.prefill.abort(["a1"]) == []  # in flight: its outcome comes from poll
    pair.d.abort(["a1"])
    pair.decode.forget(["a1"])
    assert pair.d.kv.num_free_blocks < pair.d.kv.num_blocks  # parked: the write is landing
    outcomes, outputs = [], []
    deadline = time.monotonic() + 60
    while (not outcomes or pair.d.scheduler.deferred) and time.monotonic() < deadline:
        outcomes += pair.prefill.poll()
        outputs += pair.decode.poll()  # the arrival frees the parked blocks
    assert outputs == [] and outcomes[0].request_id == "a1"


def test_abort_while_prefilling_frees_both_sides(pair):
    prompt = prompt_of(pair, "Abort while prefilling. " + LONG)
    params = greedy(4)
    res = reserve(pair, "a2", prompt, params)
    start(pair, "a2", prompt, params, res)
    (outcome,) = pair.prefill.abort(["a2"])  # still queued in P: nothing was or will be sent
    assert not outcome.ok and not outcome.started
    pair.d.abort(["a2"])
    pair.decode.forget(["a2"])
    assert pair.d.scheduler.deferred  # quarantined until the router relays the outcome...
    pair.decode.cancel(["a2"], writer_gone=True)  # ...which says no writer is left


def test_abort_before_any_prefill_worker_was_asked(pair):
    prompt = prompt_of(pair, "Abort while reserving. " + LONG)
    reserve(pair, "a3", prompt, greedy(4))
    pair.d.abort(["a3"])
    pair.decode.forget(["a3"])
    pair.decode.cancel(["a3"], writer_gone=True)


def test_lease_expiry_prefills_locally_then_frees_after_grace(pair):
    prompt = prompt_of(pair, "Lease. " + LONG)
    params = greedy(6)
    ref = local(pair.p, "ref-l", prompt, params)
    clock = Clock(pair.d.scheduler.clock())
    pair.d.scheduler.clock = clock
    reserve(pair, "l1", prompt, params, lease=5.0)  # no prefill worker ever delivers
    assert pair.d.stats().remote_reserved_blocks == -(-len(prompt) // 16)
    clock.t += 5.0
    assert pair.d.tick() == ["l1"] and pair.d.stats().num_lease_expiries >= 1
    got = []
    while pair.d.has_unfinished_requests():
        for out in pair.d.step():
            got += out.new_token_ids
    assert got == [t for t, _ in ref]
    assert pair.d.scheduler.deferred  # a late writer could still land until lease + grace
    clock.t += 1.0
    pair.d.tick()


def test_retry_keeps_the_blocks_quarantined_after_the_kv_lands(pair):
    prompt = prompt_of(pair, "Retry. " + LONG)
    params = greedy(3)
    res = reserve(pair, "t1", prompt, params)
    # The first prefill worker died: D re-offers the same blocks to another one.
    (again,) = pair.decode.retry("d", ["t1"])
    assert again.ok and again.retry and again.block_ids == res.block_ids
    assert 0 < again.lease_s <= 30.0
    assert again.deadline == res.deadline  # the lease still ends when it always did
    start(pair, "t1", prompt, params, again)
    drive(pair, "t1")
    # Finished, but the dead worker's write could still be in flight: parked until the lease.
    assert "t1" in pair.d.scheduler.deferred
    pair.d.scheduler.free_deferred(force=True)  # what lease + grace would do
    # A request that already has its KV is not re-offered.
    (late,) = pair.decode.retry("d", ["t1"])
    assert not late.ok


def test_a_prefill_for_an_unknown_decode_worker_is_refused_at_once(pair):
    prompt = prompt_of(pair, "Nobody. " + LONG)
    msg = RemotePrefill(request_id="u1", prompt_token_ids=prompt, params=greedy(2),
                        decode_worker="nobody", first_block=0, block_ids=[0], lease_s=5.0,
                        deadline=time.time() + 5.0)  # fmt: skip
    outcome = pair.prefill.start(msg)
    assert not outcome.ok and "nobody" in outcome.error
    assert not pair.p.has_unfinished_requests()


def test_a_prefill_whose_lease_ran_out_never_writes(pair):
    """The lease is anchored at D's reservation, not at P's receipt of the request: a prefill
    worker that was frozen, or busy with long steps, must not write into blocks D may have
    handed to another request since."""
    prompt = prompt_of(pair, "Late. " + LONG)
    params = greedy(2)
    res = reserve(pair, "z1", prompt, params, lease=10.0)
    clock = Clock(time.time())
    pair.prefill.wall_clock = clock
    try:
        clock.t = res.deadline - 1.0  # past the cut-off (the last 20% of the lease)
        late = pair.prefill.start(remote_prefill(pair, "z1", prompt, params, res))
        assert not late.ok and not late.started and not pair.p.has_unfinished_requests()

        clock.t = res.deadline - 5.0  # in time to start...
        start(pair, "z1", prompt, params, res)
        clock.t = res.deadline - 1.0  # ...but queued past the cut-off: dropped, not computed
        (dropped,) = pair.prefill.poll()
        assert not dropped.ok and not dropped.started and not pair.prefill.jobs
    finally:
        pair.prefill.wall_clock = time.time
    pair.d.abort(["z1"])
    pair.decode.forget(["z1"])
    pair.decode.cancel(["z1"], writer_gone=True)  # what the router relays from the outcome
