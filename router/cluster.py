"""The router's side of the control plane: one ZMQ ROUTER socket, every worker behind it.

`Cluster` runs on the API process's asyncio loop. It routes each new request (a decode worker
D, and whether the prompt is prefilled on D or on a prefill worker P: `router.disagg_policy`
over snapshots built from the registry and the prefix index), drives remote prefills through
their stages (`router.routes`), forwards aborts to every holder, turns each worker's
`StepOutputs` into per-request `RequestStream`s, and watches worker health: a worker whose
process exits, whose heartbeats stop, or that says Goodbye is marked dead; every request it
was decoding ends with a `StreamError` (the client gets an error, never a hang), and every
request it was prefilling is re-offered to another prefill worker or prefilled by its decode
worker. Workers may join (Hello) and leave at any time: the router hands each newcomer's KV
endpoint to the others (`AddPeers`) and withdraws a leaver's (`RemovePeer`). A worker that
drains (SIGTERM: `Draining`) gets no new work from then on, and a `DrainAck` saying so; it
finishes what it holds and leaves with Goodbye.

Ownership: whoever `submit`s a stream must `release` it when done (a `finally`), which aborts
any engine request still open in its workers; `release` is idempotent and cheap. All methods
are called from the event loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple, cast

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from kvcache.transfer import endpoint_problems
from router.admission import Admission, admit
from router.disagg_policy import DisaggConfig, decide
from router.prefix_index import PrefixIndex
from router.registry import HandshakeMismatch, WorkerInfo, WorkerRegistry, WorkerState
from router.routes import Orphan, PromptHashes, Route, Stage, snapshot
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.metrics import StageMetrics
from server.worker import messages as m
from server.worker.spawn import WorkerProcess

logger = logging.getLogger(__name__)

# A retried or re-routed remote prefill needs at least this much lease left to be worth it.
MIN_LEASE_S = 1.0


class StreamError(NamedTuple):
    """Ends one engine request without output: the engine refused it, or its worker died."""

    request_id: str
    message: str
    status: int  # HTTP status to report: 400 refused input, 503 worker failure


class NoWorkerAvailable(RuntimeError):
    pass


class RequestStream:
    """Outputs of one API request's engine requests (its `n` children), in arrival order.

    `open` holds the children still running in their worker; an item ending a child (a final
    `RequestOutput` or a `StreamError`) removes it before the consumer sees the item."""

    __slots__ = ("request_ids", "worker_id", "open", "_queue")

    def __init__(self, request_ids: list[str], worker_id: str) -> None:
        self.request_ids = request_ids
        self.worker_id = worker_id
        self.open: set[str] = set(request_ids)
        self._queue: asyncio.Queue[RequestOutput | StreamError] = asyncio.Queue()

    def _push(self, item: RequestOutput | StreamError) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> list[RequestOutput | StreamError]:
        """Wait for at least one item; return every item queued so far."""
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items


class Cluster:
    def __init__(
        self,
        address: str,
        registry: WorkerRegistry | None = None,
        *,
        heartbeat_timeout: float = 60.0,
        start_timeout: float = 600.0,
        monitor_interval: float = 0.1,
        disagg: DisaggConfig | None = None,
        lease_s: float = 30.0,
        grace_s: float = 5.0,
        metrics: StageMetrics | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.registry = registry or WorkerRegistry(clock=clock)
        self.heartbeat_timeout = heartbeat_timeout
        self.start_timeout = start_timeout
        self.monitor_interval = monitor_interval
        self.disagg = disagg or DisaggConfig()
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.metrics = metrics or StageMetrics(CollectorRegistry())
        self.rng = rng or random.Random(0)
        self.clock = clock
        self.index = PrefixIndex()
        self.processes: dict[str, WorkerProcess] = {}
        self.ready_event = asyncio.Event()
        # Called once per worker death with (info, reason); info.state tells what it was before.
        self.on_worker_dead: list[Callable[[WorkerInfo, str, WorkerState], None]] = []
        self._streams: dict[str, RequestStream] = {}  # engine request id -> stream
        self._routes: dict[str, Route] = {}  # engine request id -> its stage (open ones)
        self._orphans: dict[str, Orphan] = {}  # aborted while a prefill worker had them
        self._resyncing: set[str] = set()  # workers asked for a KV snapshot
        self._integrity: dict[str, asyncio.Future] = {}
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._pending_sends: set[asyncio.Future] = set()
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Bind the socket (before workers are spawned, so their connect finds it)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise, never vanish
        sock.bind(self.address)
        self._sock = sock

    def attach_process(self, proc: WorkerProcess) -> None:
        self.processes[proc.worker_id] = proc
        self.registry.expect(proc.worker_id, proc.role)

    async def start(self) -> None:
        if self._sock is None:
            self.bind()
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="cluster-recv"),
            asyncio.create_task(self._monitor_loop(), name="cluster-monitor"),
        ]

    async def close(self, timeout: float = 10.0) -> None:
        """Ask every live worker to shut down and wait (up to `timeout`) for their processes."""
        self._closing = True
        for w in self.registry.ready():
            self._send(w.worker_id, m.Shutdown())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            p.exit_code() is None for p in self.processes.values()
        ):
            await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for info in list(self.registry.workers.values()):
            self._fail_worker(info.worker_id, "server shutting down")
        if self._sock is not None:
            self._sock.close(linger=0)
        self._ctx.term()

    @property
    def closing(self) -> bool:
        """True once `close()` has begun (worker exits are expected from then on)."""
        return self._closing

    # ------------------------------------------------------------------ requests

    def admission(self, num_requests: int, max_pending: int) -> Admission:
        return admit(
            len(self.registry.ready_decoders()),
            self.registry.total_inflight(),
            num_requests,
            max_pending,
        )

    def submit(
        self,
        children: Sequence[tuple[str, list[int], SamplingParams]],
        arrival: float | None = None,
    ) -> RequestStream:
        """Route one engine request per (request_id, prompt_token_ids, params), all decoded
        by one worker (so `n` copies of a prompt share its prefix blocks); each child's prompt
        is prefilled there or on a prefill worker, as `decide` says. Raises
        NoWorkerAvailable."""
        ids = [rid for rid, _, _ in children]
        if len(set(ids)) != len(ids) or any(rid in self._streams for rid in ids):
            raise ValueError(f"duplicate request id among {ids}")
        arrival = self.clock() if arrival is None else arrival
        decoders = self.registry.ready_decoders()
        if not decoders:
            raise NoWorkerAvailable("no inference worker is ready")
        stream: RequestStream | None = None
        try:
            for rid, prompt_token_ids, params in children:
                hashes = PromptHashes(prompt_token_ids)
                pool = decoders if stream is None else [self.registry.workers[stream.worker_id]]
                d = self._decide(rid, prompt_token_ids, hashes, pool, params)
                if stream is None:
                    stream = RequestStream(ids, d.decode_worker)
                route = Route(rid, prompt_token_ids, params, arrival, d.decode_worker)
                self._streams[rid] = stream
                self._routes[rid] = route
                self.registry.workers[d.decode_worker].inflight += 1
                if d.prefill_worker is None:
                    local_all = params.prompt_logprobs is not None  # no prefix hits: all computed
                    self._prefill_locally(route, None if local_all else d.inputs["tokens_left"])
                else:
                    route.stage, route.path, route.sent_at = Stage.RESERVING, "remote", self.clock()
                    self._set_prefill(route, d.prefill_worker)
                    hit_tokens = d.inputs["prefill_hit_blocks"] * d.inputs["block_size"]
                    self._charge(route, d.prefill_worker, len(prompt_token_ids) - hit_tokens)
                    self._send(
                        route.decode,
                        m.ReserveRemote(
                            request_id=rid, prompt_token_ids=prompt_token_ids, params=params,
                            lease_s=self.lease_s, grace_s=self.grace_s,
                        ),
                    )  # fmt: skip
        except BaseException:
            # Whatever failed (a message that cannot be encoded, a decision error), nothing of
            # this submit may stay behind: no route, no in-flight count, no charged backlog, and
            # a worker that already got a child aborts it.
            if stream is not None:
                self.abort(stream)
            raise
        assert stream is not None
        return stream

    def _decide(
        self, rid: str, prompt: list[int], hashes: PromptHashes, pool: list[WorkerInfo],
        params: SamplingParams,
    ):  # fmt: skip
        decoders = [snapshot(w, self.index, hashes) for w in pool]
        prefillers = [
            snapshot(w, self.index, hashes)
            for w in self.registry.routable()
            if w.role != "decode" and w.kv_endpoint is not None
        ]
        block_size = next((w.hello.block_size for w in pool if w.hello), 16) or 16
        d = decide(len(prompt), block_size, decoders, prefillers, self.disagg, self.rng)
        if (
            d.prefill_worker is not None
            and self.registry.workers[d.decode_worker].kv_endpoint is None
        ):
            d = d._replace(prefill_worker=None, decision="local_no_prefill")
        if d.prefill_worker is not None and params.prompt_logprobs is not None:
            # the prompt's logits exist only where it is computed: the decode worker scores it
            d = d._replace(prefill_worker=None, decision="local_prompt_logprobs")
        self.metrics.decisions.labels(d.decision).inc()
        logger.debug("request %s: %s decode=%s prefill=%s inputs=%s",
                     rid, d.decision, d.decode_worker, d.prefill_worker, d.inputs)  # fmt: skip
        return d

    def _prefill_locally(self, route: Route, tokens: int | None = None) -> None:
        """`tokens`: what the decode worker computes (default: the whole prompt)."""
        route.stage = Stage.DECODING
        self._set_prefill(route, None)
        self._charge(route, route.decode, len(route.prompt_token_ids) if tokens is None else tokens)
        self._dispatched(route, "local")
        self._send(
            route.decode,
            m.AddRequest(request_id=route.request_id, prompt_token_ids=route.prompt_token_ids,
                         params=route.params),
        )  # fmt: skip

    def _dispatched(self, route: Route, path: str) -> None:
        if not route.dispatched:
            route.dispatched = True
            self.metrics.router_queue.labels(path).observe(max(0.0, self.clock() - route.arrival))

    def _set_prefill(self, route: Route, worker_id: str | None) -> None:
        """Move the route's prefill-worker claim (and that worker's outstanding count)."""
        if route.prefill is not None:
            info = self.registry.workers.get(route.prefill)
            if info is not None and info.prefill_inflight > 0:
                info.prefill_inflight -= 1
        route.prefill = worker_id
        if worker_id is not None:
            self.registry.workers[worker_id].prefill_inflight += 1

    def _charge(self, route: Route, worker_id: str | None, tokens: int = 0) -> None:
        """Move the prompt's tokens to `worker_id`'s prefill backlog (None: its prefill is
        over, or it is gone)."""
        if route.charged is not None:
            info = self.registry.workers.get(route.charged)
            if info is not None:
                info.prefill_backlog = max(info.prefill_backlog - route.charged_tokens, 0)
        route.charged, route.charged_tokens = worker_id, max(tokens, 0) if worker_id else 0
        if worker_id is not None:
            self.registry.workers[worker_id].prefill_backlog += route.charged_tokens

    def _cancel_remote(self, route: Route, reason: str, writer_gone: bool) -> None:
        """The remote prefill will not deliver: the decode worker computes the prompt."""
        self.metrics.fallbacks.labels(reason).inc()
        logger.info(
            "request %s: prefilling on %s instead (%s)", route.request_id, route.decode, reason
        )
        route.stage = Stage.DECODING
        self._set_prefill(route, None)
        self._charge(route, route.decode, len(route.prompt_token_ids))
        self._dispatched(route, "local")
        self._send(
            route.decode, m.CancelRemoteKV(request_ids=[route.request_id], writer_gone=writer_gone)
        )

    def _usable_prefill(self, worker_id: str | None, decode: str) -> bool:
        info = self.registry.workers.get(worker_id) if worker_id else None
        return (
            info is not None
            and info.state is WorkerState.READY
            and not info.draining
            and worker_id != decode
            and info.kv_endpoint is not None
        )

    def _start_remote_prefill(self, route: Route, reserved: m.Reserved) -> None:
        """D reserved `blocks`: ask the planned prefill worker, or another if it is gone."""
        p = route.prefill
        if not self._usable_prefill(p, route.decode):
            hashes = PromptHashes(route.prompt_token_ids)
            d = [snapshot(self.registry.workers[route.decode], self.index, hashes)]
            ps = [
                snapshot(w, self.index, hashes)
                for w in self.registry.ready()
                if w.role != "decode" and self._usable_prefill(w.worker_id, route.decode)
            ]
            always = dataclasses.replace(self.disagg, mode="always")
            hello = self.registry.workers[route.decode].hello
            assert hello is not None  # a worker that reserved blocks has said Hello
            block_size = hello.block_size
            p = decide(
                len(route.prompt_token_ids), block_size, d, ps, always, self.rng
            ).prefill_worker
        if p is None or reserved.lease_s < MIN_LEASE_S:
            why = "no_prefill_worker" if p is None else "lease_too_short"
            self._cancel_remote(route, why, writer_gone=not route.retried)
            return
        self._set_prefill(route, p)
        if route.charged != p:
            self._charge(route, p, len(route.prompt_token_ids))
        route.stage = Stage.PREFILLING
        self._dispatched(route, "remote")
        self._send(
            p,
            m.RemotePrefill(
                request_id=route.request_id, prompt_token_ids=route.prompt_token_ids,
                params=route.params, decode_worker=route.decode,
                first_block=reserved.first_block, block_ids=reserved.block_ids,
                lease_s=reserved.lease_s, deadline=reserved.deadline,
            ),
        )  # fmt: skip

    def abort(self, stream: RequestStream, request_ids: Sequence[str] | None = None) -> None:
        """Abort the given children (default: all still open) in every worker holding them;
        no output follows for them."""
        ids = [
            rid
            for rid in (stream.request_ids if request_ids is None else request_ids)
            if rid in stream.open
        ]
        if not ids:
            return
        to_decode: list[str] = []
        no_writer: list[str] = []
        to_prefill: dict[str, list[str]] = defaultdict(list)
        for rid in ids:
            route = self._routes.get(rid)
            if route is not None and route.stage is Stage.RESERVING:
                no_writer.append(rid)  # no prefill worker was asked yet
            elif (
                route is not None
                and route.stage is Stage.PREFILLING
                and route.prefill is not None
                and self._ready(route.prefill)
            ):
                to_prefill[route.prefill].append(rid)
                self._orphans[rid] = Orphan(route.decode, route.prefill, route.retried)
            to_decode.append(rid)
            self._close_child(stream, rid)
        if self._ready(stream.worker_id):
            self._send(stream.worker_id, m.AbortRequests(request_ids=to_decode))
            if no_writer:
                self._send(
                    stream.worker_id, m.CancelRemoteKV(request_ids=no_writer, writer_gone=True)
                )
        for wid, rids in to_prefill.items():
            self._send(wid, m.AbortRequests(request_ids=rids))

    release = abort  # the `finally` spelling: end whatever is still open

    def num_open_requests(self) -> int:
        return len(self._streams)

    def _ready(self, worker_id: str) -> bool:
        info = self.registry.workers.get(worker_id)
        return info is not None and info.state is WorkerState.READY

    def _close_child(self, stream: RequestStream, rid: str) -> None:
        stream.open.discard(rid)
        route = self._routes.pop(rid, None)
        if route is not None:
            self._set_prefill(route, None)
            self._charge(route, None)
        if self._streams.pop(rid, None) is not None:
            info = self.registry.workers.get(stream.worker_id)
            if info is not None and info.inflight > 0:
                info.inflight -= 1

    async def check_integrity(self, timeout: float = 30.0) -> dict[str, m.IntegrityReport]:
        """Ask every ready worker to check its KV cache; their reports by worker id (a worker
        that does not answer in time is left out)."""
        loop = asyncio.get_running_loop()
        futures = {}
        for w in self.registry.ready():
            fut = self._integrity.get(w.worker_id)
            if fut is None or fut.done():
                fut = self._integrity[w.worker_id] = loop.create_future()
                self._send(w.worker_id, m.CheckIntegrity())
            futures[w.worker_id] = fut
        done, _ = await asyncio.wait(futures.values(), timeout=timeout) if futures else ((), ())
        return {wid: f.result() for wid, f in futures.items() if f in done}

    # ------------------------------------------------------------------ socket

    def _send(self, worker_id: str, msg: m._Message) -> None:
        assert self._sock is not None
        # zmq.asyncio sends return asyncio Futures (typed as bare Awaitables)
        fut = cast(asyncio.Future, self._sock.send_multipart([worker_id.encode(), m.encode(msg)], copy=False))
        if not fut.done():  # only when the socket is momentarily busy; keep it referenced
            self._pending_sends.add(fut)
            fut.add_done_callback(self._pending_sends.discard)
        fut.add_done_callback(functools.partial(self._on_sent, worker_id=worker_id))

    def _on_sent(self, fut: asyncio.Future, *, worker_id: str) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._fail_worker(worker_id, f"unreachable: {exc}")

    async def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=True)
            worker_id = frames[0].decode(errors="replace")
            try:
                msg = m.decode_worker_message(frames[-1])
            except m.ProtocolError as exc:
                logger.error("dropped frame from worker %s: %s", worker_id, exc)
                continue
            try:
                self._handle(worker_id, msg)
            except Exception:  # never let one bad message stop the control plane
                logger.exception("error handling %s from worker %s", type(msg).__name__, worker_id)

    def _handle(self, worker_id: str, msg: m.WorkerMessage) -> None:
        if isinstance(msg, m.Hello):
            if msg.worker_id == worker_id:
                self._on_hello(msg)
            return
        if isinstance(msg, m.Goodbye):
            self._fail_worker(worker_id, f"worker exited ({msg.reason or 'goodbye'})")
            return
        stats = msg.stats if isinstance(msg, m.Heartbeat) else None
        if self.registry.on_seen(worker_id, stats) is None:
            return  # unknown or dead: nothing it says counts any more
        if isinstance(msg, m.StepOutputs):
            self._on_outputs(msg.outputs)
        elif isinstance(msg, m.RequestError):
            stream = self._streams.get(msg.request_id)
            if stream is not None and stream.worker_id == worker_id:
                self._close_child(stream, msg.request_id)
                stream._push(StreamError(msg.request_id, msg.message, 400))
        elif isinstance(msg, m.Reserved):
            self._on_reserved(worker_id, msg)
        elif isinstance(msg, m.PrefillDone):
            for outcome in msg.outcomes:
                self._on_prefill_outcome(worker_id, outcome)
        elif isinstance(msg, m.KVEvents):
            self._on_kv_events(worker_id, msg)
        elif isinstance(msg, m.KVSnapshot):
            self.index.resync(worker_id, msg.block_hashes, msg.next_seq)
            self._resyncing.discard(worker_id)
        elif isinstance(msg, m.Draining):
            self._on_draining(worker_id, msg)
        elif isinstance(msg, m.PeerRefused):
            logger.error("worker %s refused KV peer %s: %s", worker_id, msg.peer_id, msg.message)
        elif isinstance(msg, m.IntegrityReport):
            fut = self._integrity.get(worker_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted or released here already
            route = self._routes.get(out.request_id)
            if route is not None:
                route.stage = Stage.DECODING  # the KV (if remote) is in place
                if route.charged is not None:
                    self._charge(route, None)  # the first token is out
                if out.finish_reason is not None and route.path == "local" and out.timings:
                    self.metrics.decode_queue.labels("local").observe(
                        max(0.0, out.timings.queue_time)
                    )
            if out.finish_reason is not None:
                self._close_child(stream, out.request_id)
            stream._push(out)

    def _on_reserved(self, worker_id: str, msg: m.Reserved) -> None:
        route = self._routes.get(msg.request_id)
        if msg.retry:
            if route is None or not route.awaiting_retry or route.decode != worker_id:
                return
            route.awaiting_retry = False
            if msg.ok:  # still waiting for its KV: ask another prefill worker
                route.retried = True
                self.metrics.retries.inc()
                self._start_remote_prefill(route, msg)
            return  # not ok: the KV already landed (or the request ended): nothing to redo
        if route is None or route.stage is not Stage.RESERVING or route.decode != worker_id:
            if msg.ok:  # aborted meanwhile: nobody was asked to write, free the blocks now
                self._send(
                    worker_id, m.CancelRemoteKV(request_ids=[msg.request_id], writer_gone=True)
                )
            return
        self.metrics.decode_queue.labels("remote").observe(max(0.0, self.clock() - route.sent_at))
        if not msg.ok:
            self.metrics.fallbacks.labels("no_room").inc()
            self._prefill_locally(route)
            return
        self._start_remote_prefill(route, msg)

    def _on_prefill_outcome(self, worker_id: str, o: m.PrefillOutcome) -> None:
        sm = self.metrics
        if o.ok:
            sm.transfer_bytes.labels(worker_id).inc(o.nbytes)
            sm.transfer_descriptors.labels(worker_id).inc(o.num_descriptors)
            sm.transfer_time.labels(worker_id).observe(o.transfer_seconds)
            sm.prefill_queue.observe(max(0.0, o.queue_seconds))
            sm.prefill_time.observe(max(0.0, o.prefill_seconds))
            sm.prefill_cached_tokens.inc(o.cached_tokens)
        elif o.started:
            sm.transfer_failures.labels(worker_id).inc()
        orphan = self._orphans.pop(o.request_id, None)
        route = self._routes.get(o.request_id)
        if route is not None and route.prefill == worker_id:
            if o.ok:
                self._set_prefill(route, None)  # D has (or is about to have) the KV
                self._charge(route, None)
            elif route.stage is Stage.PREFILLING:
                self._cancel_remote(route, "prefill_failed", writer_gone=not route.retried)
        elif (
            orphan is not None
            and orphan.prefill == worker_id
            and not o.ok
            and self._ready(orphan.decode)
        ):
            # Aborted earlier; nothing was written: the decode worker may free the blocks now.
            self._send(
                orphan.decode,
                m.CancelRemoteKV(request_ids=[o.request_id], writer_gone=not orphan.retried),
            )

    def _on_draining(self, worker_id: str, msg: m.Draining) -> None:
        """Route nothing new to the worker, and say so: every request sent to it before the
        DrainAck reaches it first, so once it has the ack and nothing left, it may leave."""
        if self.registry.mark_draining(worker_id):
            info = self.registry.workers[worker_id]
            logger.info(
                "worker %s is draining (up to %.0fs): %d requests, %d remote prefills in flight",
                worker_id, msg.timeout_s, info.inflight, info.prefill_inflight,
            )  # fmt: skip
        self._send(worker_id, m.DrainAck())

    def _on_kv_events(self, worker_id: str, msg: m.KVEvents) -> None:
        if msg.batch.worker_id != worker_id:
            return
        gaps = self.index.gaps
        if self.index.apply(msg.batch):
            return
        if self.index.gaps > gaps:
            self.metrics.event_gaps.inc()
            logger.warning(
                "KV event gap from worker %s (seq %d): resyncing", worker_id, msg.batch.seq
            )
        if worker_id not in self._resyncing:
            self._resyncing.add(worker_id)
            self._send(worker_id, m.ResyncKV())

    def _on_hello(self, hello: m.Hello) -> None:
        wid = hello.worker_id
        try:
            problems = self._kv_problems(hello)
            if problems:
                self.registry.expect(wid, hello.role)
                self.registry.mark_dead(wid, "KV handshake mismatch")
                raise HandshakeMismatch(
                    f"worker {wid} cannot exchange KV with the cluster: {problems}"
                )
            self.registry.on_hello(hello)
        except HandshakeMismatch as exc:
            logger.error("%s", exc)
            self._send(wid, m.Shutdown())
            if wid not in self.processes:
                self.registry.forget(wid)  # it never joined
            return
        self.index.remove_worker(wid)  # a new process: its event seq starts again at 0
        self._resyncing.discard(wid)
        logger.info(
            "worker %s ready: role=%s model=%s max_model_len=%d vocab=%d blocks=%d pid=%d kv=%s",
            wid, hello.role, hello.model_name, hello.max_model_len, hello.vocab_size,
            hello.num_blocks, hello.pid, hello.kv_endpoint.transport if hello.kv_endpoint else "none",
        )  # fmt: skip
        if hello.kv_endpoint is not None:
            peers = [w for w in self.registry.ready() if w.worker_id != wid and w.kv_endpoint]
            if peers:
                self._send(wid, m.AddPeers(endpoints=[w.kv_endpoint for w in peers]))
            for w in peers:
                self._send(w.worker_id, m.AddPeers(endpoints=[hello.kv_endpoint]))
        if self.registry.all_ready():
            self.ready_event.set()

    def _kv_problems(self, hello: m.Hello) -> str:
        """Why the newcomer's KV endpoint cannot work with the cluster's ('' if it can)."""
        if hello.kv_endpoint is None:
            return ""
        for w in self.registry.ready():
            if w.worker_id != hello.worker_id and w.kv_endpoint is not None:
                problems = endpoint_problems(w.kv_endpoint, hello.kv_endpoint)
                if problems:
                    return f"vs {w.worker_id}: " + "; ".join(problems)
        return ""

    # ------------------------------------------------------------------ health

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.monitor_interval)
            for wid, proc in self.processes.items():
                code = proc.exit_code()
                if code is not None:
                    self._fail_worker(wid, f"process {proc.pid} exited with code {code}")
            for wid, reason in self.registry.silent(self.heartbeat_timeout, self.start_timeout):
                self._fail_worker(wid, reason)
                hung = self.processes.get(wid)
                if hung is not None and hung.exit_code() is None:
                    hung.process.kill()  # hung: make sure it cannot come back half-alive

    def _fail_worker(self, worker_id: str, reason: str) -> None:
        info = self.registry.workers.get(worker_id)
        if info is None:
            return
        previous = info.state
        if not self.registry.mark_dead(worker_id, reason):
            return
        failed = [rid for rid, s in self._streams.items() if s.worker_id == worker_id]
        log = logger.info if self._closing or (info.draining and not failed) else logger.error
        log("worker %s is gone: %s (%d requests ended)", worker_id, reason, len(failed))
        to_prefill: dict[str, list[str]] = defaultdict(list)
        for rid in failed:
            route = self._routes.get(rid)
            if route is not None and route.stage is Stage.PREFILLING and route.prefill:
                to_prefill[route.prefill].append(rid)  # its KV has nowhere to go
            stream = self._streams[rid]
            self._close_child(stream, rid)
            stream._push(StreamError(rid, f"inference worker {worker_id} failed: {reason}", 503))
        if not self._closing:
            self._reroute_prefills(worker_id)
            for wid, rids in to_prefill.items():
                if self._ready(wid):
                    self._send(wid, m.AbortRequests(request_ids=rids))
            for w in self.registry.ready():
                if w.kv_endpoint is not None and info.kv_endpoint is not None:
                    self._send(w.worker_id, m.RemovePeer(worker_id=worker_id))
        self._orphans = {
            k: o for k, o in self._orphans.items() if worker_id not in (o.decode, o.prefill)
        }
        self.index.remove_worker(worker_id)
        self._resyncing.discard(worker_id)
        fut = self._integrity.pop(worker_id, None)
        if fut is not None and not fut.done():
            fut.cancel()
        self.ready_event.clear()
        for cb in self.on_worker_dead:
            cb(info, reason, previous)
        if worker_id not in self.processes:
            self.registry.forget(worker_id)  # joined on its own; gone for good

    def _reroute_prefills(self, dead: str) -> None:
        """Requests the dead worker was prefilling: the decode worker re-offers the ones whose
        KV has not arrived (RetryPrefill) and they go to another prefill worker."""
        retry: dict[str, list[str]] = defaultdict(list)
        for route in self._routes.values():
            if route.prefill != dead:
                continue
            self._set_prefill(route, None)  # RESERVING: another is picked when D answers
            self._charge(route, None)
            if route.stage is Stage.PREFILLING:
                route.awaiting_retry = True
                retry[route.decode].append(route.request_id)
        for decode, rids in retry.items():
            logger.warning(
                "prefill worker %s died: re-offering %d prefills via %s", dead, len(rids), decode
            )
            self._send(decode, m.RetryPrefill(request_ids=rids))
