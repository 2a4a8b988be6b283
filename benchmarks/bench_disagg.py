"""Colocated vs disaggregated serving on one mixed workload, side by side in one run.

Three clusters of two workers each, started one after the other with `pdserve serve`, each
driven by the load generator with the same open-loop (Poisson) mix of long prompts and short
chats:
  * 2 x both      two colocated workers, least-cost routing, every prefill local
  * 1P1D always   one prefill worker computes every prompt, one decode worker decodes
  * 1P1D cond.    the router's conditional mode: long prompts prefilled remotely, short local
Reported: TTFT and TPOT p50 / p90 / p99 over all requests and per class, goodput (requests per
second that met both SLOs) and the KV bytes the cluster moved. On a shared machine, other jobs
skew whichever cluster they overlap: `--rounds 2` runs the three clusters twice, interleaved,
`--max-load` waits for a quiet machine before each one, and every row records the load
average during its run.

    python benchmarks/bench_disagg.py                       # defaults sized for a small CPU box
    python benchmarks/bench_disagg.py --num-prompts 64 --request-rate 1.5 --slo-ttft 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.common import machine, table, write_result  # noqa: E402
from benchmarks.loadgen import LoadConfig, run_load  # noqa: E402
from server.api.server_process import ServerProcess  # noqa: E402

CONFIGS = [
    ("2 x both", ["--num-workers", "2", "--disagg-mode", "never"]),
    ("1P1D always", ["--prefill-workers", "1", "--decode-workers", "1", "--disagg-mode", "always"]),
    ("1P1D conditional",
     ["--prefill-workers", "1", "--decode-workers", "1", "--disagg-mode", "conditional"]),
]  # fmt: skip


def scrape(base_url: str) -> dict[str, float]:
    want = {
        "pdserve:kv_transfer_bytes_total": "kv_bytes",
        "pdserve:kv_transfer_seconds_count": "transfers",
        "pdserve:kv_transfer_failures_total": "transfer_failures",
        "pdserve:disagg_fallback_total": "fallbacks",
        "pdserve:kv_lease_expiries_total": "lease_expiries",
    }
    out = dict.fromkeys(want.values(), 0.0)
    decisions: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for s in fam.samples:
            if s.name in want:
                out[want[s.name]] += s.value
            elif s.name == "pdserve:disagg_decision_total":
                decisions[s.labels["decision"]] = s.value
    out["decisions"] = decisions  # type: ignore[assignment]
    return out


class LoadSampler:
    """The 1-minute load average every few seconds while a run lasts (other jobs' share)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(5.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else os.getloadavg()[0]


def wait_quiet(max_load: float, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=0.6, help="Poisson arrivals per second")
    p.add_argument("--input-len", type=int, default=40, help="short chat, words")
    p.add_argument("--long-input-len", type=int, default=800, help="long prompt, words")
    p.add_argument("--long-fraction", type=float, default=0.25)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--slo-ttft", type=float, default=5000.0, help="ms")
    p.add_argument("--slo-tpot", type=float, default=100.0, help="ms")
    p.add_argument("--worker-threads", type=int, default=1)
    p.add_argument("--kv-transport", default="auto")
    p.add_argument("--only", default=None, help="comma-separated config names to run")
    p.add_argument("--rounds", type=int, default=1, help="run the clusters this many times, interleaved")
    p.add_argument("--max-load", type=float, default=0.0,
                   help="before each cluster, wait (up to 10 min) for the 1-min load average to "
                        "drop below this (0: do not wait)")  # fmt: skip
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    common = [
        "--kv-cache-memory", "256MiB", "--max-num-seqs", "32", "--max-model-len", "2048",
        "--worker-threads", str(args.worker_threads), "--kv-transport", args.kv_transport,
    ]  # fmt: skip
    runs = []
    plan = [(r, name, flags) for r in range(args.rounds) for name, flags in CONFIGS
            if not args.only or name in args.only.split(",")]  # fmt: skip
    for r, name, flags in plan:
        if args.rounds > 1:
            name = f"{name} (round {r + 1})"
        if args.max_load > 0:
            wait_quiet(args.max_load)
        print(f"\n=== {name}: pdserve serve {' '.join(flags)}", flush=True)
        with ServerProcess([*common, *flags]) as server, LoadSampler() as load:
            cfg = LoadConfig(
                base_url=server.base_url + "/v1", num_prompts=args.num_prompts,
                request_rate=args.request_rate, input_len=args.input_len,
                long_input_len=args.long_input_len, long_fraction=args.long_fraction,
                output_len=args.output_len, slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot,
                warmup=2,
            )  # fmt: skip
            summary = asyncio.run(run_load(cfg))
            summary["server"] = scrape(server.base_url)
        summary["load_average"] = load.mean
        runs.append((name, flags, summary))
        s = summary
        print(f"completed {s['completed']} failed {s['failed']}  goodput {s['goodput']:.2f} req/s  "
              f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms  TPOT p50 {s['tpot_ms']['p50']:.0f} ms  "
              f"KV moved {s['server']['kv_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip

    def pct(d: dict) -> str:
        return f"{d['p50']:.0f} / {d['p90']:.0f} / {d['p99']:.0f}"

    overall = table(
        ["cluster", "done", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99", "goodput req/s",
         "within SLO", "KV moved MiB", "decisions", "load avg"],
        [[name, f"{s['completed']}/{s['completed'] + s['failed']}", pct(s["ttft_ms"]),
          pct(s["tpot_ms"]), f"{s['goodput']:.3f}", f"{100 * s['goodput_fraction']:.0f}%",
          f"{s['server']['kv_bytes'] / 2**20:.0f}",
          ", ".join(f"{k} {v:.0f}" for k, v in sorted(s["server"]["decisions"].items())),
          f"{s['load_average']:.1f}"]
         for name, _, s in runs],
    )  # fmt: skip
    per_class = table(
        ["cluster", "class", "n", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99", "within SLO"],
        [[name, c, v["completed"], pct(v["ttft_ms"]), pct(v["tpot_ms"]),
          f"{v['within_slo']}/{v['completed']}"]
         for name, _, s in runs for c, v in s["classes"].items()],
    )  # fmt: skip
    print("\n" + overall + "\n\n" + per_class)
    if not args.no_save:
        cfg_line = (
            f"{args.num_prompts} requests, Poisson {args.request_rate}/s; "
            f"{100 * args.long_fraction:.0f}% long prompts of ~{args.long_input_len} words, the "
            f"rest short chats of ~{args.input_len} words; {args.output_len} output tokens each "
            f"(ignore_eos); SLOs TTFT <= {args.slo_ttft:.0f} ms and TPOT <= {args.slo_tpot:.0f} ms. "
            f"Embedded SmolLM2-135M, {args.worker_threads} CPU thread(s) per worker, "
            f"KV transport {args.kv_transport}; every cluster has 2 workers. The machine has "
            f"{os.cpu_count()} cores: its two workers take about one each, so a load average "
            "well above 2-3 during a run means other jobs competed with it.\n\n"
        )
        clusters = "\n".join(f"- {name}: `pdserve serve {' '.join(flags)}`" for name, flags, _ in runs)
        raw = json.dumps({name: s for name, _, s in runs}, indent=1)
        body = (f"{cfg_line}{clusters}\n\n{overall}\n\nPer prompt class:\n\n{per_class}\n\n"
                f"<details><summary>raw summaries</summary>\n\n```json\n{raw}\n```\n</details>")  # fmt: skip
        tag = "".join(c if c.isalnum() else "-" for c in machine().split(",")[0]).strip("-").lower()
        path = write_result(f"disagg-mixed-cpu-{tag}"[:80], body,
                            "python benchmarks/bench_disagg.py " + " ".join(sys.argv[1:]))  # fmt: skip
        print("results:", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
