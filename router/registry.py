"""Which workers exist, what state each is in, and what each last reported.

Plain Python with an injected clock: `router/cluster.py` feeds it control-plane events, the
routing policy and admission read immutable `WorkerLoad` snapshots from it, and `/metrics`
reads each worker's latest `EngineStats`.

Life of a worker: STARTING (spawned or expected, no handshake yet) -> READY (its Hello arrived
and matches the cluster's model) -> DEAD (process exited, heartbeats stopped, it said Goodbye,
or its handshake did not match). DEAD is final: a worker that comes back is a new worker.
A READY worker may be `draining` (it said Draining on SIGTERM): it is still alive and finishes
what it holds, but routing (`routable()`, `ready_decoders()`) no longer offers it new work.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from server.engine.outputs import EngineStats
from server.worker.messages import Hello


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"


class HandshakeMismatch(ValueError):
    """A worker whose Hello disagrees with the cluster (another model, context or vocabulary)."""


@dataclass
class WorkerInfo:
    worker_id: str
    role: str
    state: WorkerState = WorkerState.STARTING
    since: float = 0.0  # when it entered `state`
    last_seen: float = 0.0  # last control-plane message from it
    hello: Hello | None = None
    stats: EngineStats | None = None
    inflight: int = 0  # engine requests routed to it and not yet finished or aborted
    prefill_inflight: int = 0  # remote prefills sent to it and not yet reported done
    prefill_backlog: int = 0  # prompt tokens routed to it to prefill, first token not out yet
    dead_reason: str = ""
    draining: bool = False  # READY, but takes no new work (it leaves once what it holds ends)

    @property
    def decodes(self) -> bool:
        """It can run requests to the end (a prefill worker only computes prompts)."""
        return self.role != "prefill"

    @property
    def kv_endpoint(self):
        return self.hello.kv_endpoint if self.hello is not None else None


class WorkerLoad(NamedTuple):
    """What the routing policy may know about one READY worker."""

    worker_id: str
    role: str
    inflight: int
    num_waiting: int
    kv_cache_usage: float


@dataclass
class ClusterModel:
    """What every worker must agree on; fixed by the first Hello."""

    model_name: str
    max_model_len: int
    vocab_size: int


@dataclass
class WorkerRegistry:
    clock: Callable[[], float] = time.monotonic
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    model: ClusterModel | None = None

    def expect(self, worker_id: str, role: str) -> WorkerInfo:
        """Record a worker that was started and has yet to say Hello."""
        info = WorkerInfo(worker_id=worker_id, role=role, since=self.clock())
        info.last_seen = info.since
        self.workers[worker_id] = info
        return info

    def on_hello(self, hello: Hello) -> WorkerInfo:
        """Mark the worker READY; raises `HandshakeMismatch` (and marks it DEAD) on a mismatch."""
        now = self.clock()
        info = self.workers.get(hello.worker_id)
        if info is None or info.state is WorkerState.DEAD:
            info = self.expect(hello.worker_id, hello.role)
        info.last_seen = now
        theirs = ClusterModel(hello.model_name, hello.max_model_len, hello.vocab_size)
        if self.model is None:
            self.model = theirs
        elif theirs != self.model:
            self.mark_dead(hello.worker_id, f"handshake mismatch: {theirs} != {self.model}")
            raise HandshakeMismatch(
                f"worker {hello.worker_id} serves {theirs}, the cluster serves {self.model}"
            )
        info.hello = hello
        info.role = hello.role
        info.state = WorkerState.READY
        info.draining = False
        info.since = now
        return info

    def on_seen(self, worker_id: str, stats: EngineStats | None = None) -> WorkerInfo | None:
        """Any message proves liveness; a Heartbeat also brings stats. None if unknown/dead."""
        info = self.workers.get(worker_id)
        if info is None or info.state is WorkerState.DEAD:
            return None
        info.last_seen = self.clock()
        if stats is not None:
            info.stats = stats
        return info

    def mark_draining(self, worker_id: str) -> bool:
        """A READY worker stops taking new work; False if it is not READY (or already draining)."""
        info = self.workers.get(worker_id)
        if info is None or info.state is not WorkerState.READY or info.draining:
            return False
        info.draining = True
        return True

    def mark_dead(self, worker_id: str, reason: str) -> bool:
        """Returns False if it was already dead (so callers clean up exactly once)."""
        info = self.workers.get(worker_id)
        if info is None or info.state is WorkerState.DEAD:
            return False
        info.state = WorkerState.DEAD
        info.since = self.clock()
        info.dead_reason = reason
        info.inflight = 0
        info.prefill_inflight = 0
        return True

    def forget(self, worker_id: str) -> None:
        """Drop a dead worker that is not coming back (one that joined on its own and left):
        the cluster's health no longer counts it."""
        info = self.workers.get(worker_id)
        if info is not None and info.state is WorkerState.DEAD:
            del self.workers[worker_id]

    def silent(self, heartbeat_timeout: float, start_timeout: float) -> list[tuple[str, str]]:
        """(worker_id, reason) of live workers that have been quiet too long."""
        now = self.clock()
        out = []
        for w in self.workers.values():
            if w.state is WorkerState.READY and now - w.last_seen > heartbeat_timeout:
                out.append((w.worker_id, f"no heartbeat for {now - w.last_seen:.1f}s"))
            elif w.state is WorkerState.STARTING and now - w.since > start_timeout:
                out.append((w.worker_id, f"no handshake after {now - w.since:.0f}s"))
        return out

    # ------------------------------------------------------------------ views

    def ready(self) -> list[WorkerInfo]:
        """Live workers (draining ones included: they still hold requests)."""
        return [w for w in self.workers.values() if w.state is WorkerState.READY]

    def routable(self) -> list[WorkerInfo]:
        """Workers that may be given new work: READY and not draining."""
        return [w for w in self.ready() if not w.draining]

    def all_ready(self) -> bool:
        """True when there is at least one worker and every known worker is READY."""
        return bool(self.workers) and all(
            w.state is WorkerState.READY for w in self.workers.values()
        )

    def loads(self) -> list[WorkerLoad]:
        return [
            WorkerLoad(
                worker_id=w.worker_id,
                role=w.role,
                inflight=w.inflight,
                num_waiting=w.stats.num_waiting if w.stats else 0,
                kv_cache_usage=w.stats.kv_cache_usage if w.stats else 0.0,
            )
            for w in self.ready()
        ]

    def total_inflight(self) -> int:
        return sum(w.inflight for w in self.ready())

    def ready_decoders(self) -> list[WorkerInfo]:
        return [w for w in self.routable() if w.decodes]
