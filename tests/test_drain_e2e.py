"""Graceful drain end to end, with real processes: `pdserve router` and two `pdserve worker`s
(role both, KV over the ZMQ transport, every prompt prefilled on the other worker), a bounded
load of streaming and non-streaming greedy requests, and SIGTERM to one worker while it holds
requests of both kinds (decoding its own, prefilling for the other). No request fails, every
output is the same as that prompt's other runs, the drained worker exits 0 well before its
drain timeout, and the router keeps serving with the other worker."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.api.server_process import free_port
from tests.test_cluster_join import Proc, health, integrity, wait_until
from tests.test_disagg_e2e import REPORT, STORY, metric

ENGINE = ["--dtype", "float32", "--kv-cache-memory", "48MiB", "--max-model-len", "512",
          "--max-num-seqs", "8", "--worker-threads", "1", "--kv-transport", "zmq"]  # fmt: skip
PROMPTS = [
    "Drain test. " + STORY,
    "Drain test. " + REPORT,
    "Hello, my name is",
    "Drain test. " + STORY + "Question: what did the keeper write about?",
]
MAX_TOKENS = 16


def one_request(base: str, i: int) -> dict:
    """One greedy completion, streamed for odd i; never raises: failures are in the result."""
    prompt = PROMPTS[i % len(PROMPTS)]
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream": bool(i % 2)}  # fmt: skip
    res = {"i": i, "prompt": i % len(PROMPTS), "ok": False, "text": "", "error": None}
    try:
        if not body["stream"]:
            r = httpx.post(base + "/v1/completions", json=body, timeout=120)
            if r.status_code != 200:
                res["error"] = f"{r.status_code}: {r.text[:300]}"
                return res
            choice = r.json()["choices"][0]
            res["text"], finish = choice["text"], choice["finish_reason"]
            tokens = r.json()["usage"]["completion_tokens"]
        else:
            finish, tokens = None, 0
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    res["error"] = f"{r.status_code}: {r.read()[:300]!r}"
                    return res
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        res["error"] = f"stream error: {event['error']}"
                        return res
                    for c in event["choices"]:
                        res["text"] += c["text"]
                        finish = c.get("finish_reason") or finish
            tokens = MAX_TOKENS if finish == "length" else -1
        if finish != "length" or tokens != MAX_TOKENS:
            res["error"] = f"finish_reason={finish} completion_tokens={tokens}"
            return res
        res["ok"] = True
    except httpx.HTTPError as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


def run_load(base: str, n: int, concurrency: int, started: list[int]) -> list[dict]:
    """`n` requests, `concurrency` at a time; `started` counts those sent so far."""

    def task(i: int) -> dict:
        started.append(i)
        return one_request(base, i)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(task, range(n)))


def check_results(results: list[dict]) -> None:
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed[:5]
    by_prompt: dict[int, set[str]] = {}
    for r in results:
        by_prompt.setdefault(r["prompt"], set()).add(r["text"])
    assert all(len(texts) == 1 for texts in by_prompt.values()), by_prompt


@pytest.fixture
def cluster():
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    router = Proc("router", "--host", "127.0.0.1", "--port", str(port), "--control-addr", control,
                  "--disagg-mode", "always", "--enable-debug-endpoints")  # fmt: skip
    procs = [router]
    base = f"http://127.0.0.1:{port}"
    try:
        for wid in ("w0", "w1"):
            procs.append(Proc("worker", "--router", control, "--role", "both", "--worker-id", wid,
                              "--drain-timeout", "60", *ENGINE))  # fmt: skip
        wait_until(lambda: health(base) == 200 and len(integrity(base)) == 2, 180, "workers")
        yield base, router, procs[1], procs[2]
    finally:
        for p in reversed(procs):
            p.stop(timeout=30)


def test_sigterm_drains_a_worker_under_load_without_failing_a_request(cluster):
    base, router, w0, w1 = cluster
    started: list[int] = []
    out: list[list[dict]] = []
    load = threading.Thread(target=lambda: out.append(run_load(base, 40, 6, started)))
    load.start()
    try:
        # Wait until w1 holds requests of both kinds (or, after 30 s, of either), then SIGTERM.
        t_start = time.monotonic()
        while time.monotonic() < t_start + 120 and load.is_alive():
            running = metric(base, "pdserve:num_requests_running", worker_id="w1")
            prefills = metric(base, "pdserve:remote_prefills_inflight", worker_id="w1")
            if (running and prefills) or (time.monotonic() > t_start + 30 and running + prefills):
                break
            time.sleep(0.1)
        assert load.is_alive(), "the load ended before w1 held anything"
        sent_before = len(started)
        t0 = time.monotonic()
        w1.process.send_signal(signal.SIGTERM)
        assert w1.process.wait(60) == 0, w1.log()[-3000:]
        drain_s = time.monotonic() - t0
    finally:
        load.join(300)
    assert not load.is_alive()
    (results,) = out
    check_results(results)
    assert len(started) > sent_before, "no request was sent after the drain began"

    m = re.search(
        r"worker w1 is draining \(up to 60s\): (\d+) requests, (\d+) remote", router.log()
    )
    assert m, router.log()[-3000:]
    assert int(m.group(1)) + int(m.group(2)) > 0, "w1 held nothing when it began to drain"
    assert "worker exiting (drained)" in w1.log() or "drained in" in w1.log()
    assert drain_s < 60
    # The router carries on with w0 alone; nothing leaked anywhere.
    assert set(integrity(base)) == {"w0"} and health(base) == 200
    assert metric(base, "pdserve:worker_up", worker_id="w1") == 0
    check_results(run_load(base, 4, 2, []))
    rep = integrity(base)["w0"]
    assert rep["ok"] and rep["num_requests"] == 0, rep
    assert w0.process.poll() is None
