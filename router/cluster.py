"""The router's side of the control plane: one ZMQ ROUTER socket, every worker behind it.

`Cluster` runs on the API process's asyncio loop. It routes each new request to a worker
(`router.policy`), forwards aborts, turns each worker's `StepOutputs` into per-request
`RequestStream`s, and watches worker health: a worker whose process exits, whose heartbeats
stop, or that says Goodbye is marked dead and every request on it ends with a `StreamError`
(the client gets an error, never a hang).

Ownership: whoever `submit`s a stream must `release` it when done (a `finally`), which aborts
any engine request still open in its worker; `release` is idempotent and cheap. All methods
are called from the event loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import zmq
import zmq.asyncio

from router.admission import Admission, admit
from router.policy import choose_worker
from router.registry import HandshakeMismatch, WorkerInfo, WorkerRegistry, WorkerState
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.worker import messages as m
from server.worker.spawn import WorkerProcess

logger = logging.getLogger(__name__)


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.registry = registry or WorkerRegistry(clock=clock)
        self.heartbeat_timeout = heartbeat_timeout
        self.start_timeout = start_timeout
        self.monitor_interval = monitor_interval
        self.processes: dict[str, WorkerProcess] = {}
        self.ready_event = asyncio.Event()
        # Called once per worker death with (info, reason); info.state tells what it was before.
        self.on_worker_dead: list[Callable[[WorkerInfo, str, WorkerState], None]] = []
        self._streams: dict[str, RequestStream] = {}  # engine request id -> stream
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
            len(self.registry.ready()), self.registry.total_inflight(), num_requests, max_pending
        )

    def submit(self, children: Sequence[tuple[str, list[int], SamplingParams]]) -> RequestStream:
        """Send one engine request per (request_id, prompt_token_ids, params), all to one worker
        (so `n` copies of a prompt share its prefix blocks); raises NoWorkerAvailable."""
        worker_id = choose_worker(self.registry.loads())
        if worker_id is None:
            raise NoWorkerAvailable("no inference worker is ready")
        ids = [rid for rid, _, _ in children]
        if len(set(ids)) != len(ids) or any(rid in self._streams for rid in ids):
            raise ValueError(f"duplicate request id among {ids}")
        stream = RequestStream(ids, worker_id)
        info = self.registry.workers[worker_id]
        for rid, prompt_token_ids, params in children:
            self._streams[rid] = stream
            info.inflight += 1
            self._send(
                worker_id,
                m.AddRequest(request_id=rid, prompt_token_ids=prompt_token_ids, params=params),
            )
        return stream

    def abort(self, stream: RequestStream, request_ids: Sequence[str] | None = None) -> None:
        """Abort the given children (default: all still open); no output follows for them."""
        ids = [
            rid
            for rid in (stream.request_ids if request_ids is None else request_ids)
            if rid in stream.open
        ]
        if not ids:
            return
        for rid in ids:
            self._close_child(stream, rid)
        info = self.registry.workers.get(stream.worker_id)
        if info is not None and info.state is WorkerState.READY:
            self._send(stream.worker_id, m.AbortRequests(request_ids=ids))

    release = abort  # the `finally` spelling: end whatever is still open

    def num_open_requests(self) -> int:
        return len(self._streams)

    def _close_child(self, stream: RequestStream, rid: str) -> None:
        stream.open.discard(rid)
        if self._streams.pop(rid, None) is not None:
            info = self.registry.workers.get(stream.worker_id)
            if info is not None and info.inflight > 0:
                info.inflight -= 1

    # ------------------------------------------------------------------ socket

    def _send(self, worker_id: str, msg: m._Message) -> None:
        assert self._sock is not None
        fut = self._sock.send_multipart([worker_id.encode(), m.encode(msg)], copy=False)
        if not fut.done():  # only when the socket is momentarily busy; keep it referenced
            self._pending_sends.add(fut)
            fut.add_done_callback(self._pending_sends.discard)
        fut.add_done_callback(lambda f, wid=worker_id: self._on_sent(f, wid))

    def _on_sent(self, fut: asyncio.Future, worker_id: str) -> None:
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
        if isinstance(msg, m.StepOutputs):
            if self.registry.on_seen(worker_id) is None:
                return
            for out in msg.outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted or released here already
                if out.finish_reason is not None:
                    self._close_child(stream, out.request_id)
                stream._push(out)
        elif isinstance(msg, m.Heartbeat):
            self.registry.on_seen(worker_id, msg.stats)
        elif isinstance(msg, m.RequestError):
            self.registry.on_seen(worker_id)
            stream = self._streams.get(msg.request_id)
            if stream is not None:
                self._close_child(stream, msg.request_id)
                stream._push(StreamError(msg.request_id, msg.message, 400))
        elif isinstance(msg, m.Hello):
            self._on_hello(msg)
        elif isinstance(msg, m.Goodbye):
            self._fail_worker(worker_id, f"worker exited ({msg.reason or 'goodbye'})")

    def _on_hello(self, hello: m.Hello) -> None:
        try:
            self.registry.on_hello(hello)
        except HandshakeMismatch as exc:
            logger.error("%s", exc)
            self._send(hello.worker_id, m.Shutdown())
            return
        logger.info(
            "worker %s ready: model=%s max_model_len=%d vocab=%d blocks=%d pid=%d",
            hello.worker_id,
            hello.model_name,
            hello.max_model_len,
            hello.vocab_size,
            hello.num_blocks,
            hello.pid,
        )
        if self.registry.all_ready():
            self.ready_event.set()

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
                proc = self.processes.get(wid)
                if proc is not None and proc.exit_code() is None:
                    proc.process.kill()  # hung: make sure it cannot come back half-alive

    def _fail_worker(self, worker_id: str, reason: str) -> None:
        info = self.registry.workers.get(worker_id)
        if info is None:
            return
        previous = info.state
        if not self.registry.mark_dead(worker_id, reason):
            return
        failed = [rid for rid, s in self._streams.items() if s.worker_id == worker_id]
        log = logger.info if self._closing else logger.error
        log("worker %s is gone: %s (%d requests ended)", worker_id, reason, len(failed))
        for rid in failed:
            stream = self._streams[rid]
            self._close_child(stream, rid)
            stream._push(StreamError(rid, f"inference worker {worker_id} failed: {reason}", 503))
        self.ready_event.clear()
        for cb in self.on_worker_dead:
            cb(info, reason, previous)
