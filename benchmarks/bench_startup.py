"""Time from `pdserve serve` to a 200 from /health (the README's first command, after the
install) and to the first completion, side by side with a baseline commit in one run.

The baseline is checked out into a temporary git worktree and started with the same Python
(same venv, same installed packages), alternating with the current tree, `--runs` times each.

    python benchmarks/bench_startup.py --baseline-rev 378bae4 [--runs 3] [-- extra serve args]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import table, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(tree: str, extra: list[str], timeout: float = 300.0) -> tuple[float, float]:
    """(seconds to /health 200, seconds to the first completion) for one cold start."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, "-c", "from server.cli import main; main()", "serve", "--port", str(port), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server in {tree} exited with {proc.returncode} before /health")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"no /health from {tree} in {timeout} s")
            time.sleep(0.05)
        ready = time.perf_counter() - t0
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 1}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            json.load(r)
        return ready, time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-rev", required=True, help="git revision to compare with")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="extra `pdserve serve` arguments (after --)")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="pdserve-baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", base, args.baseline_rev],
                   check=True, capture_output=True)
    try:
        times: dict[str, list[tuple[float, float]]] = {"current": [], f"baseline {args.baseline_rev}": []}
        for _ in range(args.runs):  # alternate: both see the same machine load
            times["current"].append(start_once(ROOT, args.extra))
            times[f"baseline {args.baseline_rev}"].append(start_once(base, args.extra))
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], check=False)

    cur_ready = statistics.median(r for r, _ in times["current"])
    cur_first = statistics.median(f for _, f in times["current"])
    rows = []
    for name, ts in times.items():
        ready = statistics.median(r for r, _ in ts)
        first = statistics.median(f for _, f in ts)
        rows.append([name, f"{ready:.2f}", f"{first:.2f}", " ".join(f"{r:.2f}" for r, _ in ts),
                     f"{ready / cur_ready:.2f}x", f"{first / cur_first:.2f}x"])
    out = table(["tree", "to /health, s (median)", "to first completion, s", "runs (to /health)",
                 "vs current (health)", "vs current (completion)"], rows)
    print(out)
    cmd = "python benchmarks/bench_startup.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_result('startup', out, cmd)}")


if __name__ == "__main__":
    main()
