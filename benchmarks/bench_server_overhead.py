"""What the HTTP + router layer costs: the same workload through `pdserve serve` (streaming, at a
fixed client concurrency) vs. the engine alone, offline, in one process (same run, same engine
settings, same prompts, same output lengths).

The offline side runs `LLM.generate` over all prompts with `max_num_seqs = concurrency`, so the
engine holds exactly `concurrency` requests at a time and refills a slot the moment one
finishes: a closed loop with a zero-latency client, which is the best the server could do.
The server side runs `benchmarks/loadgen.py` at that concurrency against a server with one
worker and the same engine flags. Offline runs before and after the server run (its spread
shows the noise of the machine); the overhead is measured against their mean.

    python benchmarks/bench_server_overhead.py --concurrency 16 --num-prompts 64 --output-len 64

Prints a table and writes benchmarks/results/<date>-server-overhead-<machine>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import LoadConfig, make_prompts, print_table, run_load, save  # noqa: E402
from server.api.server_process import ServerProcess, child_pids  # noqa: E402

RESULT_TAG = "OFFLINE_RESULT "


def engine_flags(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": a.model,
        "kv_cache_memory": a.kv_cache_memory,
        "max_num_seqs": a.concurrency,
        "max_model_len": a.max_model_len,
        "device": a.device,
        "dtype": a.dtype,
        "num_threads": a.threads,
        "gpu_memory_utilization": a.gpu_memory_utilization,
    }


def offline_main(a: argparse.Namespace, prompts: list[str]) -> None:
    """The engine alone (runs in a child process, so it gives all its memory back on exit)."""
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(progress=False, **engine_flags(a))
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], warm)
    start = time.perf_counter()
    done = llm.generate(prompts, params)
    duration = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done)
    result = {
        "duration_s": duration,
        "output_tokens": tokens,
        "output_throughput": tokens / duration,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_offline(argv: list[str]) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--offline-only", *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith(RESULT_TAG))
    return json.loads(line[len(RESULT_TAG) :])


def run_server(a: argparse.Namespace) -> dict[str, Any]:
    flags = engine_flags(a)
    args = ["--model", a.model] if a.model else []
    args += [
        "--kv-cache-memory", str(flags["kv_cache_memory"]),
        "--max-num-seqs", str(flags["max_num_seqs"]),
        "--max-model-len", str(flags["max_model_len"]),
        "--device", flags["device"],
        "--dtype", flags["dtype"],
        "--gpu-memory-utilization", str(flags["gpu_memory_utilization"]),
        "--log-level", "warning",
    ]  # fmt: skip
    if a.threads:
        args += ["--worker-threads", str(a.threads)]
    with ServerProcess(args) as server:
        cfg = LoadConfig(
            base_url=server.base_url + "/v1",
            num_prompts=a.num_prompts,
            concurrency=a.concurrency,
            input_len=a.input_len,
            output_len=a.output_len,
            ignore_eos=True,
            temperature=0.0,
            seed=a.seed,
            warmup=2,
            slo_ttft_ms=a.slo_ttft,
            slo_tpot_ms=a.slo_tpot,
            processes=a.client_processes,
        )
        procs = {"router": [server.pid], "workers": child_pids(server.pid)}
        before = {k: sum(cpu_seconds(p) for p in v) for k, v in procs.items()}
        client_before = _self_cpu()
        summary = asyncio.run(run_load(cfg))
        used = {k: sum(cpu_seconds(p) for p in v) - before[k] for k, v in procs.items()}
        used["client"] = _self_cpu() - client_before
        # Busy fraction of one core per process group over the run (warm-up included).
        summary["cpu_seconds"] = used
        return summary


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    """This process and its finished children (the load generator's shards)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=None, help="GGUF file or HF folder (default: the embedded one)"
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for the engine (both sides)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=None)
    p.add_argument("--slo-tpot", type=float, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load generator processes (one Python client may be slower than the server)",
    )
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    # The loadgen's own prompts (its 2 warm-up prompts come first), so both sides see the same.
    prompts = make_prompts(a.num_prompts + 2, a.input_len, a.seed)[2:]
    if a.offline_only:
        offline_main(a, prompts)
        return 0

    before = run_offline(argv)
    served = run_server(a)
    after = run_offline(argv)
    offline_tps = (before["output_throughput"] + after["output_throughput"]) / 2
    ratio = served["output_throughput"] / offline_tps
    print_table(served, f"through the server at concurrency {a.concurrency}")
    cpu = served["cpu_seconds"]
    print(
        f"   CPU seconds during the run ({served['duration_s']:.1f}s wall): router {cpu['router']:.1f}, "
        f"workers {cpu['workers']:.1f}, load generator {cpu['client']:.1f}"
    )
    print(f"\n== engine alone (offline), {a.num_prompts} prompts, max_num_seqs {a.concurrency}")
    print(
        f"   before {before['output_throughput']:.1f} tok/s, after {after['output_throughput']:.1f} tok/s"
    )
    print(
        f"\n   server {served['output_throughput']:.1f} tok/s / offline {offline_tps:.1f} tok/s = {ratio:.3f}"
        f"  -> HTTP + router overhead {100 * (1 - ratio):.1f}%"
    )
    if not a.no_save:
        path = save(
            "server-overhead",
            {
                "args": vars(a),
                "offline_before": before,
                "offline_after": after,
                "offline_output_throughput": offline_tps,
                "server": served,
                "server_over_offline": ratio,
                "overhead_pct": 100 * (1 - ratio),
            },
        )
        print("results:", path)
    return 0 if served["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
