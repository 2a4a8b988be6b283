"""The worker loop: drain control messages, step the engine while it has work, emit outputs.

One iteration:
  1. receive every pending control message (blocking only when the engine is idle, so an abort
     sent during a step takes effect before the next step; see `_idle_wait_ms`);
  2. housekeeping: lease expiries and deferred frees (`engine.tick()`), KV arrivals (decode
     side: their first tokens are sent at once) and finished KV sends (prefill side);
  3. `engine.step()` if there is work; a prefill job's output starts its KV send instead of
     going to the router;
  4. send what the iteration produced, one frame each: `StepOutputs` (every output, arrivals'
     first tokens included), `PrefillDone`, `KVEvents`;
  5. every `heartbeat_interval` seconds, and at once when the engine falls idle, send a
     `Heartbeat` with `EngineStats` (the router's gauges and its liveness check read these);
  6. exit if the parent process (the router) is gone.

Graceful drain (`should_drain`, set by SIGTERM): the loop sends `Draining` once and carries on
serving what it holds (and what the router sent before it heard: the router answers with
`DrainAck` and routes nothing new to it afterwards, so whatever was sent earlier has arrived
by then). It leaves with Goodbye when it holds nothing and has the ack (or heard nothing for
`DRAIN_ACK_WAIT_S`: no router listening), or at `drain_timeout`, when what is still running is
aborted (the router ends those requests with an error naming the timeout). Before Goodbye,
on any exit, KV sends already in flight get up to `SEND_SETTLE_S` to complete and report.

The loop owns the engine, the socket and the KV connector; all are used from this thread only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

import zmq

from kvcache.transfer import IncompatiblePeerError, KVConnector
from server.engine.outputs import EngineStats, RequestOutput
from server.engine.sampling_params import SamplingParams
from server.worker import messages as m
from server.worker.kv_handoff import DecodeHandoff, PrefillHandoff

logger = logging.getLogger(__name__)

# While KV is in flight the loop cannot sleep for a whole heartbeat: NIXL has no socket to
# wake it, and a finished send must release its blocks promptly.
REMOTE_POLL_MS = 2
# A draining worker with nothing left leaves after this long without a DrainAck.
DRAIN_ACK_WAIT_S = 5.0
# On exit, KV sends in flight get this long to complete (their outcome then reaches the
# router); a send still running after it is left to the router's dead-prefill-worker path.
SEND_SETTLE_S = 5.0


class Engine(Protocol):
    """The part of `server.engine.engine.EngineCore` the loop uses (the handoffs use more)."""

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished_requests(self) -> bool: ...
    def stats(self) -> EngineStats: ...
    def tick(self) -> list[str]: ...
    def check_integrity(self) -> None: ...


class WorkerLoop:
    """Serve one engine over one connected DEALER socket until shutdown.

    `hello` is sent first; `connector` (None: no KV handoff, remote requests are declined)
    moves KV to and from peers; `should_stop` is polled between iterations (signal handlers
    set it); `parent_pid`, when given, is compared with `os.getppid()` so an orphaned worker
    exits. `should_drain` (polled too) starts a graceful drain bounded by `drain_timeout`.
    """

    def __init__(
        self,
        engine: Engine,
        socket: zmq.Socket,
        hello: m.Hello,
        *,
        connector: KVConnector | None = None,
        heartbeat_interval: float = 0.5,
        parent_pid: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        should_drain: Callable[[], bool] = lambda: False,
        drain_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.socket = socket
        self.hello = hello
        self.worker_id = hello.worker_id
        self.heartbeat_interval = heartbeat_interval
        self.parent_pid = parent_pid
        self.should_stop = should_stop
        self.should_drain = should_drain
        self.drain_timeout = drain_timeout
        self.drain_started: float | None = None  # clock time; None: not draining
        self.drain_acked = False
        self.clock = clock
        self.connector = connector
        self.prefill = PrefillHandoff(engine, connector) if connector else None
        self.decode = DecodeHandoff(engine, connector) if connector else None
        # Ids the engine holds for the router (local and reserved requests): aborts for
        # anything else (already finished, refused) are dropped here, so the engine never sees
        # an id it does not know. Prefill jobs live in `self.prefill.jobs`.
        self.live: set[str] = set()
        self._outputs: list[RequestOutput] = []  # to send at the end of this iteration
        self._outcomes: list[m.PrefillOutcome] = []
        self._stopping = False
        self._last_heartbeat = float("-inf")
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        if connector is not None and connector.wakeup_socket is not None:
            self._poller.register(connector.wakeup_socket, zmq.POLLIN)

    # ------------------------------------------------------------------ main loop

    def run(self) -> str:
        """Run until Shutdown, a stop signal or the parent's death; returns the reason."""
        self._send(self.hello)
        reason = "shutdown"
        was_busy = False
        while True:
            if self.should_stop():
                reason = "signal"
                break
            if self.drain_started is None and self.should_drain():
                self._start_draining()
            busy = self.engine.has_unfinished_requests()
            self._drain(block_ms=0 if busy else self._idle_wait_ms())
            if self._stopping:
                break
            self._housekeeping()
            if self.engine.has_unfinished_requests():
                self._on_step(self.engine.step())
            self._flush()
            busy = self.engine.has_unfinished_requests()
            now = self.clock()
            if now - self._last_heartbeat >= self.heartbeat_interval or (was_busy and not busy):
                self._last_heartbeat = now
                self._send(m.Heartbeat(worker_id=self.worker_id, stats=self.engine.stats()))
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    reason = "parent exited"
                    break
            was_busy = busy
            if self.drain_started is not None:
                drained = self._drained(now)
                if drained is not None:
                    reason = drained
                    break
        if self.live:
            self.engine.abort(list(self.live))
            self.live.clear()
        if self.prefill is not None:
            self._outcomes += self.prefill.abort(list(self.prefill.jobs), "prefill worker exiting")
            self._settle_sends(SEND_SETTLE_S)
        self._flush()
        self._send(m.Goodbye(worker_id=self.worker_id, reason=reason))
        return reason

    def _start_draining(self) -> None:
        self.drain_started = self.clock()
        logger.info("worker %s: draining (%d requests, %d prefills in flight; up to %gs)",
                    self.worker_id, len(self.live), self._num_prefill_jobs(),
                    self.drain_timeout)  # fmt: skip
        self._send(m.Draining(worker_id=self.worker_id, timeout_s=self.drain_timeout))

    def _num_prefill_jobs(self) -> int:
        return len(self.prefill.jobs) if self.prefill is not None else 0

    def _drained(self, now: float) -> str | None:
        """The Goodbye reason once the drain is over, None while it goes on."""
        held = len(self.live) + self._num_prefill_jobs()
        if held == 0 and (self.drain_acked or now - self.drain_started >= DRAIN_ACK_WAIT_S):
            logger.info("worker %s: drained in %.1fs", self.worker_id, now - self.drain_started)
            return "drained"
        if now - self.drain_started >= self.drain_timeout:
            why = (f"drain timed out after {self.drain_timeout:g}s with {len(self.live)} "
                   f"requests and {self._num_prefill_jobs()} prefills still running")  # fmt: skip
            logger.warning("worker %s: %s", self.worker_id, why)
            return why
        return None

    def _settle_sends(self, timeout: float) -> None:
        """Wait (bounded) for the KV sends in flight: each completes or fails, and its outcome
        goes to the router, so the decode worker never waits on a write that may still land."""
        deadline = time.monotonic() + timeout  # wall time, whatever clock the loop was given
        while self.prefill.jobs and time.monotonic() < deadline:
            self._outcomes += self.prefill.poll()
            if self.prefill.jobs:
                time.sleep(REMOTE_POLL_MS / 1000)
        if self.prefill.jobs:
            logger.warning("worker %s: leaving with %d KV sends in flight",
                           self.worker_id, len(self.prefill.jobs))  # fmt: skip

    def _idle_wait_ms(self) -> int:
        sending = self.prefill is not None and any(j.started for j in self.prefill.jobs.values())
        waiting = self.decode is not None and bool(self.decode.reservations)
        if sending or (waiting and self.connector.wakeup_socket is None):
            return REMOTE_POLL_MS
        return int(self.heartbeat_interval * 1000)

    def _housekeeping(self) -> None:
        expired = self.engine.tick()
        if expired and self.decode is not None:
            logger.warning("worker %s: KV lease expired for %s; prefilling locally",
                           self.worker_id, ", ".join(expired))  # fmt: skip
            self.decode.forget(expired)
        if self.decode is not None:
            self._outputs += self.decode.poll()
            self._flush_outputs()  # first tokens go out now, not after the next step
        if self.prefill is not None:
            self._outcomes += self.prefill.poll()

    def _on_step(self, outputs: list[RequestOutput]) -> None:
        if self.prefill is not None and self.prefill.jobs:
            outputs, failed = self.prefill.on_outputs(outputs)
            self._outcomes += failed
        self._outputs += outputs

    def _flush_outputs(self) -> None:
        if self._outputs:
            outputs, self._outputs = self._outputs, []
            done = [out.request_id for out in outputs if out.finish_reason is not None]
            self.live.difference_update(done)
            if self.decode is not None:
                self.decode.forget(done)
            self._send(m.StepOutputs(worker_id=self.worker_id, outputs=outputs))

    def _flush(self) -> None:
        self._flush_outputs()
        if self._outcomes:
            outcomes, self._outcomes = self._outcomes, []
            self._send(m.PrefillDone(worker_id=self.worker_id, outcomes=outcomes))
        batch = self.engine.kv.take_events()
        if batch is not None:
            self._send(m.KVEvents(batch=batch))

    # ------------------------------------------------------------------ messages

    def _drain(self, block_ms: int) -> None:
        """Handle every frame already queued; wait up to `block_ms` for the first one."""
        if block_ms > 0 and not self._poller.poll(block_ms):
            return
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = m.decode_router_message(frame)
            except m.ProtocolError as exc:
                logger.error("worker %s: dropped control frame: %s", self.worker_id, exc)
                continue
            self.handle(msg)

    def handle(self, msg: m.RouterMessage) -> None:
        if isinstance(msg, m.AddRequest):
            self._add(msg)
        elif isinstance(msg, m.AbortRequests):
            ids = [rid for rid in msg.request_ids if rid in self.live]
            if ids:
                self.engine.abort(ids)
                self.live.difference_update(ids)
                if self.decode is not None:
                    self.decode.forget(ids)
            if self.prefill is not None:
                self._outcomes += self.prefill.abort(msg.request_ids)
        elif isinstance(msg, m.ReserveRemote):
            self._reserve(msg)
        elif isinstance(msg, m.RemotePrefill):
            failed = (
                self.prefill.start(msg)
                if self.prefill is not None
                else m.PrefillOutcome(msg.request_id, False, error="no KV connector")
            )
            if failed is not None:
                self._outcomes.append(failed)
        elif isinstance(msg, m.RetryPrefill):
            if self.decode is not None:
                for answer in self.decode.retry(self.worker_id, msg.request_ids):
                    self._send(answer)
        elif isinstance(msg, m.CancelRemoteKV):
            if self.decode is not None:
                self.decode.cancel(msg.request_ids, msg.writer_gone)
        elif isinstance(msg, m.AddPeers):
            self._add_peers(msg.endpoints)
        elif isinstance(msg, m.RemovePeer):
            if self.prefill is not None:
                self._outcomes += self.prefill.peer_gone(msg.worker_id)
        elif isinstance(msg, m.ResyncKV):
            hashes, next_seq = self.engine.kv.snapshot()
            self._send(
                m.KVSnapshot(worker_id=self.worker_id, block_hashes=hashes, next_seq=next_seq)
            )
        elif isinstance(msg, m.CheckIntegrity):
            self._send(self._integrity())
        elif isinstance(msg, m.Shutdown):
            self._stopping = True
        elif isinstance(msg, m.DrainAck):
            self.drain_acked = True

    def _add(self, msg: m.AddRequest) -> None:
        if msg.request_id in self.live:
            self._refuse(msg.request_id, f"request id {msg.request_id!r} is already running")
            return
        try:
            self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
        except ValueError as exc:
            self._refuse(msg.request_id, str(exc))
            return
        self.live.add(msg.request_id)

    def _reserve(self, msg: m.ReserveRemote) -> None:
        if self.decode is None:
            self._send(m.Reserved(worker_id=self.worker_id, request_id=msg.request_id, ok=False,
                                  reason="no KV connector"))  # fmt: skip
            return
        if msg.request_id in self.live:
            self._refuse(msg.request_id, f"request id {msg.request_id!r} is already running")
            return
        try:
            answer = self.decode.reserve(self.worker_id, msg)
        except ValueError as exc:
            self._refuse(msg.request_id, str(exc))
            return
        if answer.ok:
            self.live.add(msg.request_id)
        self._send(answer)

    def _add_peers(self, endpoints: list) -> None:
        if self.connector is None:
            return
        for ep in endpoints:
            if ep.worker_id == self.worker_id:
                continue
            try:
                self.connector.add_peer(ep)
            except IncompatiblePeerError as exc:
                self._peer_refused(ep.worker_id, str(exc))
            except Exception as exc:  # noqa: BLE001 (a transport's own error: bad metadata, ...)
                self._peer_refused(ep.worker_id, f"{type(exc).__name__}: {exc}")

    def _peer_refused(self, peer_id: str, message: str) -> None:
        logger.error("worker %s: cannot add KV peer %s: %s", self.worker_id, peer_id, message)
        self._send(m.PeerRefused(worker_id=self.worker_id, peer_id=peer_id, message=message))

    def _integrity(self) -> m.IntegrityReport:
        try:
            self.engine.check_integrity()
            ok, error = True, ""
        except AssertionError as exc:
            ok, error = False, str(exc)
        s = self.engine.scheduler
        stats = self.engine.stats()
        return m.IntegrityReport(
            worker_id=self.worker_id, ok=ok, error=error, num_blocks=stats.num_blocks,
            num_free_blocks=stats.num_free_blocks, num_requests=self.engine.kv.num_requests,
            num_remote_waiting=len(s.remote), num_held=len(s.held), num_parked=len(s.deferred),
            num_prefill_jobs=len(self.prefill.jobs) if self.prefill is not None else 0,
        )  # fmt: skip

    def _refuse(self, request_id: str, message: str) -> None:
        self._send(m.RequestError(worker_id=self.worker_id, request_id=request_id, message=message))

    def _send(self, msg: m._Message) -> None:
        self.socket.send(m.encode(msg), copy=False)
