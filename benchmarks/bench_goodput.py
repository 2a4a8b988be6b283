"""Goodput study: colocated vs disaggregated vs conditional serving on the same GPUs.

For each cluster configuration, `pdserve serve` is started once (its workers spread one per
GPU by `--gpus`' default placement) and driven by the load generator (`benchmarks/loadgen.py`,
open loop, Poisson arrivals) over a sweep of request rates on each workload of
`benchmarks/workloads.py`. Every point records each request's TTFT / TPOT and the router's
per-stage metrics (router queue, remote prefill queue and compute, KV transfer time and bytes,
decode queue, routing decisions) as the difference of two /metrics scrapes. The raw results go
to a JSON file after every point, so a run cut short keeps what it measured;
`benchmarks/goodput_report.py RAW.json` turns them into goodput tables, plots and a summary.

Configurations (all on the same 2 GPUs, same engine flags):
  colocated      2 workers of role both; every prompt prefilled where it decodes
  disagg         1 prefill + 1 decode worker; every prompt prefilled remotely (mode always)
  conditional    1 prefill + 1 decode worker; the router's conditional mode (short prompts
                 local; long ones remote unless the prefill worker's backlog of prompt tokens
                 would make the first token later than a local prefill would)
  conditional-both  2 workers of role both in conditional mode: each decodes and each can
                 prefill for the other, so a long prompt's prefill can leave a busy worker

A sweep goes up the rate grid and stops once a point is far past the relaxed SLO (its p90 TTFT
or TPOT above `--stop-factor` x the relaxed SLO, or requests failed): higher rates only queue.

    python benchmarks/bench_goodput.py --out benchmarks/results/goodput-h200x2.json   # 2 GPUs
    python benchmarks/bench_goodput.py --model random:smollm2-135m --device cpu \\
        --length-scale 0.02 --rates mix=0.5,1 --workloads mix --configs disagg --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.common import git_rev, machine  # noqa: E402
from benchmarks.loadgen import LoadConfig, run_load  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402
from server.api.server_process import ServerProcess  # noqa: E402

_PD = ["--prefill-workers", "1", "--decode-workers", "1"]
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "colocated": ("2 x both, prefill where decoded", ["--num-workers", "2", "--disagg-mode", "never"]),
    "disagg": ("1 prefill + 1 decode, always remote", [*_PD, "--disagg-mode", "always"]),
    "conditional": ("1 prefill + 1 decode, conditional", [*_PD, "--disagg-mode", "conditional"]),
    "single": ("1 x both (one GPU; a reference, not a 2-GPU configuration)",
               ["--num-workers", "1", "--disagg-mode", "never"]),
    "conditional-both": ("2 x both, conditional", ["--num-workers", "2", "--disagg-mode", "conditional"]),
}  # fmt: skip
# Offered rates (requests/s, whole cluster) for an 8B model on two H200s.
DEFAULT_RATES = {
    "long": [2.0, 4.0, 6.0, 8.0, 10.0, 13.0],
    "chat": [25.0, 50.0, 75.0, 100.0, 150.0],
    "mix": [4.0, 8.0, 12.0, 16.0, 24.0],
}
SLOS = [
    {"name": "strict", "ttft_ms": 500.0, "tpot_ms": 30.0},
    {"name": "relaxed", "ttft_ms": 2000.0, "tpot_ms": 100.0},
]
HISTOGRAMS = {  # router-side stage histograms: name -> key in the point's "stages"
    "pdserve:router_queue_time_seconds": "router_queue",
    "pdserve:decode_queue_time_seconds": "decode_queue",
    "pdserve:remote_prefill_queue_time_seconds": "prefill_queue",
    "pdserve:remote_prefill_time_seconds": "remote_prefill",
    "pdserve:kv_transfer_seconds": "kv_transfer",
    "pdserve:request_queue_time_seconds": "worker_queue",
    "pdserve:request_prefill_time_seconds": "worker_prefill",
}
COUNTERS = {
    "pdserve:kv_transfer_bytes_total": "kv_bytes",
    "pdserve:kv_transfer_failures_total": "transfer_failures",
    "pdserve:disagg_fallback_total": "fallbacks",
    "pdserve:kv_lease_expiries_total": "lease_expiries",
    "pdserve:num_preemptions_total": "preemptions",
}


def scrape(base_url: str) -> dict[str, Any]:
    """Cluster-wide totals (summed over labels) of the counters and histograms above."""
    flat: dict[str, float] = {}
    decisions: dict[str, float] = {}
    text = httpx.get(base_url + "/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "pdserve:disagg_decision_total":
                decisions[s.labels["decision"]] = s.value
            elif (
                s.name in COUNTERS
                or s.name.removesuffix("_sum") in HISTOGRAMS
                or (s.name.removesuffix("_count") in HISTOGRAMS)
            ):
                flat[s.name] = flat.get(s.name, 0.0) + s.value
    return {"flat": flat, "decisions": decisions}


def metrics_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    def d(name: str) -> float:
        return after["flat"].get(name, 0.0) - before["flat"].get(name, 0.0)

    out: dict[str, Any] = {key: d(name) for name, key in COUNTERS.items()}
    out["stages"] = {
        key: {"sum_s": d(name + "_sum"), "count": d(name + "_count")}
        for name, key in HISTOGRAMS.items()
    }
    out["transfers"] = out["stages"]["kv_transfer"]["count"]
    out["transfer_seconds"] = out["stages"]["kv_transfer"]["sum_s"]
    keys = set(before["decisions"]) | set(after["decisions"])
    decisions = {k: after["decisions"].get(k, 0.0) - before["decisions"].get(k, 0.0) for k in keys}
    out["decisions"] = {k: v for k, v in sorted(decisions.items()) if v}
    return out


def num_prompts(rate: float, seconds: float, lo: int, hi: int) -> int:
    """Requests for one point: `seconds` of arrivals at `rate`, within [lo, hi]."""
    return max(lo, min(hi, round(rate * seconds)))


def past_saturation(summary: dict[str, Any], relaxed: dict[str, float], factor: float) -> bool:
    """True when a point is far beyond the relaxed SLO: higher rates would only queue."""
    return (
        summary["failed"] > 0
        or summary["ttft_ms"]["p90"] > factor * relaxed["ttft_ms"]
        or summary["tpot_ms"]["p90"] > factor * relaxed["tpot_ms"]
    )


class Results:
    """The raw JSON, rewritten after every point."""

    def __init__(self, path: Path, header: dict[str, Any], append: bool) -> None:
        self.path = path
        self.data = header | {"points": []}
        if append and path.exists():
            old = json.loads(path.read_text())
            self.data["points"] = old["points"]
            self.data["command"] = old.get("command", "") + " && " + header["command"]
            names = {c["name"] for c in header["configs"]}
            self.data["configs"] = [c for c in old["configs"] if c["name"] not in names] + header[
                "configs"
            ]
        self.save()

    def add(self, point: dict[str, Any]) -> None:
        self.data["points"].append(point)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def parse_rates(items: list[str]) -> dict[str, list[float]]:
    rates = {k: list(v) for k, v in DEFAULT_RATES.items()}
    for item in items:
        name, _, values = item.partition("=")
        if name not in WORKLOADS or not values:
            raise SystemExit(f"--rates {item!r}: expected WORKLOAD=R1,R2,... with a workload "
                             f"of {', '.join(WORKLOADS)}")  # fmt: skip
        rates[name] = sorted(float(v) for v in values.split(","))
    return rates


def run_config(name: str, args: argparse.Namespace, rates: dict[str, list[float]],
               results: Results, deadline: float) -> None:  # fmt: skip
    label, flags = CONFIGS[name]
    server_args = [*args.engine_flags, *flags]
    print(f"\n=== {name} ({label}): pdserve serve {' '.join(server_args)}", flush=True)
    t_start = time.monotonic()
    server = ServerProcess(server_args)
    try:
        server.wait_ready(timeout=args.start_timeout)
        print(f"ready in {time.monotonic() - t_start:.0f} s", flush=True)
        for workload in args.workloads:
            if args.warmup:  # untimed, before the first scrape: first-use costs stay out
                asyncio.run(run_load(LoadConfig(
                    base_url=server.base_url + "/v1", num_prompts=args.warmup,
                    concurrency=args.warmup, workload=workload, length_scale=args.length_scale,
                    seed=99, warmup=0, timeout=args.request_timeout,
                )))  # fmt: skip
            for i, rate in enumerate(rates[workload]):
                n = num_prompts(rate, args.point_seconds, args.min_prompts, args.max_prompts)
                if time.monotonic() + n / rate + args.tail_seconds > deadline:
                    print(f"  {workload} @ {rate}/s: skipped, past --deadline", flush=True)
                    break
                cfg = LoadConfig(
                    base_url=server.base_url + "/v1", num_prompts=n, request_rate=rate,
                    workload=workload, length_scale=args.length_scale, seed=1000 * i + 7,
                    warmup=0, processes=args.processes,
                    timeout=args.request_timeout, keep_requests=True,
                )  # fmt: skip
                before = scrape(server.base_url)
                summary = asyncio.run(run_load(cfg))
                server_side = metrics_delta(before, scrape(server.base_url))
                point = {
                    "config": name, "workload": workload, "rate": rate, "num_prompts": n,
                    "duration_s": summary["duration_s"], "completed": summary["completed"],
                    "failed": summary["failed"], "errors": summary["errors"],
                    "requests": summary["requests"], "server": server_side,
                }  # fmt: skip
                results.add(point)
                s = summary
                print(f"  {workload} @ {rate:g}/s x{n}: done {s['completed']} failed {s['failed']}"
                      f"  TTFT p50/p90 {s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p90']:.0f} ms"
                      f"  TPOT p50/p90 {s['tpot_ms']['p50']:.1f}/{s['tpot_ms']['p90']:.1f} ms"
                      f"  KV {server_side['kv_bytes'] / 2**30:.1f} GiB"
                      f" in {server_side['transfers']:.0f} transfers"
                      f"  decisions {server_side['decisions']}", flush=True)  # fmt: skip
                if "local_no_prefill" in server_side["decisions"] and "--prefill-workers" in flags:
                    print(f"  {name}: the prefill worker is gone (see the server log); this "
                          "configuration's results stop here", flush=True)  # fmt: skip
                    return
                if past_saturation(summary, SLOS[-1], args.stop_factor):
                    print(f"  {workload}: past saturation, sweep stops", flush=True)
                    break
    finally:
        code = server.stop()
        if args.log_dir:
            dest = Path(args.log_dir) / f"server-{name}.log"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(server.log_path.read_text(errors="replace"))
        print(f"server {name} stopped (exit {code})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        default="colocated,disagg,conditional",
        help=f"comma-separated, of {', '.join(CONFIGS)}",
    )
    p.add_argument("--workloads", default="long,chat,mix", help=f"of {', '.join(WORKLOADS)}")
    p.add_argument("--rates", action="append", default=[],
                   help="WORKLOAD=R1,R2,... offered rates (req/s), repeatable; defaults: "
                        + "; ".join(f"{k}={','.join(f'{r:g}' for r in v)}"
                                    for k, v in DEFAULT_RATES.items()))  # fmt: skip
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=8704)
    p.add_argument("--kv-transport", default="auto")
    p.add_argument("--extra", default="", help="more `pdserve serve` flags for every config")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="scale every workload length (CPU smoke runs)")  # fmt: skip
    p.add_argument("--point-seconds", type=float, default=8.0, help="arrivals per point")
    p.add_argument("--min-prompts", type=int, default=30, help="per point: p90s of fewer are noise")
    p.add_argument(
        "--max-prompts",
        type=int,
        default=1200,
        help="per point (300 cut chat at 150 req/s to 2 s of arrivals)",
    )
    p.add_argument("--tail-seconds", type=float, default=10.0,
                   help="expected drain after the last arrival (deadline check)")  # fmt: skip
    p.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="untimed requests (at once) before each workload's sweep",
    )
    p.add_argument("--processes", type=int, default=4, help="load generator processes")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--stop-factor", type=float, default=2.0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="seconds from now after which no new point starts (0: none)",
    )
    p.add_argument("--out", default=None, help="raw JSON (default: benchmarks/results/"
                   "<date>-goodput-<gpu>.json)")  # fmt: skip
    p.add_argument("--append", action="store_true", help="add to an existing --out file")
    p.add_argument("--log-dir", default=None, help="copy each server's log here")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    for w in args.workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    rates = parse_rates(args.rates)
    args.engine_flags = [
        "--model", args.model, "--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
        "--max-model-len", str(args.max_model_len), "--kv-transport", args.kv_transport,
        *args.extra.split(),
    ]  # fmt: skip
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    gpu = machine().split(",")[0]
    tag = "".join(ch if ch.isalnum() else "-" for ch in gpu).strip("-").lower()[:40]
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results" / f"{stamp}-goodput-{tag}.json"
    )  # fmt: skip
    try:
        import torch

        gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    except ImportError:
        gpus = 0
    header = {
        "benchmark": "goodput", "date": time.strftime("%Y-%m-%dT%H%MZ", time.gmtime()),
        "machine": machine(), "commit": git_rev(),
        "command": "python benchmarks/bench_goodput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "gpus": min(gpus, 2) or 1, "engine_flags": args.engine_flags,
        "slos": SLOS,
        "configs": [{"name": c, "label": CONFIGS[c][0], "flags": CONFIGS[c][1],
                     "gpus": 1 if c == "single" else min(gpus, 2) or 1} for c in configs],
        "workloads": [{"name": w, "description": WORKLOADS[w], "rates": rates[w],
                       "length_scale": args.length_scale} for w in args.workloads],
    }  # fmt: skip
    results = Results(out, header, args.append)
    deadline = time.monotonic() + args.deadline if args.deadline > 0 else float("inf")
    for c in configs:
        if time.monotonic() > deadline:
            print(f"=== {c}: skipped, past --deadline", flush=True)
            continue
        run_config(c, args, rates, results, deadline)
    print("raw results:", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
