"""Multi-host disaggregation on one machine: every process in its own network namespace.

Namespaces `router`, `prefill`, `decode` (and later `decode2`) each get one veth link to a
bridge (in a namespace of its own) on a private subnet 10.213.X.0/24 that this test creates;
the test process reaches the router over one more veth from the root namespace. `pdserve
router` binds its HTTP and control addresses on its namespace's address; `pdserve worker`s join
it with `--router tcp://<router ip>:<port>` and move KV with `--kv-transport nixl`, UCX
restricted to TCP on the namespace's link (`UCX_TLS=tcp`, `UCX_NET_DEVICES`), so the KV really
crosses the bridge. Checked: greedy outputs equal a colocated `pdserve serve` run, KV bytes
moved (router metrics and the decode namespace's link counters); then, under a bounded load,
a third worker (role decode, new namespace) joins, the first decode worker and then the
prefill worker are drained with SIGTERM, and no request fails. Namespaces, links and processes
are removed in a finalizer, even on failure.

Needs root and `ip netns` (iproute2); skipped otherwise. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_disagg_e2e import MAX_TOKENS as DISAGG_MAX_TOKENS
from tests.test_disagg_e2e import PROMPTS, metric

ROOT = str(Path(__file__).resolve().parents[1])
MAX_TOKENS = 12
ENGINE = ["--dtype", "float32", "--kv-cache-memory", "48MiB", "--max-num-seqs", "8",
          "--max-model-len", "1024", "--worker-threads", "1"]  # fmt: skip
IFACE = "pd0"  # the link's name inside every namespace
PREFIX = "pdmh"  # every namespace and root-namespace link this test creates starts with it


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and veth links)"
    if shutil.which("ip") is None:
        return "needs `ip` (iproute2: apt-get install -y iproute2)"
    probe = f"{PREFIX}probe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    try:
        import nixl  # noqa: F401
    except ImportError:
        return "needs nixl (the test extra installs it)"
    return None


@pytest.fixture(scope="module", autouse=True)
def netns_available() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Namespaces and links left by an earlier run of this test that was killed outright (their
    names carry the pid of the pytest process that made them)."""
    names = ip("netns", "list", check=False).stdout.split()
    links = re.findall(rf"^\d+: ({PREFIX}\d+)[@:]", ip("-o", "link", check=False).stdout, re.M)
    for name in names + links:
        m = re.match(rf"{PREFIX}(\d+)", name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if name in names:
                ip("netns", "del", name, check=False)
            else:
                ip("link", "del", name, check=False)


def free_subnet() -> int:
    """A /24 of 10.213.0.0/16 that no route of the root namespace covers."""
    routes = ip("-4", "route", "show", "table", "all", check=False).stdout
    for i in range(256):
        x = (os.getpid() + i) % 200 + 20
        if f"10.213.{x}." not in routes:
            return x
    raise RuntimeError("no free 10.213.X.0/24")


class Net:
    """A bridge in a namespace of its own, one namespace per host, the root namespace linked
    in too (so the test reaches the router). Everything is named PREFIX<pid>..."""

    def __init__(self) -> None:
        remove_stale()
        self.tag = f"{PREFIX}{os.getpid()}"
        self.x = free_subnet()
        self.bridge_ns = f"{self.tag}-br"
        self.hosts: dict[str, str] = {}  # name -> address
        self.namespaces: list[str] = []
        self.host_link = self.tag  # in the root namespace (IFNAMSIZ: 15 chars)
        self._add_ns(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        ip("link", "add", self.host_link, "type", "veth", "peer", "name", "root",
           "netns", self.bridge_ns)  # fmt: skip
        ip("-n", self.bridge_ns, "link", "set", "root", "master", "br0", "up")
        ip("addr", "add", f"{self.addr(254)}/24", "dev", self.host_link)
        ip("link", "set", self.host_link, "up")

    def addr(self, n: int) -> str:
        return f"10.213.{self.x}.{n}"

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> str:
        """A namespace `<tag>-<name>` with IFACE on the bridge; returns its address."""
        ns = self.ns(name)
        address = self.addr(len(self.hosts) + 1)
        self._add_ns(ns)
        ip("-n", ns, "link", "add", IFACE, "type", "veth", "peer", "name", name,
           "netns", self.bridge_ns)  # fmt: skip
        ip("-n", self.bridge_ns, "link", "set", name, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", IFACE)
        ip("-n", ns, "link", "set", IFACE, "up")
        self.hosts[name] = address
        return address

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def rx_bytes(self, name: str) -> int:
        out = ip("-n", self.ns(name), "-s", "link", "show", IFACE).stdout
        return int(out.split("RX:")[1].splitlines()[1].split()[0])

    def tcp_peers(self, name: str) -> set[str]:
        """Remote addresses of the established TCP connections in a namespace."""
        r = subprocess.run(["ip", "netns", "exec", self.ns(name), "ss", "-Htn", "state",
                            "established"], capture_output=True, text=True)  # fmt: skip
        return {line.split()[-1].rsplit(":", 1)[0] for line in r.stdout.splitlines() if line}

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            for pid in ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)  # only ours can live in our namespaces
            ip("netns", "del", ns, check=False)
        ip("link", "del", self.host_link, check=False)  # gone with its peer already, normally


class NsProc:
    """`pdserve ...` inside a namespace (`ip netns exec` execs it: the pid is pdserve's)."""

    def __init__(self, net: Net, host: str, *args: str, env: dict[str, str] | None = None):
        fd, path = tempfile.mkstemp(prefix=f"pdserve-netns-{host}-", suffix=".log")
        self.name = host
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "wb")
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [ROOT, os.environ.get("PYTHONPATH")])
        )
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", net.ns(host), sys.executable, "-m", "server.cli", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=child_env,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def wait_until(cond, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            if p.process.poll() is not None:
                raise AssertionError(
                    f"{p.name} exited ({p.process.returncode}):\n{p.log()[-3000:]}"
                )
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.log()[-2000:]}" for p in procs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


def body(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "logprobs": 0}  # fmt: skip


def tokens_of(base: str, prompt: str, client: httpx.Client | None = None) -> list[str]:
    r = (client or httpx).post(base + "/v1/completions", json=body(prompt), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def reference(colocated_outputs) -> dict[str, list[str]]:
    """Greedy tokens of every prompt from the colocated server (one worker, one host): the
    same run test_disagg_e2e compares with (tests/conftest.py; same prompts, MAX_TOKENS and
    request body), started once for both."""
    assert MAX_TOKENS == DISAGG_MAX_TOKENS
    return {p: out["tokens"] for p, out in zip(PROMPTS, colocated_outputs, strict=True)}


class Load:
    """A bounded background load: `concurrency` clients send PROMPTS round-robin until
    `stop()` is called, `max_requests` were sent or `max_seconds` passed; it records every
    failure and every output that differs from the reference."""

    def __init__(self, base: str, reference: dict[str, list[str]], concurrency: int = 3,
                 max_requests: int = 400, max_seconds: float = 150) -> None:  # fmt: skip
        self.base, self.reference = base, reference
        self.max_requests, self.deadline = max_requests, time.monotonic() + max_seconds
        self.sent = self.done = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True)
                        for _ in range(concurrency)]  # fmt: skip
        for t in self.threads:
            t.start()

    def _client(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                with self._lock:
                    if self.sent >= self.max_requests:
                        return
                    i, self.sent = self.sent, self.sent + 1
                prompt = PROMPTS[i % len(PROMPTS)]
                try:
                    r = client.post(self.base + "/v1/completions", json=body(prompt))
                    if r.status_code != 200:
                        err = f"request {i}: {r.status_code} {r.text[:300]}"
                    elif r.json()["choices"][0]["logprobs"]["tokens"] != self.reference[prompt]:
                        err = f"request {i}: output differs from the colocated run"
                    else:
                        err = None
                except httpx.HTTPError as exc:
                    err = f"request {i}: {type(exc).__name__}: {exc}"
                with self._lock:
                    self.done += 1
                    if err:
                        self.failures.append(err)

    def wait_done(self, n: int, timeout: float = 60) -> None:
        """Until `n` more requests have completed."""
        target = self.done + n
        wait_until(lambda: self.done >= target or not self.running(), timeout, f"{n} requests")

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(150)
        assert not self.running()


def workers(base: str) -> dict:
    return httpx.get(base + "/debug/integrity", timeout=60).json()["workers"]


def health(base: str) -> int:
    try:
        return httpx.get(base + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_router_and_workers_in_separate_network_namespaces(reference):
    net = Net()
    procs: list[NsProc] = []
    load: Load | None = None
    try:
        router_ip = net.add_host("router")
        addrs = {name: net.add_host(name) for name in ("prefill", "decode", "decode2")}
        base, control = f"http://{router_ip}:8000", f"tcp://{router_ip}:5555"
        router = NsProc(net, "router", "router", "--host", router_ip, "--port", "8000",
                        "--control-addr", control, "--disagg-mode", "always",
                        "--enable-debug-endpoints")  # fmt: skip
        procs.append(router)

        def worker(host: str, role: str, wid: str) -> NsProc:
            env = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": IFACE}
            w = NsProc(net, host, "worker", "--router", control, "--role", role, "--worker-id",
                       wid, "--kv-transport", "nixl", "--drain-timeout", "60", *ENGINE, env=env)  # fmt: skip
            procs.append(w)
            return w

        p0, d0 = worker("prefill", "prefill", "p0"), worker("decode", "decode", "d0")
        wait_until(lambda: health(base) == 200 and set(workers(base)) == {"p0", "d0"}, 180,
                   "p0 and d0 to join", procs)  # fmt: skip
        assert f"KV transport nixl ({addrs['prefill']})" in p0.log()

        # Greedy outputs equal the colocated run; the KV crossed the bridge over UCX/TCP.
        rx_before = net.rx_bytes("decode")
        for prompt in PROMPTS:
            assert tokens_of(base, prompt) == reference[prompt], prompt[:40]
        moved = metric(base, "pdserve:kv_transfer_bytes_total", worker_id="p0")
        assert moved > 0
        assert metric(base, "pdserve:kv_transfer_failures_total") == 0
        assert metric(base, "pdserve:disagg_decision_total", decision="remote_mode") >= len(PROMPTS)
        assert net.rx_bytes("decode") - rx_before >= moved
        assert addrs["decode"] in net.tcp_peers("prefill")  # P's UCX endpoint to D

        # Under load: a third worker joins, then d0 and p0 drain; nothing fails.
        load = Load(base, reference)
        load.wait_done(3)
        d2 = worker("decode2", "decode", "d2")
        wait_until(lambda: "d2" in workers(base), 180, "d2 to join", procs)
        wait_until(lambda: metric(base, "pdserve:prefix_cache_queries_total", worker_id="d2") > 0,
                   60, "d2 to take requests", procs)  # fmt: skip
        load.wait_done(2)
        d0.process.send_signal(signal.SIGTERM)
        assert d0.process.wait(90) == 0, d0.log()[-3000:]
        assert "drained in" in d0.log(), d0.log()[-3000:]
        load.wait_done(3)
        assert set(workers(base)) == {"p0", "d2"}
        # Best effort: SIGTERM p0 while a remote prefill is on it (they last a fraction of a s).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not metric(
            base, "pdserve:remote_prefills_inflight", worker_id="p0"
        ):
            time.sleep(0.03)
        p0.process.send_signal(signal.SIGTERM)
        assert p0.process.wait(90) == 0, p0.log()[-3000:]
        assert "drained in" in p0.log(), p0.log()[-3000:]
        load.wait_done(3)  # d2 alone: prefilled locally
        load.stop()
        assert not load.failures, load.failures[:5]
        assert load.done >= 11 and health(base) == 200
        assert set(workers(base)) == {"d2"}
        assert metric(base, "pdserve:kv_transfer_failures_total") == 0
        assert metric(base, "pdserve:disagg_decision_total", decision="local_no_prefill") > 0
        rep = workers(base)["d2"]
        assert rep["ok"] and rep["num_requests"] == 0, rep
        assert d2.process.poll() is None and router.process.poll() is None
    finally:
        if load is not None:
            load.stop()
        for p in reversed(procs):
            p.stop()
        net.close()
    assert not [ns for ns in ip("netns", "list").stdout.split() if ns.startswith(net.tag)]
