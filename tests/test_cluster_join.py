"""The multi-host commands on one host: `pdserve router` alone, then `pdserve worker`
processes that join it over TCP, a worker with an incompatible KV layout that is refused, a
prefill worker that leaves and another that joins — all without restarting the router."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from server.api.server_process import free_port
from tests.test_disagg_e2e import REPORT, metric

ROOT = str(Path(__file__).resolve().parents[1])
ENGINE = ["--dtype", "float32", "--kv-cache-memory", "32MiB", "--max-model-len", "512",
          "--worker-threads", "1", "--kv-transport", "zmq"]  # fmt: skip


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Proc:
    """A `pdserve` subcommand as a child process, its output in a log file."""

    def __init__(self, *args: str) -> None:
        fd, path = tempfile.mkstemp(prefix="pdserve-join-", suffix=".log")
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "wb")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen([sys.executable, "-m", "server.cli", *args],
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env)  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def cluster():
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    router = Proc("router", "--host", "127.0.0.1", "--port", str(port), "--control-addr", control,
                  "--disagg-mode", "always", "--enable-debug-endpoints")  # fmt: skip
    procs = [router]

    def worker(wid: str, role: str, *extra: str) -> Proc:
        w = Proc("worker", "--router", control, "--role", role, "--worker-id", wid, *ENGINE, *extra)
        procs.append(w)
        return w

    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: health(base) == 503, 60, "the router to answer (no worker yet)")
        yield base, router, worker
    finally:
        for p in reversed(procs):
            p.stop()


def health(base: str) -> int:
    try:
        return httpx.get(base + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def ask(base: str, prompt: str) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    return httpx.post(base + "/v1/completions", json=body, timeout=120)


def test_workers_join_leave_and_rejoin_a_running_router(cluster):
    base, router, worker = cluster
    d0, p0 = worker("d0", "decode"), worker("p0", "prefill")
    wait_until(lambda: health(base) == 200 and len(integrity(base)) == 2, 120, "both to join")
    r = ask(base, "Joined. " + REPORT)
    assert r.status_code == 200, r.text
    assert metric(base, "pdserve:kv_transfer_bytes_total", worker_id="p0") > 0

    # A worker whose KV cannot be exchanged (other block size) is turned away, clearly.
    bad = worker("p-bad", "prefill", "--block-size", "32")
    assert bad.process.wait(120) == 0  # told to shut down
    assert "block_size: 16 here vs 32 there" in router.log()
    assert health(base) == 200 and set(integrity(base)) == {"d0", "p0"}

    # The prefill worker leaves: the decode worker carries on alone.
    assert p0.stop() == 0
    wait_until(lambda: set(integrity(base)) == {"d0"}, 30, "p0 to be forgotten")
    assert health(base) == 200
    r = ask(base, "Alone. " + REPORT)
    assert r.status_code == 200
    assert metric(base, "pdserve:disagg_decision_total", decision="local_no_prefill") >= 1

    # Another joins and takes the prefills.
    worker("p1", "prefill")
    wait_until(lambda: set(integrity(base)) == {"d0", "p1"}, 120, "p1 to join")
    r = ask(base, "Rejoined. " + REPORT)
    assert r.status_code == 200
    assert metric(base, "pdserve:kv_transfer_bytes_total", worker_id="p1") > 0
    for wid, rep in integrity(base).items():
        assert rep["ok"] and rep["num_requests"] == 0, (wid, rep)
    assert d0.process.poll() is None


def integrity(base: str) -> dict:
    return httpx.get(base + "/debug/integrity", timeout=60).json()["workers"]
