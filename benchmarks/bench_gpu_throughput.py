"""Offline output throughput of one engine, closed loop, across scheduler token budgets: which
step policy makes the most tokens per second for the server benchmark's workload (64 requests
in flight, 512 prompt tokens -> 256 output tokens, distinct prompts).

A large budget (`--max-num-batched-tokens 8192`) prefills whole waves of new requests in a few
big steps, and the running requests' decodes happen in separate, CUDA-graphed decode steps.
A small one spreads each prompt over many steps that also carry every running decode: the
prefill tokens ride on the decode steps' weight reads (one eager "mixed" step instead of a
prefill step plus a decode step). Which one wins depends on how close a mixed step of ~200
tokens runs to the device's limits and on the host cost of an eager step; this measures it.

One engine is built once; each row lowers the scheduler's budget (`SchedulerConfig` is
replaced on the live scheduler: every buffer was sized for the largest budget, listed first)
and runs `--num-prompts` requests through `engine.step()` with at most `--concurrency` running
(the engine refills a slot the moment a request finishes: a closed loop with a zero-latency
client). Per row: wall time, output tok/s, steps by kind (graph decode / eager), the mean
tokens and host launch time of the eager steps.

    python benchmarks/bench_gpu_throughput.py [--budgets 8192,2048,1024,512,256]
    python benchmarks/bench_gpu_throughput.py --model random:smollm2-135m --device cpu \\
        --concurrency 4 --num-prompts 8 --input-len 32 --output-len 8 --no-save  # CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_server import add_workload_args, token_prompts  # noqa: E402
from benchmarks.common import table, write_result  # noqa: E402


@dataclasses.dataclass
class StepLog:
    graph_steps: int = 0  # pure decode steps replayed from a CUDA graph (incl. launched ahead)
    eager_steps: int = 0
    eager_tokens: int = 0
    eager_decode_rows: int = 0
    eager_launch_s: float = 0.0  # host time inside `launch` for eager steps


def instrument(engine) -> StepLog:
    """Count the runner's launches by kind; host time of eager launches."""
    log = StepLog()
    runner = engine.runner
    launch, launch_ahead = runner.launch, runner.launch_ahead

    def counted_launch(out):
        n = out.num_batched_tokens
        pure = n == len(out.scheduled)
        t0 = time.perf_counter()
        pending = launch(out)
        graphed = pure and runner.cuda_graphs is not None and runner.cuda_graphs.can_run(
            n, max(len(engine.kv.block_table(s.request.request_id)) for s in out.scheduled)
        )
        if graphed:
            log.graph_steps += 1
        else:
            log.eager_steps += 1
            log.eager_tokens += n
            log.eager_decode_rows += sum(1 for s in out.scheduled if s.num_new_tokens == 1)
            log.eager_launch_s += time.perf_counter() - t0
        return pending

    def counted_ahead(rows, pending):
        launched = launch_ahead(rows, pending)
        if launched is not None:
            log.graph_steps += 1
        return launched

    runner.launch, runner.launch_ahead = counted_launch, counted_ahead
    return log


def run_once(engine, prompts: list[list[int]], output_len: int, tag: str) -> tuple[float, int, StepLog]:
    from server.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    log = instrument(engine)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += len(out.new_token_ids)
    wall = time.perf_counter() - start
    runner = engine.runner
    runner.launch = type(runner).launch.__get__(runner)
    runner.launch_ahead = type(runner).launch_ahead.__get__(runner)
    return wall, tokens, log


def decode_ab(engine, a: argparse.Namespace, budget: int, rounds: int = 2) -> str:
    """The decode graphs' kernel choices side by side on the same engine: cuBLAS vs the
    start-up-tuned skinny GEMM plan (kernels/triton/skinny_plan.py) for the decode batches'
    linears, and FlashInfer's decode vs the Triton paged kernel for the batches in the
    backend's Triton range; each variant recaptures the decode graphs and runs the workload,
    `rounds` times in alternation (fresh prompts every run)."""
    import dataclasses as dc

    from kernels.triton import skinny_plan

    graphs, attn = engine.runner.cuda_graphs, engine.attn
    if graphs is None or not hasattr(attn, "_triton_lo"):
        return "decode A/B: needs the decode CUDA graphs and the FlashInfer backend"
    tuned = dict(skinny_plan._PLAN)
    tri = (attn._triton_lo, attn._triton_hi)
    # The Triton range as the engine runs it: every size in it, or where start-up timing
    # picked the Triton kernel (`kernels/attention/decode_tune.py`).
    timed = attn._triton_tuned
    where = (f"{tri[0]}-{tri[1]}" if timed is None
             else ", ".join(f"{b}: {t}" for b, t in sorted(timed.items()) if t) or "nowhere")
    variants = {
        "cuBLAS, FlashInfer decode": ({}, (0, 0)),
        "skinny plan, FlashInfer decode": (tuned, (0, 0)),
        f"cuBLAS, Triton decode ({where})": ({}, tri),
        "skinny plan, Triton decode (default)": (tuned, tri),
    }
    engine.scheduler.config = dc.replace(engine.scheduler.config, max_num_batched_tokens=budget)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for j, (name, (plan, rng)) in enumerate(variants.items()):
            skinny_plan.set_plan(plan)
            attn._triton_lo, attn._triton_hi = rng
            graphs.recapture()
            prompts = token_prompts(a.num_prompts, a.input_len, a.seed + 1000 + 10 * r + j)
            wall, out_tokens, _ = run_once(engine, prompts, a.output_len, f"ab{r}-{j}")
            times[name].append(out_tokens / wall)
            print(f"A/B round {r}: {name}: {out_tokens / wall:.0f} tok/s", flush=True)
            engine.check_integrity()
    skinny_plan.set_plan(tuned)
    attn._triton_lo, attn._triton_hi = tri
    graphs.recapture()
    base = max(times["cuBLAS, FlashInfer decode"])
    rows = [[name, " / ".join(f"{t:.0f}" for t in ts), f"{max(ts):.0f}", f"{max(ts) / base:.3f}x"]
            for name, ts in times.items()]
    plan_lines = "\n".join(f"- {k}: {v}" for k, v in sorted(tuned.items())) or "- (empty: cuBLAS everywhere)"
    return (f"Decode kernel A/B at token budget {budget} ({rounds} alternating rounds, best kept):\n\n"
            + table(["decode graphs", "output tok/s per round", "best", "vs cuBLAS + FlashInfer"], rows)
            + "\n\nSkinny plan tuned at start-up ((rows, weight rows, K, gated, residual): tile):\n"
            + plan_lines)


def profile_steps(engine, a: argparse.Namespace, budget: int) -> str:
    """Where an eager step's time goes, at `budget` in a closed loop: the next
    `a.profile_steps` steps that carry a prefill chunk run under cProfile (host time inside
    `launch`), the same number after them with device syncs around `launch` and their kernels
    recorded (CUPTI): host launch time vs launch-to-done time vs kernel-busy time tells whether
    such a step is bound by the host or the device."""
    import cProfile
    import io
    import pstats

    import torch

    from benchmarks.bench_gpu import device_kernels
    from server.engine.sampling_params import SamplingParams

    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, max_num_batched_tokens=budget)
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(token_prompts(4 * a.concurrency, a.input_len, a.seed + 99)):
        engine.add_request(f"prof-{i}", p, params)
    runner = engine.runner
    launch = runner.launch
    prof = cProfile.Profile()
    host: list[float] = []
    timed: list[tuple[int, float, float, float]] = []  # tokens, launch s, launch-to-done s, busy s
    cuda = torch.cuda.is_available()

    def profiled(out):
        if out.num_batched_tokens == len(out.scheduled):  # pure decode
            return launch(out)
        if len(host) < a.profile_steps:
            t0 = time.perf_counter()
            prof.enable()
            pending = launch(out)
            prof.disable()
            host.append(time.perf_counter() - t0)
            return pending
        held: list = []
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        marks: list[float] = []

        def run():
            held.append(launch(out))
            marks.append(time.perf_counter())

        kernels = device_kernels(run) if cuda else (run() or [])
        done = time.perf_counter()
        busy = sum(d for _, _, d in kernels) / 1e6
        timed.append((out.num_batched_tokens, marks[0] - t0, done - t0, busy))
        return held[0]

    runner.launch = profiled
    try:
        while len(timed) < a.profile_steps and engine.has_unfinished_requests():
            engine.step()
    finally:
        runner.launch = type(runner).launch.__get__(runner)
    while engine.has_unfinished_requests():
        engine.abort([r.request_id for r in list(engine.scheduler.running) + list(engine.scheduler.waiting)])
        engine.step()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    rows = [[n, f"{1e3 * h:.2f}", f"{1e3 * d:.2f}", f"{1e3 * b:.2f}"] for n, h, d, b in timed]
    return (
        f"Eager steps at budget {budget}: host time inside `launch` under cProfile, mean of "
        f"{len(host)}: {1e3 * sum(host) / max(1, len(host)):.2f} ms. Then, synced around each "
        "launch (kernels recorded by torch.profiler, whose own overhead inflates the host column):"
        "\n\n" + table(["tokens", "host launch ms", "launch to done ms", "kernel busy ms"], rows)
        + f"\n\n```\n{buf.getvalue()}\n```"
    )


def prefill_latency(engine, lengths: list[int], seed: int) -> str:
    """Latency of one prompt's prefill step (to its first token on the host) in an idle engine,
    through the piecewise graphs and eagerly, interleaved; medians of 7 after 2 warm-ups."""
    import statistics

    from server.engine.sampling_params import SamplingParams

    piecewise = engine.runner.piecewise
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    modes = [("piecewise", piecewise), ("eager", None)] if piecewise is not None else [("eager", None)]
    times: dict[tuple[int, str], list[float]] = {}
    n = 0
    for length in lengths:
        for rep in range(9):
            for name, runner in modes:
                engine.runner.piecewise = runner
                ids = token_prompts(1, length, seed + 1000 + n)[0]
                n += 1
                engine.add_request(f"lat{n}", ids, params)
                t0 = time.perf_counter()
                outs = engine.step()  # the prefill step; returns the first token
                dt = time.perf_counter() - t0
                assert outs and outs[0].new_token_ids, "the prefill step sampled no token"
                engine.abort([f"lat{n}"])
                while engine.has_unfinished_requests():
                    engine.step()
                if rep >= 2:
                    times.setdefault((length, name), []).append(dt)
    engine.runner.piecewise = piecewise
    rows = []
    for length in lengths:
        med = {name: statistics.median(times[(length, name)]) for name, _ in modes}
        row = [length, *(f"{1e3 * med[name]:.2f}" for name, _ in modes)]
        if piecewise is not None:
            row.append(f"{med['eager'] / med['piecewise']:.2f}x")
        rows.append(row)
    headers = ["prompt tokens", *(f"{name} ms" for name, _ in modes)]
    if piecewise is not None:
        headers.append("piecewise speed-up")
    return ("One prompt's prefill step in an idle engine (engine.step() to its first token; "
            "medians of 7):\n\n" + table(headers, rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p)
    p.add_argument("--budgets", default="8192,2048,1024,512,256",
                   help="max_num_batched_tokens per row, comma-separated (largest first)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-memory", default="1GiB", help="used when utilization is 0 (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--compare-eager", action="store_true",
                   help="run each budget twice: prefill / mixed steps on the piecewise CUDA graphs, "
                   "then eager")
    p.add_argument("--prefill-lens", default="16,128,512,2048",
                   help="one idle-engine prefill of each length, piecewise vs eager ('' = skip)")
    p.add_argument("--decode-ab", action="store_true",
                   help="after the rows: the decode graphs with cuBLAS / the tuned skinny GEMM and "
                   "FlashInfer / Triton decode attention, side by side at the largest budget")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the rows: profile this many steps at the last budget (host: cProfile, "
                   "device: torch.profiler kernel time), steady state, and print where the time goes")
    a = p.parse_args()

    from server.engine.engine import EngineConfig, EngineCore

    budgets = [int(b) for b in a.budgets.split(",")]
    cfg = EngineConfig(
        model=a.model, device=a.device, dtype=a.dtype, max_num_seqs=a.concurrency,
        max_num_batched_tokens=max(budgets), max_model_len=max(a.input_len + a.output_len, max(budgets)) + 16,
        gpu_memory_utilization=a.gpu_memory_utilization if a.device != "cpu" else 0.0,
        kv_cache_memory=a.kv_cache_memory, seed=a.seed, progress=False,
    )
    t0 = time.perf_counter()
    engine = EngineCore(cfg)
    build_s = time.perf_counter() - t0
    base = engine.scheduler.config
    # Warm every path (graph buckets, eager prefill shapes) at the largest budget.
    engine.scheduler.config = dataclasses.replace(base, max_num_batched_tokens=max(budgets))
    run_once(engine, token_prompts(a.concurrency, a.input_len, a.seed + 1), 8, "warm")

    rows, results = [], []
    piecewise = engine.runner.piecewise
    modes = [True, False] if a.compare_eager and piecewise is not None else [piecewise is not None]
    runs = [(b, pw) for b in budgets for pw in modes]
    for i, (budget, pw) in enumerate(runs):
        hits0 = engine.kv.prefix_cache_hits
        engine.scheduler.config = dataclasses.replace(base, max_num_batched_tokens=budget)
        engine.runner.piecewise = piecewise if pw else None
        # Fresh prompts per row: a row must not hit the prefix cache the rows before it filled.
        prompts = token_prompts(a.num_prompts, a.input_len, a.seed + 2 + i)
        wall, out_tokens, log = run_once(engine, prompts, a.output_len, f"b{i}")
        if out_tokens != a.num_prompts * a.output_len:
            raise RuntimeError(f"{out_tokens} tokens came out, {a.num_prompts * a.output_len} expected")
        tps = out_tokens / wall
        results.append(tps)
        mean_tok = log.eager_tokens / max(1, log.eager_steps)
        mean_dec = log.eager_decode_rows / max(1, log.eager_steps)
        launch_ms = 1e3 * log.eager_launch_s / max(1, log.eager_steps)
        pw_used = pw and budget <= piecewise.max_tokens
        rows.append([
            budget, "piecewise graphs" if pw_used else "eager", f"{wall:.2f}", f"{tps:.0f}",
            f"{tps / results[0]:.2f}x", log.graph_steps, log.eager_steps, f"{mean_tok:.0f}",
            f"{mean_dec:.1f}", f"{launch_ms:.2f}",
        ])
        print(f"budget {budget} ({'piecewise' if pw_used else 'eager'}): {wall:.2f} s, {tps:.0f} tok/s",
              flush=True)
        engine.check_integrity()
        hits = engine.kv.prefix_cache_hits - hits0
        if hits:
            print(f"warning: {hits} prefix-cache hit tokens in this row", flush=True)
    engine.runner.piecewise = piecewise
    headers = ["token budget", "prefill / mixed path", "wall s", "output tok/s", "vs first row",
               "graph decode steps", "prefill / mixed steps", "tokens / such step",
               "decodes / such step", "host ms / such launch"]
    body = (
        f"Model: {a.model}, {a.dtype} on {a.device}; {a.num_prompts} requests of {a.input_len} "
        f"random prompt ids -> {a.output_len} output tokens (ignore_eos), at most {a.concurrency} "
        f"running; engine built once in {build_s:.0f} s.\n\n" + table(headers, rows)
    )
    lengths = [int(x) for x in a.prefill_lens.split(",") if x and int(x) <= max(budgets)]
    if lengths:  # each prompt in one step: the largest budget
        engine.scheduler.config = dataclasses.replace(base, max_num_batched_tokens=max(budgets))
        body += "\n\n" + prefill_latency(engine, lengths, a.seed)
    if a.decode_ab:
        body += "\n\n" + decode_ab(engine, a, max(budgets))
    if a.profile_steps:
        body += "\n\n" + profile_steps(engine, a, budgets[-1])
    print(body)
    if not a.no_save:
        name = "gpu-throughput" if a.device != "cpu" else "cpu-throughput"
        print("wrote", write_result(name, body, "python " + " ".join(sys.argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
