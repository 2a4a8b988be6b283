"""Process lifecycle with real processes: routing over two workers, a worker killed mid-stream,
a worker that stops heartbeating, clean shutdown on SIGTERM, and workers that exit by
themselves when the router process is killed. These tests break their server on purpose, so
they run in file order on servers of their own."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.server_process import ServerProcess, child_pids, pid_alive

HEARTBEAT_TIMEOUT = 10


def worker_pids(server_pid: int) -> dict[str, int]:
    out = {}
    for pid in child_pids(server_pid):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"server.worker" in args:
            out[args[args.index(b"--worker-id") + 1].decode()] = pid
    return out


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def per_worker(base_url: str, name: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels["worker_id"]] = s.value
    return out


def sse_payloads(r: httpx.Response) -> list:
    out = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(
        ["--num-workers", "2", "--kv-cache-memory", "16MiB", "--max-num-seqs", "8", "--max-model-len", "256",
         "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--worker-threads", "1"]
    )  # fmt: skip
    with proc:
        proc.workers = worker_pids(proc.pid)
        yield proc


def test_requests_spread_over_both_workers(server):
    assert sorted(server.workers) == ["worker-0", "worker-1"]
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        body = {"prompt": "Hello there", "max_tokens": 24, "ignore_eos": True, "stream": True}
        with (
            c.stream("POST", "/v1/completions", json=body) as a,
            c.stream("POST", "/v1/completions", json=body) as b,
        ):
            assert sse_payloads(a)[-1] == "[DONE]" and sse_payloads(b)[-1] == "[DONE]"
    queries = per_worker(server.base_url, "pdserve:prefix_cache_queries_total")
    assert queries["worker-0"] > 0 and queries["worker-1"] > 0  # least-loaded routing used both


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of process `pid`, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_workers_do_not_burn_cpu(server):
    """An idle worker waits in its poll: no thread spins. (NIXL's progress thread, which its
    agent runs with no delay between progress calls, took a full core per CPU worker and made
    decode 3x slower on a 2-core host; kvcache/transfer/nixl_connector.py `progress_thread`.)"""
    time.sleep(1.0)  # the previous test's requests are done
    before = {w: cpu_seconds(pid) for w, pid in server.workers.items()}
    time.sleep(3.0)
    used = {w: cpu_seconds(pid) - before[w] for w, pid in server.workers.items()}
    assert all(u < 0.6 for u in used.values()), f"CPU seconds in 3 s idle: {used}"


def test_worker_killed_mid_stream_ends_its_requests_with_an_error(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        body = {"prompt": "Tell me a story", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            # Both workers are idle, so either may have it (ties break at random): ask.
            busy: list[str] = []

            def running() -> bool:
                busy[:] = [
                    w for w, n in per_worker(server.base_url, "pdserve:num_requests_running").items()
                    if n > 0
                ]  # fmt: skip
                return len(busy) == 1

            wait_until(running, 30, "a heartbeat showing the running request")
            victim, survivor = busy[0], ({"worker-0", "worker-1"} - set(busy)).pop()
            server.survivor = survivor
            os.kill(server.workers[victim], signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == 503 and victim in error["message"]
        assert server.health() == 503  # not every worker is up any more
        r = c.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 3, "ignore_eos": True})
        assert (
            r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        )  # the survivor serves
        up = per_worker(server.base_url, "pdserve:worker_up")
        assert up == {victim: 0.0, survivor: 1.0}


def test_worker_that_stops_heartbeating_is_declared_dead(server):
    survivor = server.survivor
    pid = server.workers[survivor]
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        os.kill(pid, signal.SIGSTOP)  # alive but silent: only the heartbeat check can tell
        started = time.monotonic()
        r = c.post("/v1/completions", json={"prompt": "Anyone?", "max_tokens": 3})
        waited = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert survivor in r.json()["error"]["message"]
        assert HEARTBEAT_TIMEOUT - 1 <= waited < HEARTBEAT_TIMEOUT + 30
        wait_until(lambda: not pid_alive(pid), 10, "the hung worker to be killed")
        r = c.post("/v1/completions", json={"prompt": "Anyone?", "max_tokens": 3})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0


def test_sigterm_stops_every_process(server):
    assert server.stop() == 0
    for wid, pid in server.workers.items():
        assert not pid_alive(pid), wid
    log = server.log_path.read_text()
    assert "pdserve stopped" in log and "Traceback" not in log


def test_workers_exit_when_the_router_process_dies():
    with ServerProcess(["--kv-cache-memory", "16MiB", "--max-model-len", "256"]) as proc:
        workers = worker_pids(proc.pid)
        assert len(workers) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.process.wait()
        wait_until(
            lambda: not any(pid_alive(p) for p in workers.values()), 30, "orphaned workers to exit"
        )
