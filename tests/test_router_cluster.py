"""The router's half of disaggregation, message by message: a real `Cluster` on its real ZMQ
socket, with the test speaking the worker side of the control protocol (as the worker-loop
tests speak the router side). No model runs, so every lifecycle state is reached on purpose
and each test takes milliseconds: routing decisions, reservations, remote prefill, aborts
reaching every holder in each state, a dead prefill worker's requests re-offered, KV-event
gaps repaired by a resync, workers joining and leaving, incompatible KV refused."""

from __future__ import annotations

import asyncio
import logging
import random

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from kvcache.block_hash import hash_prompt_blocks
from kvcache.events import BlockStored, KVEventBatch
from kvcache.transfer import CONNECTOR_VERSION, KVEndpoint, KVLayout
from router.cluster import Cluster, StreamError
from router.disagg_policy import DisaggConfig
from router.routes import Stage
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.metrics import StageMetrics
from server.worker import messages as m

PARAMS = SamplingParams(max_tokens=4, temperature=0.0)
LONG = list(range(1, 801))  # 800 tokens: beyond local_prefill_max_tokens (512)
SHORT = list(range(1, 41))


def endpoint(wid: str, block_size: int = 16) -> KVEndpoint:
    layout = KVLayout("m", "float32", block_size, 2, 2, 8)
    return KVEndpoint(wid, "zmq", CONNECTOR_VERSION, layout, 100, "DRAM", 0, 0,
                      zmq_address=f"tcp://127.0.0.1:1/{wid}")  # fmt: skip


class Peer:
    """One worker, as far as the control plane can tell."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, wid: str, role: str) -> None:
        self.wid = wid
        self.role = role
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, wid.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.seen: list[m._Message] = []

    async def send(self, msg: m._Message) -> None:
        await self.sock.send(m.encode(msg))

    async def hello(self, block_size: int = 16) -> None:
        await self.send(m.Hello(
            worker_id=self.wid, role=self.role, model_name="m", max_model_len=4096,
            vocab_size=1000, pid=1, num_blocks=100, block_size=block_size, max_num_seqs=8,
            kv_endpoint=endpoint(self.wid, block_size),
        ))  # fmt: skip

    async def expect(self, kind: type, timeout: float = 10.0):
        """The next message of `kind` (others are kept in `seen`)."""

        async def first():
            while True:
                msg = m.decode_router_message(await self.sock.recv())
                if isinstance(msg, kind):
                    return msg
                self.seen.append(msg)

        return await asyncio.wait_for(first(), timeout)

    async def output(self, rid: str, token: int = 7, finish: str | None = None) -> None:
        await self.send(m.StepOutputs(
            worker_id=self.wid, outputs=[RequestOutput(rid, [token], finish_reason=finish)]
        ))  # fmt: skip


class Harness:
    def __init__(self, tmp_path, cfg: DisaggConfig = DisaggConfig()) -> None:
        self.address = f"ipc://{tmp_path}/ctl.sock"
        self.registry = CollectorRegistry()
        self.cluster = Cluster(self.address, disagg=cfg, lease_s=30.0,
                               metrics=StageMetrics(self.registry), rng=random.Random(0))  # fmt: skip
        self.ctx = zmq.asyncio.Context()
        self.peers: list[Peer] = []

    async def __aenter__(self) -> Harness:
        self.cluster.bind()
        await self.cluster.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cluster.close(timeout=0)
        for p in self.peers:
            p.sock.close(0)
        self.ctx.term()

    async def join(self, wid: str, role: str, block_size: int = 16, wait: bool = True) -> Peer:
        peer = Peer(self.ctx, self.address, wid, role)
        self.peers.append(peer)
        await peer.hello(block_size)
        if wait:
            await until(lambda: self.state(wid) == "ready")
        return peer

    def state(self, wid: str):
        info = self.cluster.registry.workers.get(wid)
        return info.state.value if info is not None else None

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value("pdserve:" + name, labels) or 0.0


async def until(cond, timeout: float = 10.0) -> None:
    async def poll():
        while not cond():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def run(coro) -> None:
    asyncio.run(coro)


def test_long_prompts_are_prefilled_remotely_short_ones_locally(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            d = await h.join("d0", "decode")
            p = await h.join("p0", "prefill")
            assert (await p.expect(m.AddPeers)).endpoints[0].worker_id == "d0"
            assert (await d.expect(m.AddPeers)).endpoints[0].worker_id == "p0"

            stream = h.cluster.submit([("long-0", LONG, PARAMS)])
            assert stream.worker_id == "d0"
            res = await d.expect(m.ReserveRemote)
            assert (res.request_id, res.prompt_token_ids, res.lease_s) == ("long-0", LONG, 30.0)
            await d.send(
                m.Reserved(
                    worker_id="d0",
                    request_id="long-0",
                    ok=True,
                    first_block=0,
                    block_ids=list(range(50)),
                    lease_s=30.0,
                    deadline=1234.5,
                )
            )
            rp = await p.expect(m.RemotePrefill)
            assert (rp.decode_worker, rp.first_block, rp.block_ids) == ("d0", 0, list(range(50)))
            assert (rp.lease_s, rp.deadline) == (30.0, 1234.5)  # D's lease, D's clock
            workers = h.cluster.registry.workers
            assert workers["p0"].prefill_inflight == 1
            assert (workers["p0"].prefill_backlog, workers["d0"].prefill_backlog) == (800, 0)
            await p.send(
                m.PrefillDone(
                    worker_id="p0",
                    outcomes=[
                        m.PrefillOutcome(
                            "long-0",
                            True,
                            nbytes=4096,
                            num_descriptors=1,
                            transfer_seconds=0.001,
                            prefill_seconds=0.5,
                        ),
                    ],
                )
            )
            await d.output("long-0", finish="length")
            (out,) = await stream.get()
            assert out.new_token_ids == [7] and not stream.open
            assert (workers["p0"].prefill_inflight, workers["p0"].prefill_backlog) == (0, 0)

            stream = h.cluster.submit([("short-0", SHORT, PARAMS)])
            add = await d.expect(m.AddRequest)
            assert add.request_id == "short-0"
            assert workers["d0"].prefill_backlog == len(SHORT)
            h.cluster.release(stream)
            assert (await d.expect(m.AbortRequests)).request_ids == ["short-0"]
            assert workers["d0"].prefill_backlog == 0

            assert h.metric("disagg_decision_total", decision="remote_long") == 1
            assert h.metric("disagg_decision_total", decision="local_short") == 1
            assert h.metric("kv_transfer_bytes_total", worker_id="p0") == 4096
            assert h.metric("kv_transfer_seconds_count", worker_id="p0") == 1
            assert h.metric("router_queue_time_seconds_count", path="remote") == 1
            assert h.metric("router_queue_time_seconds_count", path="local") == 1
            assert h.metric("decode_queue_time_seconds_count", path="remote") == 1

    run(main())


def test_prefill_backlogs_balance_long_prompts_between_prefill_and_decode_worker(tmp_path):
    """Conditional mode: a long prompt goes remote while the prefill worker's token backlog is
    within the slack (1024) of the decode worker's; the backlogs drain as first tokens come
    out (local) or the prefill worker reports (remote)."""

    async def main():
        async with Harness(tmp_path) as h:
            d = await h.join("d0", "decode")
            await h.join("p0", "prefill")
            workers = h.cluster.registry.workers
            streams = [h.cluster.submit([(f"long-{i}", LONG, PARAMS)]) for i in range(4)]
            # P: 800 -> remote, 1600 (<= 800 + 1024) -> remote, then 2400 > 1824 -> local,
            # then 2400 <= 1600 + 1024 -> remote again
            assert h.metric("disagg_decision_total", decision="remote_long") == 3
            assert h.metric("disagg_decision_total", decision="local_sooner") == 1
            assert (workers["p0"].prefill_backlog, workers["d0"].prefill_backlog) == (2400, 800)
            assert (await d.expect(m.AddRequest)).request_id == "long-2"
            await d.output("long-2")
            await until(lambda: workers["d0"].prefill_backlog == 0)
            for s in streams:
                h.cluster.release(s)
            assert workers["p0"].prefill_backlog == 0 and workers["p0"].prefill_inflight == 0

    run(main())


def test_no_room_or_a_failed_prefill_means_a_local_prefill(tmp_path):
    async def main():
        async with Harness(tmp_path, DisaggConfig(mode="always")) as h:
            d = await h.join("d0", "decode")
            p = await h.join("p0", "prefill")
            h.cluster.submit([("a", SHORT, PARAMS)])
            await d.expect(m.ReserveRemote)
            await d.send(m.Reserved(worker_id="d0", request_id="a", ok=False, reason="no room"))
            assert (await d.expect(m.AddRequest)).request_id == "a"

            h.cluster.submit([("b", SHORT, PARAMS)])
            await d.expect(m.ReserveRemote)
            await d.send(
                m.Reserved(worker_id="d0", request_id="b", ok=True, block_ids=[1, 2], lease_s=30.0)
            )
            await p.expect(m.RemotePrefill)
            await p.send(
                m.PrefillDone(
                    worker_id="p0",
                    outcomes=[
                        m.PrefillOutcome("b", False, error="NIXL transfer failed", started=True),
                    ],
                )
            )
            cancel = await d.expect(m.CancelRemoteKV)
            assert cancel.request_ids == ["b"] and cancel.writer_gone
            assert h.metric("disagg_fallback_total", reason="no_room") == 1
            assert h.metric("disagg_fallback_total", reason="prefill_failed") == 1
            assert h.metric("kv_transfer_failures_total", worker_id="p0") == 1

    run(main())


def test_abort_reaches_every_holder_in_each_state(tmp_path):
    async def main():
        async with Harness(tmp_path, DisaggConfig(mode="always")) as h:
            d = await h.join("d0", "decode")
            p = await h.join("p0", "prefill")
            # Queued at the router (its reservation pending): D frees the blocks, no writer.
            s1 = h.cluster.submit([("q", SHORT, PARAMS)])
            await d.expect(m.ReserveRemote)
            h.cluster.release(s1)
            assert (await d.expect(m.AbortRequests)).request_ids == ["q"]
            cancel = await d.expect(m.CancelRemoteKV)
            assert cancel.request_ids == ["q"] and cancel.writer_gone
            # ...and the late answer is cancelled too (nobody will be asked to write).
            await d.send(
                m.Reserved(worker_id="d0", request_id="q", ok=True, block_ids=[3], lease_s=30.0)
            )
            assert (await d.expect(m.CancelRemoteKV)).request_ids == ["q"]

            # Prefilling: both holders hear of it; P's "wrote nothing" frees D's blocks.
            s2 = h.cluster.submit([("pf", SHORT, PARAMS)])
            await d.expect(m.ReserveRemote)
            await d.send(
                m.Reserved(worker_id="d0", request_id="pf", ok=True, block_ids=[4], lease_s=30.0)
            )
            await p.expect(m.RemotePrefill)
            assert h.cluster._routes["pf"].stage is Stage.PREFILLING
            h.cluster.release(s2)
            assert (await d.expect(m.AbortRequests)).request_ids == ["pf"]
            assert (await p.expect(m.AbortRequests)).request_ids == ["pf"]
            await p.send(m.PrefillDone(worker_id="p0", outcomes=[
                m.PrefillOutcome("pf", False, error="aborted")]))  # fmt: skip
            cancel = await d.expect(m.CancelRemoteKV)
            assert cancel.request_ids == ["pf"] and cancel.writer_gone

            # Decoding: only D holds it.
            s3 = h.cluster.submit([("dec", SHORT, PARAMS)])
            await d.expect(m.ReserveRemote)
            await d.send(
                m.Reserved(worker_id="d0", request_id="dec", ok=True, block_ids=[5], lease_s=30.0)
            )
            await p.expect(m.RemotePrefill)
            await p.send(m.PrefillDone(worker_id="p0", outcomes=[m.PrefillOutcome("dec", True)]))
            await d.output("dec")
            await until(lambda: h.cluster._routes["dec"].stage is Stage.DECODING)
            h.cluster.release(s3)
            assert (await d.expect(m.AbortRequests)).request_ids == ["dec"]
            assert not h.cluster._routes and not h.cluster._orphans
            assert h.cluster.registry.workers["p0"].prefill_inflight == 0
            assert h.cluster.registry.workers["d0"].inflight == 0

    run(main())


def test_a_dead_prefill_workers_requests_go_to_another_then_local(tmp_path):
    async def main():
        async with Harness(tmp_path, DisaggConfig(mode="always")) as h:
            d = await h.join("d0", "decode")
            p0 = await h.join("p0", "prefill")
            p1 = await h.join("p1", "prefill")
            stream = h.cluster.submit([("r", LONG, PARAMS)])
            await d.expect(m.ReserveRemote)
            await d.send(
                m.Reserved(worker_id="d0", request_id="r", ok=True, block_ids=[1, 2], lease_s=30.0)
            )
            first = p0 if h.cluster._routes["r"].prefill == "p0" else p1
            other = p1 if first is p0 else p0
            await first.expect(m.RemotePrefill)
            await first.send(m.Goodbye(worker_id=first.wid, reason="killed"))
            # D is asked whether the KV is still missing; it re-offers the same blocks.
            assert (await d.expect(m.RetryPrefill)).request_ids == ["r"]
            assert (await d.expect(m.RemovePeer)).worker_id == first.wid
            await d.send(
                m.Reserved(
                    worker_id="d0",
                    request_id="r",
                    ok=True,
                    block_ids=[1, 2],
                    lease_s=20.0,
                    retry=True,
                )
            )
            rp = await other.expect(m.RemotePrefill)
            assert rp.block_ids == [1, 2] and rp.lease_s == 20.0
            assert h.metric("remote_prefill_retries_total") == 1
            # The second one dies too: nobody is left, D prefills (the dead may still write).
            await other.send(m.Goodbye(worker_id=other.wid, reason="killed"))
            await d.expect(m.RetryPrefill)
            await d.send(
                m.Reserved(
                    worker_id="d0",
                    request_id="r",
                    ok=True,
                    block_ids=[1, 2],
                    lease_s=19.0,
                    retry=True,
                )
            )
            cancel = await d.expect(m.CancelRemoteKV)
            assert cancel.request_ids == ["r"] and not cancel.writer_gone
            await d.output("r", finish="length")
            (out,) = await stream.get()
            assert out.finish_reason == "length"
            assert "p0" not in h.cluster.registry.workers  # joined on their own: forgotten
            assert h.cluster.registry.all_ready()

    run(main())


def test_a_dead_decode_worker_ends_its_requests_and_aborts_their_prefills(tmp_path):
    async def main():
        async with Harness(tmp_path, DisaggConfig(mode="always")) as h:
            d = await h.join("d0", "decode")
            p = await h.join("p0", "prefill")
            stream = h.cluster.submit([("r", SHORT, PARAMS)])
            await d.expect(m.ReserveRemote)
            await d.send(
                m.Reserved(worker_id="d0", request_id="r", ok=True, block_ids=[1], lease_s=30.0)
            )
            await p.expect(m.RemotePrefill)
            await d.send(m.Goodbye(worker_id="d0", reason="killed"))
            (err,) = await stream.get()
            assert isinstance(err, StreamError) and err.status == 503
            assert (await p.expect(m.AbortRequests)).request_ids == ["r"]
            assert (await p.expect(m.RemovePeer)).worker_id == "d0"

    run(main())


def test_kv_event_gaps_are_repaired_by_a_resync_and_hits_steer_routing(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            d0 = await h.join("d0", "decode")
            await h.join("d1", "decode")
            hashes = hash_prompt_blocks(LONG, 16)
            stored = BlockStored(hashes, None, LONG[: len(hashes) * 16], 16)
            await d0.send(m.KVEvents(batch=KVEventBatch("d0", 0, 0.0, [stored])))
            await until(lambda: h.cluster.index.match("d0", hashes) == len(hashes))
            for i in range(3):  # every request goes where its prefix is
                stream = h.cluster.submit([(f"hit-{i}", LONG, PARAMS)])
                assert stream.worker_id == "d0"
                h.cluster.release(stream)

            await d0.send(m.KVEvents(batch=KVEventBatch("d0", 2, 0.0, [])))  # seq 1 was lost
            await d0.expect(m.ResyncKV)
            await d0.send(m.KVEvents(batch=KVEventBatch("d0", 3, 0.0, [])))  # before the answer
            await until(lambda: h.metric("kv_event_gaps_total") == 1)
            assert h.cluster.index.match("d0", hashes) == 0  # stale: not trusted
            await d0.send(m.KVSnapshot(worker_id="d0", block_hashes=hashes[:10], next_seq=4))
            await until(lambda: h.cluster.index.match("d0", hashes) == 10)
            await d0.send(m.KVEvents(batch=KVEventBatch("d0", 4, 0.0, [stored])))
            await until(lambda: h.cluster.index.match("d0", hashes) == len(hashes))
            assert not any(isinstance(x, m.ResyncKV) for x in d0.seen)  # asked once only

    run(main())


def test_workers_join_and_leave_and_incompatible_kv_is_refused(tmp_path, caplog):
    async def main():
        async with Harness(tmp_path) as h:
            d = await h.join("d0", "decode")
            p = await h.join("p0", "prefill")
            await d.expect(m.AddPeers)
            await p.send(m.Goodbye(worker_id="p0", reason="signal"))
            assert (await d.expect(m.RemovePeer)).worker_id == "p0"
            await until(lambda: "p0" not in h.cluster.registry.workers)
            assert h.cluster.registry.all_ready()  # a clean leave leaves a healthy cluster

            with caplog.at_level(logging.ERROR, logger="router.cluster"):
                bad = await h.join("p9", "prefill", block_size=32, wait=False)
                await bad.expect(m.Shutdown)
            assert "block_size: 16 here vs 32 there" in caplog.text
            assert "p9" not in h.cluster.registry.workers and h.cluster.registry.all_ready()

            again = await h.join("p1", "prefill")  # a new one joins the running router
            assert [e.worker_id for e in (await again.expect(m.AddPeers)).endpoints] == ["d0"]
            assert (await d.expect(m.AddPeers)).endpoints[0].worker_id == "p1"

    run(main())


def test_integrity_reports_are_gathered_from_every_worker(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            d = await h.join("d0", "decode")
            task = asyncio.create_task(h.cluster.check_integrity(timeout=10))
            await d.expect(m.CheckIntegrity)
            await d.send(
                m.IntegrityReport(worker_id="d0", ok=True, num_blocks=9, num_free_blocks=9)
            )
            reports = await task
            assert reports["d0"].ok and reports["d0"].num_free_blocks == 9

    run(main())


def test_prefill_workers_alone_cannot_serve(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.join("p0", "prefill")
            assert not h.cluster.admission(1, 0).admitted
            assert h.cluster.admission(1, 0).status == 503

    run(main())


def test_a_submit_that_fails_midway_leaves_nothing_behind(tmp_path):
    """The second child's message cannot be encoded (a seed past msgpack's range: the API
    rejects it first, but the router must not rely on that). Nothing of the submit stays: no
    open request, in-flight count or backlog, and the worker that already got the first child
    is told to abort it. (Such a failure used to leave the first child routed forever.)"""

    async def main():
        async with Harness(tmp_path) as h:
            d = await h.join("d0", "both")
            bad = SamplingParams(max_tokens=4, seed=2**70)
            try:
                h.cluster.submit([("a", SHORT, PARAMS), ("b", SHORT, bad)])
            except OverflowError:
                pass
            else:
                raise AssertionError("the unencodable child was sent")
            info = h.cluster.registry.workers["d0"]
            assert h.cluster.num_open_requests() == 0
            assert (info.inflight, info.prefill_backlog) == (0, 0)
            assert (await d.expect(m.AddRequest)).request_id == "a"
            assert "a" in (await d.expect(m.AbortRequests)).request_ids
            h.cluster.submit([("c", SHORT, PARAMS)])
            assert (await d.expect(m.AddRequest)).request_id == "c"
            assert info.inflight == 1 and h.cluster.num_open_requests() == 1

    run(main())
