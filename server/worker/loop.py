"""The worker loop: drain control messages, step the engine while it has work, emit outputs.

One iteration:
  1. receive every pending `AddRequest` / `AbortRequests` / `Shutdown` (blocking only when the
     engine is idle, so an abort sent during a step takes effect before the next step);
  2. `engine.step()` if there is work, and send ALL its outputs as one `StepOutputs` frame;
  3. every `heartbeat_interval` seconds, and at once when the engine falls idle, send a
     `Heartbeat` with `EngineStats` (the router's gauges and its liveness check read these);
  4. exit if the parent process (the router) is gone.

The loop owns the engine and the socket; both are used from this thread only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

import zmq

from server.engine.outputs import EngineStats, RequestOutput
from server.engine.sampling_params import SamplingParams
from server.worker import messages as m

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """The part of `server.engine.engine.EngineCore` the loop uses."""

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished_requests(self) -> bool: ...
    def stats(self) -> EngineStats: ...


class WorkerLoop:
    """Serve one engine over one connected DEALER socket until shutdown.

    `hello` is sent first; `should_stop` is polled between iterations (signal handlers set it);
    `parent_pid`, when given, is compared with `os.getppid()` so an orphaned worker exits.
    """

    def __init__(
        self,
        engine: Engine,
        socket: zmq.Socket,
        hello: m.Hello,
        *,
        heartbeat_interval: float = 0.5,
        parent_pid: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.socket = socket
        self.hello = hello
        self.worker_id = hello.worker_id
        self.heartbeat_interval = heartbeat_interval
        self.parent_pid = parent_pid
        self.should_stop = should_stop
        self.clock = clock
        # Ids the engine holds: aborts for anything else (already finished, refused) are dropped
        # here, so the engine never sees an id it does not know.
        self.live: set[str] = set()
        self._stopping = False
        self._last_heartbeat = float("-inf")
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)

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
            busy = self.engine.has_unfinished_requests()
            self._drain(block_ms=0 if busy else int(self.heartbeat_interval * 1000))
            if self._stopping:
                break
            busy = self.engine.has_unfinished_requests()
            if busy:
                outputs = self.engine.step()
                if outputs:
                    for out in outputs:
                        if out.finish_reason is not None:
                            self.live.discard(out.request_id)
                    self._send(m.StepOutputs(worker_id=self.worker_id, outputs=outputs))
                busy = self.engine.has_unfinished_requests()
            now = self.clock()
            if now - self._last_heartbeat >= self.heartbeat_interval or (was_busy and not busy):
                self._last_heartbeat = now
                self._send(m.Heartbeat(worker_id=self.worker_id, stats=self.engine.stats()))
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    reason = "parent exited"
                    break
            was_busy = busy
        if self.live:
            self.engine.abort(list(self.live))
            self.live.clear()
        self._send(m.Goodbye(worker_id=self.worker_id, reason=reason))
        return reason

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
        elif isinstance(msg, m.Shutdown):
            self._stopping = True

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

    def _refuse(self, request_id: str, message: str) -> None:
        self._send(m.RequestError(worker_id=self.worker_id, request_id=request_id, message=message))

    def _send(self, msg: m._Message) -> None:
        self.socket.send(m.encode(msg), copy=False)
