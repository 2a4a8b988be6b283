"""Start and stop worker processes on this host.

A worker is a plain subprocess (`python -m server.worker`), not a multiprocessing child, so
nothing is pickled to start it: its `EngineConfig` travels as JSON on the command line. Spawn
from the main thread: the worker's parent-death signal is tied to the spawning thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Any

import msgspec


@dataclasses.dataclass
class WorkerProcess:
    worker_id: str
    role: str
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        """None while the process runs."""
        return self.process.poll()


def spawn_worker(
    worker_id: str,
    router_addr: str,
    engine_config: dict[str, Any],
    *,
    role: str = "both",
    log_level: str = "info",
    heartbeat_interval: float = 0.5,
    kv_transport: str = "auto",
    kv_host: str = "auto",
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    """Start one worker that will connect to `router_addr` and say Hello once loaded."""
    cmd = [
        sys.executable,
        "-m",
        "server.worker",
        "--worker-id",
        worker_id,
        "--role",
        role,
        "--router-addr",
        router_addr,
        "--engine-config",
        msgspec.json.encode(engine_config).decode(),
        "--parent-pid",
        str(os.getpid()),
        "--heartbeat-interval",
        str(heartbeat_interval),
        "--log-level",
        log_level,
        "--kv-transport",
        kv_transport,
        "--kv-host",
        kv_host,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    return WorkerProcess(worker_id=worker_id, role=role, process=proc)


def stop_workers(workers: list[WorkerProcess], timeout: float = 10.0) -> None:
    """SIGTERM every live worker, wait up to `timeout` in total, then SIGKILL what is left.

    Call after sending each a `Shutdown` message (the polite way); this is the guarantee."""
    for w in workers:
        if w.exit_code() is None:
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for w in workers:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            w.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            w.process.kill()
            w.process.wait()
