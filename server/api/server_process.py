"""Run `pdserve serve` as a child process: for tests and benchmarks that need a real server.

`ServerProcess(args)` starts `python -m server.api --port <free port> <args>`, `wait_ready()`
polls /health until every worker has done its handshake, `stop()` sends SIGTERM (what Ctrl-C
or Kubernetes does) and waits. Output goes to a log file (`log_path`), so a chatty server
never blocks on a full pipe.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc; empty elsewhere or once it has exited)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class ServerProcess:
    def __init__(
        self, args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        fd, path = tempfile.mkstemp(prefix="pdserve-", suffix=".log")
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "wb")
        cmd = [
            sys.executable,
            "-m",
            "server.api",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        repo_root = str(Path(__file__).resolve().parents[2])
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo_root, child_env.get("PYTHONPATH")) if p
        )
        self.process = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=child_env, cwd=cwd
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def health(self, timeout: float = 5.0) -> int:
        """The /health status code (0 when the server does not answer)."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.health() == 200:
                return
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL only if it hangs. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
