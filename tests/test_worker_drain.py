"""Graceful drain of the worker loop (what SIGTERM starts), with real engines (the embedded
model, float32), real ZMQ control sockets and the real ZMQ KV connector; the test plays the
router. A draining worker says Draining, keeps serving what it holds and what was routed to
it before the router's DrainAck, leaves only once it has the ack and nothing left (or at the
drain timeout, aborting what still runs), and a prefill worker's KV send finishes or fails
cleanly before its Goodbye."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from kvcache.transfer import create_connector
from server.engine.engine import EngineConfig, EngineCore
from server.engine.sampling_params import SamplingParams
from server.worker import loop as loop_mod
from server.worker import messages as m
from server.worker.kv_handoff import kv_layout
from server.worker.loop import WorkerLoop

LONG = (
    "In the valley below the mountain, the river ran past the old mill, where the miller's "
    "children kept a garden of beans and tomatoes, and every evening the light over the "
    "water turned the color of copper while the swallows came down to drink. "
)


@pytest.fixture(scope="module")
def engines(share_loaded_models):  # P and D share one loaded model (conftest.py)
    cfg = dict(kv_cache_memory="32MiB", max_num_seqs=8, dtype="float32", progress=False)
    return (
        EngineCore(EngineConfig(worker_id="p", **cfg)),
        EngineCore(EngineConfig(worker_id="d", **cfg)),
    )


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def local(engine: EngineCore, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request(rid, prompt, params)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


class Worker:
    def __init__(self, loop: WorkerLoop, drain: threading.Event, thread: threading.Thread):
        self.loop, self.drain, self.thread = loop, drain, thread


class Router:
    """The router end: one ROUTER socket, each worker loop in its own thread."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind(address)
        self.address = address
        self.workers: dict[str, Worker] = {}
        self.connectors = []

    def start(self, wid: str, engine: EngineCore, role: str = "both", *, kv: str | None = None,
              drain_timeout: float = 30.0) -> Worker:  # fmt: skip
        connector = None
        if kv is not None:
            connector = create_connector(kv, wid, engine.kv_cache, kv_layout(engine))
            self.connectors.append(connector)
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, wid.encode())
        dealer.connect(self.address)
        hello = m.Hello(
            worker_id=wid, role=role, model_name=engine.model_name,
            max_model_len=engine.max_model_len, vocab_size=engine.vocab_size, pid=0,
            block_size=16, kv_endpoint=connector.endpoint() if connector else None,
        )  # fmt: skip
        drain = threading.Event()
        loop = WorkerLoop(engine, dealer, hello, connector=connector, heartbeat_interval=0.2,
                          should_drain=drain.is_set, drain_timeout=drain_timeout)  # fmt: skip
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        w = self.workers[wid] = Worker(loop, drain, thread)
        assert isinstance(self.recv()[1], m.Hello)
        return w

    def send(self, wid: str, msg) -> None:
        self.sock.send_multipart([wid.encode(), m.encode(msg)])

    def recv(self, timeout: float = 60.0):
        assert self.sock.poll(int(timeout * 1000)), "no worker sent anything"
        ident, frame = self.sock.recv_multipart()
        return ident.decode(), m.decode_worker_message(frame)

    def collect(self, until, timeout: float = 120.0) -> list:
        """(worker id, message) pairs until `until(wid, msg)` is true."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wid, msg = self.recv(max(0.01, deadline - time.monotonic()))
            got.append((wid, msg))
            if until(wid, msg):
                return got
        raise AssertionError(f"timed out; got {[type(x).__name__ for _, x in got][-20:]}")

    def quiet(self, seconds: float) -> list:
        """Every message of the next `seconds`."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000)):
                ident, frame = self.sock.recv_multipart()
                got.append((ident.decode(), m.decode_worker_message(frame)))
        return got

    def close(self) -> None:
        for wid, w in self.workers.items():
            if w.thread.is_alive():
                self.send(wid, m.Shutdown())
        for w in self.workers.values():
            w.thread.join(30)
            assert not w.thread.is_alive()
        for c in self.connectors:
            c.close()
        for w in self.workers.values():
            w.loop.socket.close(0)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def router(engines, tmp_path):
    r = Router(f"ipc://{tmp_path}/ctl.sock")
    yield r
    r.close()
    for e in engines:
        e.check_integrity()
        assert e.kv.num_requests == 0 and e.kv.num_free_blocks == e.kv.num_blocks


def outputs_of(got: list) -> dict[str, list]:
    """request id -> [tokens, finish reason] from StepOutputs frames."""
    res: dict[str, list] = {}
    for _, msg in got:
        if isinstance(msg, m.StepOutputs):
            for out in msg.outputs:
                r = res.setdefault(out.request_id, [[], None])
                r[0] += out.new_token_ids
                r[1] = out.finish_reason or r[1]
    return res


def until_finished(router: Router, got: list, *ids: str) -> None:
    """Collect into `got` until every one of `ids` has finished."""

    def finished() -> bool:
        outs = outputs_of(got)
        return all(outs.get(rid, [0, None])[1] for rid in ids)

    if not finished():
        router.collect(lambda wid, msg: got.append((wid, msg)) or finished())


def goodbye(_wid, msg) -> bool:
    return isinstance(msg, m.Goodbye)


def test_a_draining_worker_finishes_what_it_holds_and_leaves_after_the_ack(router, engines):
    eng = engines[1]
    w = router.start("w", eng)
    prompt = eng.tokenizer.encode("Once upon a time")
    router.send("w", m.AddRequest(request_id="r0", prompt_token_ids=prompt, params=greedy(24)))
    got = router.collect(lambda _, msg: isinstance(msg, m.StepOutputs))
    w.drain.set()  # SIGTERM
    got += router.collect(lambda _, msg: isinstance(msg, m.Draining))
    assert got[-1][1].timeout_s == 30.0
    # Routed before the router heard of the drain: still served.
    router.send("w", m.AddRequest(request_id="late", prompt_token_ids=prompt, params=greedy(8)))
    until_finished(router, got, "late", "r0")
    # Idle, but without the ack something may still be on its way: it stays (and heartbeats).
    more = router.quiet(1.0)
    assert more and not any(isinstance(x, m.Goodbye) for _, x in more)
    assert w.thread.is_alive()
    router.send("w", m.DrainAck())
    got += more + router.collect(goodbye, timeout=10)
    assert got[-1][1].reason == "drained"
    w.thread.join(10)
    assert not w.thread.is_alive()
    outs = outputs_of(got)
    assert [len(outs["r0"][0]), len(outs["late"][0])] == [24, 8]
    assert outs["r0"][1] == outs["late"][1] == "length"
    assert outs["late"][0] == outs["r0"][0][:8]  # greedy, same prompt


def test_the_drain_timeout_ends_what_still_runs(router, engines):
    eng = engines[1]
    w = router.start("w", eng, drain_timeout=1.0)
    prompt = eng.tokenizer.encode("Tell me a very long story.")
    router.send("w", m.AddRequest(request_id="long", prompt_token_ids=prompt, params=greedy(400)))
    router.collect(lambda _, msg: isinstance(msg, m.StepOutputs))
    t0 = time.monotonic()
    w.drain.set()
    router.collect(lambda _, msg: isinstance(msg, m.Draining))
    router.send("w", m.DrainAck())
    got = router.collect(goodbye, timeout=30)
    took = time.monotonic() - t0
    assert 0.9 < took < 10, took
    reason = got[-1][1].reason
    assert reason.startswith("drain timed out after 1s with 1 requests"), reason
    assert outputs_of(got).get("long", [[], None])[1] is None  # never finished: the router
    w.thread.join(10)  # ends it with an error naming the reason
    assert not w.thread.is_alive() and not w.loop.live


def test_without_a_router_ack_an_idle_draining_worker_still_leaves(router, engines, monkeypatch):
    monkeypatch.setattr(loop_mod, "DRAIN_ACK_WAIT_S", 0.5)
    w = router.start("w", engines[1])
    w.drain.set()
    got = router.collect(goodbye, timeout=10)
    assert any(isinstance(x, m.Draining) for _, x in got) and got[-1][1].reason == "drained"


def remote_prefill_setup(router, engines, text: str, *, drain_timeout: float):
    p_eng, d_eng = engines
    prompt = p_eng.tokenizer.encode(text)
    params = greedy(6)
    ref = local(p_eng, "ref", prompt, params)
    p = router.start("p", p_eng, "prefill", kv="zmq", drain_timeout=drain_timeout)
    router.start("d", d_eng, "decode", kv="zmq")
    router.send("p", m.AddPeers(endpoints=[router.workers["d"].loop.hello.kv_endpoint]))
    router.send("d", m.AddPeers(endpoints=[p.loop.hello.kv_endpoint]))
    router.send("d", m.ReserveRemote(request_id="x", prompt_token_ids=prompt, params=params,
                                     lease_s=30.0, grace_s=1.0))  # fmt: skip
    res = router.collect(lambda _, msg: isinstance(msg, m.Reserved))[-1][1]
    assert res.ok
    remote = m.RemotePrefill(
        request_id="x", prompt_token_ids=prompt, params=params, decode_worker="d",
        first_block=res.first_block, block_ids=res.block_ids, lease_s=30.0,
        deadline=res.deadline,
    )  # fmt: skip
    return p, remote, ref


def test_a_draining_prefill_worker_sends_the_kv_it_owes_before_leaving(router, engines):
    p, remote, ref = remote_prefill_setup(router, engines, "Drain P. " + LONG * 2, drain_timeout=30)
    p.drain.set()
    router.collect(lambda wid, msg: wid == "p" and isinstance(msg, m.Draining))
    router.send("p", remote)  # routed before the router heard: still computed and sent
    router.send("p", m.DrainAck())
    got = router.collect(lambda wid, msg: wid == "p" and isinstance(msg, m.Goodbye))
    until_finished(router, got, "x")
    from_p = [x for wid, x in got if wid == "p" and not isinstance(x, m.Heartbeat)]
    done = [x for x in from_p if isinstance(x, m.PrefillDone)]
    assert len(done) == 1 and from_p[-1].reason == "drained"
    (o,) = done[0].outcomes
    assert o.ok and o.started and o.nbytes > 0
    assert outputs_of(got)["x"][0] == ref
    p.thread.join(10)
    assert not p.thread.is_alive()


def test_a_prefill_worker_at_its_drain_timeout_leaves_no_write_unaccounted(router, engines):
    """Whether the send finished before the deadline or never started, the router hears one
    clean outcome before Goodbye, and the request still ends with the right tokens."""
    p, remote, ref = remote_prefill_setup(
        router, engines, "Drain P late. " + LONG * 3, drain_timeout=0.01
    )
    p.drain.set()
    router.send("p", remote)
    router.send("p", m.DrainAck())
    got = router.collect(lambda wid, msg: wid == "p" and isinstance(msg, m.Goodbye))
    done = [o for wid, x in got if isinstance(x, m.PrefillDone) for o in x.outcomes]
    assert len(done) == 1, done
    (o,) = done
    if not o.ok:  # what the router does: D prefills locally; nothing was written
        assert not o.started
        router.send("d", m.CancelRemoteKV(request_ids=["x"], writer_gone=True))
    until_finished(router, got, "x")
    assert outputs_of(got)["x"][0] == ref


# ---------------------------------------------------------------- the router's side


def test_the_router_routes_nothing_new_to_a_draining_worker(tmp_path):
    """A real `Cluster` on its socket, the test speaking for the workers (no model runs)."""
    import asyncio

    from router.disagg_policy import DisaggConfig
    from tests.test_router_cluster import LONG, PARAMS, Harness, run

    async def main():
        async with Harness(tmp_path, DisaggConfig(mode="always")) as h:
            d0, d1 = await h.join("d0", "decode"), await h.join("d1", "decode")
            p0, p1 = await h.join("p0", "prefill"), await h.join("p1", "prefill")
            reg = h.cluster.registry
            # d1 holds two requests when it begins to drain.
            streams = [h.cluster.submit([(f"r{i}", LONG, PARAMS)]) for i in range(4)]
            held, unfinished = [s for s in streams if s.worker_id == "d1"][:2]
            for s in streams:
                if s not in (held, unfinished):
                    h.cluster.release(s)
            await d1.send(m.Draining(worker_id="d1", timeout_s=30.0))
            await d1.expect(m.DrainAck)
            assert reg.workers["d1"].draining and reg.all_ready()
            assert [w.worker_id for w in reg.ready_decoders()] == ["d0"]
            streams = [h.cluster.submit([(f"n{i}", LONG, PARAMS)]) for i in range(6)]
            assert {s.worker_id for s in streams} == {"d0"}
            # What it holds is still its own: the client's abort reaches it.
            h.cluster.release(held)
            assert (await d1.expect(m.AbortRequests)).request_ids == held.request_ids

            # A prefill worker that drains after it was planned for a request is not asked:
            # the request goes to the other one.
            for s in streams:
                h.cluster.release(s)
            s = h.cluster.submit([("x", LONG, PARAMS)])
            planned = h.cluster._routes["x"].prefill
            drainer, other = (p0, p1) if planned == "p0" else (p1, p0)
            await drainer.send(m.Draining(worker_id=drainer.wid, timeout_s=30.0))
            await drainer.expect(m.DrainAck)
            while (await d0.expect(m.ReserveRemote)).request_id != "x":
                pass  # the reservations of the requests released above
            await d0.send(m.Reserved(worker_id="d0", request_id="x", ok=True, block_ids=[1],
                                     lease_s=30.0, deadline=time.time() + 30))  # fmt: skip
            assert (await other.expect(m.RemotePrefill)).request_id == "x"
            assert not [x for x in drainer.seen if isinstance(x, m.RemotePrefill)]
            # d1 leaves at its drain timeout: what it still held ends with an error saying so;
            # d1 is forgotten, nothing of d0's is affected.
            why = "drain timed out after 30s with 1 requests and 0 prefills still running"
            await d1.send(m.Goodbye(worker_id="d1", reason=why))
            (err,) = await asyncio.wait_for(unfinished.get(), 10)
            assert err.status == 503 and why in err.message, err
            assert "d1" not in reg.workers
            assert s.open == {"x"} and reg.all_ready()

    run(main())
