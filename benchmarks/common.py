"""Helpers shared by the benchmark scripts: machine description and results files."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line naming the machine: CPU model and cores, or the GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
        torch_v = torch.__version__
    except ImportError:
        torch_v = "n/a"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, torch {torch_v}"


def git_rev() -> str:
    """The checkout's commit; PDSERVE_GIT_REV overrides it (a copy whose .git is stale or absent,
    as on the GPU machine)."""
    if os.environ.get("PDSERVE_GIT_REV"):
        return os.environ["PDSERVE_GIT_REV"]
    try:
        return subprocess.check_output(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join(
        [
            line(headers),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(r) for r in cells),
        ]
    )


def write_result(name: str, body: str, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = _dt.date.today().isoformat()
    path = RESULTS / f"{today}-{name}.md"
    run = 2
    while path.exists():  # an earlier run of the same day stays as it is
        path = RESULTS / f"{today}-{name}-{run}.md"
        run += 1
    path.write_text(
        f"# {name} ({today})\n\nMachine: {machine()}\nCommit: {git_rev()}\nCommand: `{command}`\n\n"
        f"{body}\n"
    )
    return path


def graph_replay_us(fn, calls: int, rep_ms: int = 200) -> float:
    """Median device time per call of `fn()`, which makes `calls` calls, captured in one CUDA
    graph after one eager run (compiles kernels, picks cuBLAS heuristics outside the capture)."""
    import torch
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=rep_ms, return_mode="median") * 1e3 / calls
