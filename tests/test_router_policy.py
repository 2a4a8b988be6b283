"""Routing policy, admission control and the worker registry: pure Python, no processes."""

from __future__ import annotations

import pytest

from router.admission import admit
from router.policy import choose_worker
from router.registry import HandshakeMismatch, WorkerLoad, WorkerRegistry, WorkerState
from server.engine.outputs import EngineStats
from server.worker.messages import Hello


class FakeClock:
    """An injected clock (time is an input here, not a component under test)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def hello(wid: str, model: str = "m", max_len: int = 2048, vocab: int = 100) -> Hello:
    return Hello(
        worker_id=wid, role="both", model_name=model, max_model_len=max_len, vocab_size=vocab, pid=1
    )


def stats(running: int = 0, waiting: int = 0, kv: float = 0.0) -> EngineStats:
    return EngineStats(running, waiting, kv, 100, 100, 0, 0, 0, 0, 0)


def test_least_loaded_then_kv_usage_then_id():
    loads = [
        WorkerLoad("w2", "both", 3, 0, 0.1),
        WorkerLoad("w1", "both", 1, 0, 0.9),
        WorkerLoad("w0", "both", 1, 0, 0.5),
    ]
    assert choose_worker(loads) == "w0"
    assert (
        choose_worker([WorkerLoad("b", "both", 0, 0, 0.0), WorkerLoad("a", "both", 0, 0, 0.0)])
        == "a"
    )


def test_no_worker_of_the_role():
    assert choose_worker([]) is None
    assert choose_worker([WorkerLoad("p", "prefill", 0, 0, 0.0)]) is None


@pytest.mark.parametrize(
    "ready,inflight,new,limit,expect",
    [
        (0, 0, 1, 10, 503),
        (1, 0, 1, 10, 200),
        (1, 9, 1, 10, 200),
        (1, 10, 1, 10, 429),
        (1, 0, 50, 10, 200),  # alone on an idle cluster a big n is admitted
        (1, 1, 50, 10, 429),
        (1, 10_000, 1, 0, 200),  # 0 disables the limit
    ],
)
def test_admission(ready, inflight, new, limit, expect):
    verdict = admit(ready, inflight, new, limit)
    assert verdict.status == expect
    assert verdict.admitted == (expect == 200)
    if not verdict.admitted:
        assert verdict.retry_after > 0 and verdict.message


def test_registry_lifecycle_and_readiness():
    clock = FakeClock()
    reg = WorkerRegistry(clock=clock)
    assert not reg.all_ready()  # no workers: not ready
    reg.expect("w0", "both")
    reg.expect("w1", "both")
    reg.on_hello(hello("w0"))
    assert not reg.all_ready()
    reg.on_hello(hello("w1"))
    assert reg.all_ready()
    assert reg.model is not None and reg.model.max_model_len == 2048
    assert [w.worker_id for w in reg.ready()] == ["w0", "w1"]
    reg.on_seen("w0", stats(running=2, waiting=1, kv=0.25))
    loads = {w.worker_id: w for w in reg.loads()}
    assert loads["w0"].num_waiting == 1 and loads["w0"].kv_cache_usage == 0.25
    assert reg.mark_dead("w1", "gone")
    assert not reg.mark_dead("w1", "again")  # exactly once
    assert not reg.all_ready()
    assert [w.worker_id for w in reg.ready()] == ["w0"]
    assert reg.on_seen("w1") is None  # dead stays dead


def test_registry_rejects_a_mismatched_handshake():
    reg = WorkerRegistry(clock=FakeClock())
    reg.on_hello(hello("w0", vocab=100))
    with pytest.raises(HandshakeMismatch):
        reg.on_hello(hello("w1", vocab=101))
    assert reg.workers["w1"].state is WorkerState.DEAD


def test_silent_workers_are_reported():
    clock = FakeClock()
    reg = WorkerRegistry(clock=clock)
    reg.expect("starting", "both")
    reg.expect("ready", "both")
    reg.on_hello(hello("ready"))
    clock.t += 5
    assert reg.silent(heartbeat_timeout=10, start_timeout=60) == []
    clock.t += 6
    assert [wid for wid, _ in reg.silent(heartbeat_timeout=10, start_timeout=60)] == ["ready"]
    reg.on_seen("ready")
    clock.t += 50
    silent = dict(reg.silent(heartbeat_timeout=100, start_timeout=60))
    assert list(silent) == ["starting"] and "handshake" in silent["starting"]
