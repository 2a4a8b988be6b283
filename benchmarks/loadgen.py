"""Async load generator for any OpenAI-compatible server (pdserve, vLLM, ...).

Drives streaming completions (or chat completions) with the official `openai` client at a
fixed concurrency (closed loop) or a Poisson request rate (open loop), and reports per-request
TTFT, TPOT, ITL and end-to-end latency (p50 / p90 / p99), request and token throughput, and
goodput: requests per second that met every given SLO (--slo-ttft, --slo-tpot, in ms).
Results go to benchmarks/results/<UTC date>-loadgen-<machine>.json unless --no-save.

    python benchmarks/loadgen.py --base-url http://127.0.0.1:8000/v1 --concurrency 16 \\
        --num-prompts 64 --input-len 64 --output-len 64 --slo-ttft 500 --slo-tpot 100

Definitions (as in vLLM's benchmark_serving): TTFT = request sent -> first content chunk;
ITL = gaps between content chunks; TPOT = (e2e - TTFT) / (output tokens - 1); output tokens
come from the server's usage chunk (stream_options.include_usage).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.workloads, as a script

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORDS = [
    "time",
    "person",
    "year",
    "way",
    "day",
    "thing",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "government",
    "company",
    "number",
    "group",
    "problem",
    "fact",
    "river",
    "music",
    "garden",
    "story",
    "light",
    "window",
    "mountain",
    "question",
    "system",
    "program",
    "city",
    "history",
]


@dataclasses.dataclass
class LoadConfig:
    base_url: str
    api_key: str = "EMPTY"
    model: str | None = None  # None: the first model the server lists
    endpoint: str = "completions"  # or "chat"
    num_prompts: int = 64
    concurrency: int = 16
    request_rate: float = 0.0  # requests/s (Poisson); 0 = closed loop at `concurrency`
    input_len: int = 64  # approximate prompt length in words
    # Mixed workload: this fraction of the prompts (picked by the seed) are long_input_len words.
    long_input_len: int = 0
    long_fraction: float = 0.0
    output_len: int = 64
    ignore_eos: bool = True  # fixed output lengths (vLLM extension)
    temperature: float = 0.0
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    warmup: int = 2
    timeout: float = 600.0
    processes: int = 1  # client processes sharing the load
    # A named workload of benchmarks/workloads.py (token-id prompts, per-request lengths)
    # instead of the word prompts above; its requests are classed "long" / "short".
    workload: str = ""
    length_scale: float = 1.0  # the workload's lengths times this (small smoke runs)
    keep_requests: bool = False  # put every request's numbers in the summary ("requests")


@dataclasses.dataclass
class RequestResult:
    ok: bool
    cls: str = ""  # the workload's request class, if it has them
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_prompts(
    n: int, length: int, seed: int, long_length: int = 0, long_fraction: float = 0.0
) -> list[str]:
    """Distinct prompts (a unique head defeats the prefix cache) of about `length` words; with
    `long_fraction` > 0, that fraction of them (chosen by the seed) has `long_length` words."""
    rng = random.Random(seed)
    pick = random.Random(seed + 1)
    lengths = [long_length if pick.random() < long_fraction else length for _ in range(n)]
    return [
        f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(max(1, k - 1)))
        for i, k in enumerate(lengths)
    ]


# One request to send: prompt (text or token ids), max_tokens, class label.
Item = tuple["str | list[int]", int, str]


def make_items(cfg: LoadConfig, n: int) -> list[Item]:
    if cfg.workload:
        from benchmarks.workloads import make_workload

        return [(r.prompt, r.max_tokens, r.cls) for r in make_workload(cfg.workload, n, cfg.seed, cfg.length_scale)]
    prompts = make_prompts(n, cfg.input_len, cfg.seed, cfg.long_input_len, cfg.long_fraction)
    return [(p, cfg.output_len, "") for p in prompts]


async def one_request(
    client: openai.AsyncOpenAI, cfg: LoadConfig, model: str, item: Item
) -> RequestResult:
    prompt, max_tokens, cls = item
    extra = {"ignore_eos": cfg.ignore_eos} if cfg.ignore_eos else {}
    common: dict[str, Any] = dict(
        model=model,
        max_tokens=max_tokens,
        temperature=cfg.temperature,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    res = RequestResult(ok=False, cls=cls)
    start = time.perf_counter()
    last = start
    try:
        if cfg.endpoint == "chat":
            if not isinstance(prompt, str):
                raise ValueError("the chat endpoint takes text prompts, not token ids")
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **common
            )
        else:
            stream = await client.completions.create(prompt=prompt, **common)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
                res.prompt_tokens = chunk.usage.prompt_tokens
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            text = c.delta.content if cfg.endpoint == "chat" else c.text
            if text:
                if res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.output_tokens > 0
        if not res.ok:
            res.error = "no usage chunk / no tokens"
    except openai.OpenAIError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def _drive(
    cfg: LoadConfig,
    prompts: list[Item],
    warmup: list[Item],
    concurrency: int,
    request_rate: float,
    start_at: float,
    shard: int = 0,
) -> tuple[str, list[RequestResult], float, float]:
    """Warm up, wait for wall-clock `start_at` (0: now), run; returns (model, results, t0, t1)."""
    client = openai.AsyncOpenAI(
        base_url=cfg.base_url, api_key=cfg.api_key, max_retries=0, timeout=cfg.timeout
    )
    model = cfg.model or (await client.models.list()).data[0].id
    for prompt, max_tokens, cls in warmup:
        await one_request(client, cfg, model, (prompt, min(max_tokens, 8), cls))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    results: list[RequestResult] = []
    t0 = time.time()
    if request_rate > 0:
        # Each client process draws its own gaps: with one shared seed, the processes' Poisson
        # streams were identical and requests arrived in bursts of `processes` at once.
        rng = random.Random(cfg.seed * 1_000_003 + shard)
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(one_request(client, cfg, model, p)))
            await asyncio.sleep(rng.expovariate(request_rate))
        results = list(await asyncio.gather(*tasks))
    else:
        queue = list(reversed(prompts))

        async def worker() -> None:
            while queue:
                results.append(await one_request(client, cfg, model, queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    t1 = time.time()
    await client.close()
    return model, results, t0, t1


def _shard(cfg: LoadConfig, k: int) -> tuple[list[Item], list[Item], int, float]:
    """Shard k of `cfg.processes`: its requests, warm-up requests, concurrency and rate."""
    n = cfg.processes
    prompts = make_items(cfg, cfg.num_prompts + cfg.warmup)
    warmup, prompts = prompts[: cfg.warmup], prompts[cfg.warmup :]
    concurrency = cfg.concurrency // n + (1 if k < cfg.concurrency % n else 0)
    return prompts[k::n], warmup, max(1, concurrency), cfg.request_rate / n


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Run the benchmark; returns the summary dict (also what gets saved).

    With `processes` > 1 the load comes from that many client processes (each runs its share
    of prompts and concurrency with its own event loop; they start together at a wall-clock
    instant), so that a single Python client's parsing speed does not cap what is measured."""
    if cfg.processes <= 1:
        prompts, warmup, concurrency, rate = _shard(cfg, 0)
        model, results, t0, t1 = await _drive(cfg, prompts, warmup, concurrency, rate, 0.0)
        return summarize(cfg, model, results, t1 - t0)
    start_at = time.time() + 5.0 + 0.5 * cfg.warmup
    spec = json.dumps(dataclasses.asdict(cfg))
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--shard",
            str(k),
            "--shard-spec",
            spec,
            "--start-at",
            str(start_at),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        for k in range(cfg.processes)
    ]
    outs = [await c.communicate() for c in children]
    shards = []
    for (stdout, _), child in zip(outs, children, strict=True):
        line = next((x for x in stdout.decode().splitlines() if x.startswith(SHARD_TAG)), None)
        if child.returncode != 0 or line is None:
            raise RuntimeError(f"load generator shard failed with {child.returncode}")
        shards.append(json.loads(line[len(SHARD_TAG) :]))
    results = [RequestResult(**r) for sh in shards for r in sh["results"]]
    duration = max(sh["t1"] for sh in shards) - min(sh["t0"] for sh in shards)
    return summarize(cfg, shards[0]["model"], results, duration)


SHARD_TAG = "LOADGEN_SHARD "


def shard_main(k: int, spec: str, start_at: float) -> int:
    cfg = LoadConfig(**json.loads(spec))
    prompts, warmup, concurrency, rate = _shard(cfg, k)
    model, results, t0, t1 = asyncio.run(_drive(cfg, prompts, warmup, concurrency, rate, start_at, k))
    payload = {
        "model": model,
        "t0": t0,
        "t1": t1,
        "results": [dataclasses.asdict(r) for r in results],
    }
    print(SHARD_TAG + json.dumps(payload), flush=True)
    return 0


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    values = sorted(values)

    def pct(q: float) -> float:
        k = (len(values) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (k - lo)

    ms = 1000.0
    return {
        "mean": statistics.fmean(values) * ms,
        "p50": pct(0.5) * ms,
        "p90": pct(0.9) * ms,
        "p99": pct(0.99) * ms,
    }


def summarize(
    cfg: LoadConfig, model: str, results: list[RequestResult], duration: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def meets_slo(r: RequestResult) -> bool:
        return (cfg.slo_ttft_ms is None or r.ttft * 1000 <= cfg.slo_ttft_ms) and (
            cfg.slo_tpot_ms is None or r.tpot * 1000 <= cfg.slo_tpot_ms
        )

    good = [r for r in ok if meets_slo(r)]
    classes = {}
    if cfg.workload == "mix" or (not cfg.workload and cfg.long_fraction > 0):
        # per prompt class of a mixed workload
        cut = (cfg.input_len + cfg.long_input_len) / 2  # words ~ tokens for these prompts
        is_long = (lambda r: r.cls == "long") if cfg.workload else (lambda r: r.prompt_tokens >= cut)
        for name, rs in (("short", [r for r in ok if not is_long(r)]),
                         ("long", [r for r in ok if is_long(r)])):  # fmt: skip
            classes[name] = {
                "completed": len(rs),
                "within_slo": sum(meets_slo(r) for r in rs),
                "ttft_ms": _pcts([r.ttft for r in rs]),
                "tpot_ms": _pcts([r.tpot for r in rs if r.output_tokens > 1]),
            }
    summary = {
        "config": dataclasses.asdict(cfg) | {"api_key": "***"},
        "model": model,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "goodput": len(good) / duration,
        "goodput_fraction": len(good) / len(results) if results else 0.0,
        "ttft_ms": _pcts([r.ttft for r in ok]),
        "tpot_ms": _pcts([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_ms": _pcts([x for r in ok for x in r.itl]),
        "e2e_ms": _pcts([r.e2e for r in ok]),
        "classes": classes,
    }
    if cfg.keep_requests:
        summary["requests"] = [
            {"ok": r.ok, "cls": r.cls, "ttft_ms": r.ttft * 1000, "tpot_ms": r.tpot * 1000,
             "e2e_ms": r.e2e * 1000, "prompt_tokens": r.prompt_tokens,
             "output_tokens": r.output_tokens, "error": r.error}
            for r in results
        ]  # fmt: skip
    return summary


def machine() -> dict[str, Any]:
    """What ran this: host, CPU, cores, GPUs (names only)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_tag(info: dict[str, Any]) -> str:
    kind = info["gpus"][0] if info["gpus"] else f"cpu{info['cpu_count']}"
    return "".join(ch if ch.isalnum() else "-" for ch in kind).strip("-").lower()


def save(name: str, payload: dict[str, Any]) -> Path:
    info = machine()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stamp}-{name}-{machine_tag(info)}.json"
    path.write_text(
        json.dumps({"benchmark": name, "date": stamp, "machine": info, **payload}, indent=2) + "\n"
    )
    return path


def print_table(s: dict[str, Any], title: str = "loadgen") -> None:
    print(
        f"\n== {title}: {s['model']}  completed {s['completed']}  failed {s['failed']}  in {s['duration_s']:.1f}s"
    )
    print(
        f"   requests/s {s['request_throughput']:.2f}   output tok/s {s['output_throughput']:.1f}   "
        f"goodput req/s {s['goodput']:.2f} ({100 * s['goodput_fraction']:.0f}% within SLO)"
    )
    print(f"   {'metric':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}   (ms)")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        v = s[key]
        print(
            f"   {key[:-3]:<8}{v['mean']:>10.1f}{v['p50']:>10.1f}{v['p90']:>10.1f}{v['p99']:>10.1f}"
        )
    if s["errors"]:
        print("   errors:", *s["errors"], sep="\n     ")


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, bool]:
    """The load config and whether to save a results file."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY", "EMPTY"))
    p.add_argument("--model", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--request-rate",
        type=float,
        default=0.0,
        help="Poisson arrivals per second (0: closed loop)",
    )
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--long-input-len", type=int, default=0, help="words (mixed workload)")
    p.add_argument("--long-fraction", type=float, default=0.0, help="share of long prompts")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--workload", default="", choices=["", "long", "chat", "mix"],
                   help="a benchmarks/workloads.py workload (token-id prompts, per-request "
                        "lengths) instead of --input-len / --output-len word prompts")
    p.add_argument("--no-ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=None, help="ms")
    p.add_argument("--slo-tpot", type=float, default=None, help="ms")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--processes", type=int, default=1, help="client processes sharing the load")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    cfg = LoadConfig(
        base_url=a.base_url, api_key=a.api_key, model=a.model, endpoint=a.endpoint, num_prompts=a.num_prompts,
        concurrency=a.concurrency, request_rate=a.request_rate, input_len=a.input_len, output_len=a.output_len,
        long_input_len=a.long_input_len, long_fraction=a.long_fraction,
        ignore_eos=not a.no_ignore_eos, temperature=a.temperature, seed=a.seed, slo_ttft_ms=a.slo_ttft,
        slo_tpot_ms=a.slo_tpot, warmup=a.warmup, processes=a.processes, workload=a.workload,
    )  # fmt: skip
    return cfg, not a.no_save


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--shard"]:  # a child of --processes
        return shard_main(int(argv[1]), argv[3], float(argv[5]))
    cfg, save_it = parse_args(argv)
    summary = asyncio.run(run_load(cfg))
    print_table(summary)
    if save_it:
        print("results:", save(f"loadgen-c{cfg.concurrency}", summary))
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
