"""GPU fast path on a Llama-3.1-8B-shaped model with random bf16 weights, side by side with the
device's own ceilings measured in the same run:

  (a) batch-1 decode TPOT vs the HBM roofline (weight bytes + KV bytes / measured D2D copy
      bandwidth) at ~200 tokens of context (--b1-context);
  (b) decode step at batch 64 and 128 (--decode-batches) with 1k tokens of context
      (--decode-context: keys each sequence attends at the median timed step; anchor: SGLang
      11.84 ms/step at batch 128 on an H100);
  (c) prefill of 1x8k and 16x512 tokens as MFU vs a bf16 matmul measured here.

    python benchmarks/bench_gpu.py [--model random:llama-3.1-8b] [--steps 50]

Steps are timed end to end (scheduler, metadata, plan, CUDA-graph replay or eager forward,
logits, sampler: each step ends with the sampler's device->host copy, so host wall time between
steps is device time plus host overhead); medians. Decode steps are timed three times (batch 1: on the
same request, one mode after the other; batched: each mode on fresh requests, so all three see
the same context): step lookahead off; lookahead on without overlap (the next step
staged while the current one runs); and with step overlap, the default (the next step also
launched before the current step's tokens are read back, so a step's time is its cadence);
batch 1 also with the fused one-row linears
(kernels/triton/gemv.py, the default) off, graphs recaptured. Ceilings use triton.testing.do_bench
medians (CUDA events). Prefix caching is off so every prompt is computed.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, table, write_result  # noqa: E402
from server.engine.engine import EngineConfig, EngineCore  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402

SGLANG_B128_MS = 11.84


def copy_bandwidth() -> float:
    """Bytes/s of a 4 GiB device-to-device copy, counting bytes read plus written."""
    from triton.testing import do_bench

    n = 1 << 31  # 2 Gi bf16 elements = 4 GiB
    src = torch.randn(n // 2, device="cuda").to(torch.bfloat16).repeat(2)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * n * 2 / (ms * 1e-3)


def matmul_flops() -> float:
    """FLOP/s of an 8192^3 bf16 matmul on random data."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def timed_steps(engine: EngineCore, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


MODES = (("lookahead off", False, False), ("lookahead, no overlap", True, False), ("overlap", True, True))


def decode_modes(
    engine: EngineCore, steps: int, restart: Callable[[], object] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Median decode step seconds with step lookahead off, on without step overlap, and on with
    overlap (the default), and the context of each mode's median step (keys a sequence
    attends). Without `restart` the modes follow one another on the same requests, so each
    sees ~steps + 5 more context than the one before; with it, each mode first calls
    `restart()` (fresh requests of the same prompt length, prefilled), so all three are timed
    at the same context."""
    medians, contexts = {}, {}
    for name, lookahead, overlap in MODES:
        if restart is not None:
            restart()
        engine.config.step_lookahead, engine.config.step_overlap = lookahead, overlap
        timed_steps(engine, 5)
        medians[name] = statistics.median(timed_steps(engine, steps))
        contexts[name] = mean_length(engine) - steps / 2
    return medians, contexts


def mean_length(engine: EngineCore) -> float:
    """Mean tokens (prompt + generated) of the running requests."""
    running = engine.scheduler.running
    return sum(r.num_tokens for r in running) / max(1, len(running))


def mode_rows(modes: dict[str, float], roof: float) -> list[list[object]]:
    best = modes["overlap"]
    return [
        [
            f"  same, {name}",
            f"{t * 1e3:.2f} ms",
            f"overlap (default): {best * 1e3:.2f} ms",
            f"{t / roof:.2f}x roofline; overlap is {t / best:.2f}x faster",
        ]
        for name, t in modes.items()
        if name != "overlap"
    ]


def settle(engine: EngineCore) -> None:
    """Run the step launched ahead (step overlap), if any, and launch none: afterwards the
    scheduler and the graphs can be driven by hand."""
    overlap, engine.config.step_overlap = engine.config.step_overlap, False
    engine.step()
    engine.config.step_overlap = overlap


def gemv_pdl_default() -> bool:
    from kernels.triton.gemv import _pdl_default

    return _pdl_default()


def set_fused_linears(engine: EngineCore, on: bool, pdl: bool | None = None) -> None:
    """Batch-1 layers as fused Triton GEMVs (the default) or as cuBLAS linears plus the norm /
    SiLU kernels; pdl: launch the GEMVs and the fused decode attention with programmatic
    dependent launch (None: the default, on for sm90+). Recaptures the decode graphs, which
    bake the choice in."""
    import kernels.triton as kt
    import kernels.triton.gemv as gemv
    from kernels import ops

    settle(engine)
    gemv.USE_PDL = gemv._pdl_default() if pdl is None else pdl
    ops.set_impl(fuses_linears=kt.one_cuda_row if on else ops.never)
    recapture(engine)


def set_pdl(engine: EngineCore, on: bool) -> None:
    """Launch the decode graphs' Triton kernels with programmatic dependent launch or not;
    recaptures the graphs, which bake the choice in."""
    import kernels.triton.gemv as gemv

    settle(engine)
    gemv.USE_PDL = on
    recapture(engine)


def recapture(engine: EngineCore) -> None:
    """Recapture the decode graphs of a settled engine (after a kernel choice changed)."""
    engine.runner._ahead = None  # a staged step would be overwritten by the capture
    engine.runner.cuda_graphs.recapture()


def set_folded(engine: EngineCore, on: bool) -> None:
    """Run the layers of the decode graphs without norm kernels (`DecoderLayer._forward_folded`,
    the default on CUDA) or with them (the usual block: the folded weights and norms of weight
    one, the same function); recaptures the graphs, which bake the choice in."""
    settle(engine)
    for layer in engine.model.layers:
        layer.norms_folded = on
    recapture(engine)


def knob_ab(engine: EngineCore, steps: int, set_knob) -> tuple[float, float]:
    """Median decode step seconds with set_knob(engine, True) and (engine, False), in the order
    on, off, off, on (the context grows a token a step, so the two sides see the same mean
    context); each side is the mean of its two medians. Leaves the knob on."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for on in (True, False, False, True):
        set_knob(engine, on)
        timed_steps(engine, 5)
        times[on].append(statistics.median(timed_steps(engine, steps)))
    return statistics.mean(times[True]), statistics.mean(times[False])


def add(
    engine: EngineCore, tag: str, count: int, prompt_len: int, max_tokens: int, gen
) -> list[str]:
    ids = []
    vocab = engine.vocab_size
    for i in range(count):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        rid = f"{tag}-{i}"
        engine.add_request(
            rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        )
        ids.append(rid)
    return ids


def abort_all(engine: EngineCore) -> None:
    """Abort every request and step until none is left (a step launched ahead included)."""
    while engine.has_unfinished_requests():
        engine.abort([r.request_id for r in list(engine.scheduler.running) + list(engine.scheduler.waiting)])
        engine.step()


def prefill_all(engine: EngineCore) -> None:
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running
    ):
        engine.step()


@torch.inference_mode()
def phase_breakdown(engine: EngineCore, steps: int) -> dict[str, float]:
    """Median seconds of each phase of a pure-decode step on the CUDA-graph path, replaying
    what EngineCore.step / ModelRunner.launch do, with a device sync after each phase (so the
    phases add up to a little more than a real step)."""
    from server.engine.cuda_graphs import DecodeBatch
    from server.engine.sampler import SamplingRow

    settle(engine)
    runner, graphs = engine.runner, engine.runner.cuda_graphs
    names = ["schedule", "host batch", "stage + plan", "graph replay", "sample", "update"]
    phases: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(steps):
        torch.cuda.synchronize()
        t = [time.perf_counter()]
        out = engine.scheduler.schedule()
        t.append(time.perf_counter())
        ids, pos, slots, _, seq_lens, _, tables = runner._host_batch(out)
        t.append(time.perf_counter())
        bs = graphs.bucket(len(ids))
        meta, _ = graphs._stage(DecodeBatch(ids, pos, slots, seq_lens, tables), bs)
        runner.attn.plan_cuda_graph(meta)
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        graph, logits = graphs._graphs[bs]
        graph.replay()
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        rows = [SamplingRow.from_request(s.request) for s in out.scheduled]
        result = runner.sampler(logits[: len(ids)], rows)
        t.append(time.perf_counter())
        engine.scheduler.update(
            out,
            {
                s.request.request_id: (tok, lp)
                for s, tok, lp in zip(out.scheduled, result.token_ids, result.logprobs, strict=True)
            },
        )
        t.append(time.perf_counter())
        for i, k in enumerate(names):
            phases[k].append(t[i + 1] - t[i])
    return {k: statistics.median(v) for k, v in phases.items()}


def kernel_table(kernels: list[tuple[str, float, float]], replays: int) -> tuple[str, dict]:
    """Per-replay kernel summary of a profiled run of `replays` graph replays.

    kernels: (name, start_us, duration_us) of every device kernel / memcpy, in any order.
    Returns a markdown table (kernel name -> count, total and mean us per replay, share) and
    totals: kernel-busy time per replay and the span of one replay (first start to last end),
    whose difference is the time the device sat between kernels."""
    if not kernels:
        return "(the profiler recorded no device kernels)", {
            "kernels_per_replay": 0, "busy_us": 0.0, "span_us": 0.0,
        }  # fmt: skip
    ks = sorted(kernels, key=lambda k: k[1])
    per = len(ks) // replays if replays else 0
    spans = [
        ks[(i + 1) * per - 1][1] + ks[(i + 1) * per - 1][2] - ks[i * per][1]
        for i in range(replays)
        if per
    ]
    groups: dict[str, list[float]] = {}
    for name, _, dur in ks:
        groups.setdefault(name, []).append(dur)
    busy = sum(d for _, _, d in ks) / max(replays, 1)
    rows = []
    for name, durs in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        total = sum(durs) / max(replays, 1)
        short = name if len(name) <= 70 else name[:67] + "..."
        rows.append(
            [short, f"{len(durs) / max(replays, 1):.0f}", f"{total:.1f}",
             f"{statistics.mean(durs):.2f}", f"{100 * total / busy:.1f}%"]
        )  # fmt: skip
    totals = {
        "kernels_per_replay": per,
        "busy_us": busy,
        "span_us": statistics.median(spans) if spans else 0.0,
    }
    return table(["kernel", "per replay", "us per replay", "mean us", "share"], rows), totals


@torch.inference_mode()
def device_kernels(run) -> list[tuple[str, float, float]]:
    """(name, start_us, duration_us) of every device kernel / memcpy that `run()` queues,
    recorded with torch.profiler (CUPTI); `run` ends with a device sync."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return [
        (e.name, float(e.time_range.start), float(e.time_range.elapsed_us()))
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    ]


def profile_replays(graph: torch.cuda.CUDAGraph, replays: int) -> tuple[str, dict]:
    """Kernel-level profile of `replays` replays of `graph`."""
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return kernel_table(device_kernels(lambda: [graph.replay() for _ in range(replays)]), replays)


def profile_engine_steps(engine: EngineCore, steps: int) -> tuple[str, dict]:
    """Kernel-level profile of `steps` real decode steps (staging, graph, sampler), per step.
    Real steps rather than bare replays of the graph, so the staging and sampler kernels count.
    (An early batch-128 profile of bare replays read the attention 20% under the steps' time,
    H100, 2026-12-06: most likely some of the batch's requests had run out of tokens by then and
    their rows were one-token padding; `main` now gives them enough.)"""
    settle(engine)
    overlap, engine.config.step_overlap = engine.config.step_overlap, False
    timed_steps(engine, 3)
    try:
        return kernel_table(device_kernels(lambda: timed_steps(engine, steps)), steps)
    finally:
        engine.config.step_overlap = overlap


GRAPH_KERNELS = ("_gemv_kernel", "_fused_decode_kernel")


def step_timeline(kernels: list[tuple[str, float, float]]) -> str:
    """What the device runs between two decode graphs: `kernels` (name, start_us, duration_us)
    of a few engine steps, as a table of the last full step (what follows the second-last
    graph up to the last one); runs of the graph's own kernels (GRAPH_KERNELS) collapse into
    one row."""
    ks = sorted(kernels, key=lambda k: k[1])
    rows: list[list[object]] = []
    for name, start, dur in ks:
        graph = name.startswith(GRAPH_KERNELS)
        if graph and rows and rows[-1][0] == "graph kernels":
            rows[-1][1] += 1
            rows[-1][3] = start + dur - rows[-1][2]
            continue
        rows.append(["graph kernels" if graph else name[:60], 1, start, dur])
    # keep the rows after the second-last graph run up to and including the last one
    marks = [i for i, r in enumerate(rows) if r[0] == "graph kernels"]
    if len(marks) >= 2:
        rows = rows[marks[-2] + 1 : marks[-1] + 1]
    t0 = rows[0][2] if rows else 0.0
    out, prev_end = [], None
    for name, count, start, dur in rows:
        gap = "" if prev_end is None else f"{start - prev_end:.1f}"
        out.append([name, count, f"{start - t0:.1f}", f"{dur:.1f}", gap])
        prev_end = start + dur
    return table(["device work", "kernels", "start us", "us", "gap before, us"], out)


def profile_steps(engine: EngineCore, steps: int) -> str:
    """The device timeline of `steps` real engine steps (`step_timeline`)."""
    timed_steps(engine, 3)
    return step_timeline(device_kernels(lambda: timed_steps(engine, steps)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument(
        "--only-b1",
        action="store_true",
        help="batch-1 decode only (TPOT, graph replay, phases, kernel profile); results go to "
        "<date>-gpu-llama8b-b1.md",
    )
    ap.add_argument(
        "--no-b1", action="store_true", help="skip the batch-1 decode part (A/B runs of the batched steps)"
    )
    ap.add_argument(
        "--b1-context", type=int, default=200, help="tokens of context in the batch-1 decode part"
    )
    ap.add_argument(
        "--decode-batches",
        default="64,128",
        help="batch sizes of the batched decode part",
    )
    ap.add_argument(
        "--decode-context",
        type=int,
        default=1024,
        help="batched decode: keys each sequence attends at the median timed step (the prompt "
        "length is set from it and --steps)",
    )
    ap.add_argument("--profile-replays", type=int, default=20, help="0: no kernel profile")
    ap.add_argument(
        "--pdl-ab",
        action="store_true",
        help="batched decode: also time the step with PDL off, side by side (on/off/off/on); "
        "PDL covers the fused decode attention (batches up to 32) and the batch-1 GEMVs",
    )
    ap.add_argument(
        "--fold-ab",
        action="store_true",
        help="batched decode: also time the step with the norm kernels (the RMSNorm weights "
        "folded either way), side by side (folded path / norm kernels / norm kernels / folded)",
    )
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    peak = matmul_flops()
    torch.cuda.empty_cache()
    print(
        f"device: {machine()}; D2D copy {bw / 1e12:.2f} TB/s; "
        f"bf16 matmul {peak / 1e12:.0f} TFLOP/s",
        flush=True,
    )

    t0 = time.perf_counter()
    engine = EngineCore(
        EngineConfig(
            model=args.model,
            dtype="bfloat16",
            device="cuda",
            max_num_seqs=128,
            max_num_batched_tokens=8192,
            max_model_len=9216,
            enable_prefix_caching=False,
            gpu_memory_utilization=args.gpu_memory_utilization,
            progress=False,
        )
    )
    print(
        f"engine up in {time.perf_counter() - t0:.1f} s: {engine.attn.name} attention, "
        f"graphs={engine.runner.cuda_graphs is not None}, {engine.kv.num_blocks} KV blocks",
        flush=True,
    )
    cfg = engine.model_config
    params = {n: p.numel() * p.element_size() for n, p in engine.model.named_parameters()}
    embed_bytes = params["embed_tokens.weight"]
    layer_bytes = sum(v for n, v in params.items() if n.startswith("layers."))
    # A decode step reads every weight once except the embedding (one row per token).
    weight_bytes = sum(params.values()) - embed_bytes
    kv_per_token = engine.kv_spec.bytes_per_token
    rows: list[list[object]] = []

    # (a) batch-1 decode
    graphs = engine.runner.cuda_graphs
    breakdowns: dict[int, dict[str, float]] = {}
    profile_md = timeline_md = ""
    if not args.no_b1:
        # the prompt leaves ~72 tokens for the warm-up and timed steps before the profile
        add(engine, "b1", 1, max(1, args.b1_context - 72), 8 * args.steps + 200, gen)
        prefill_all(engine)
        timed_steps(engine, 5)
        modes, _ = decode_modes(engine, args.steps)
        tpot = modes["overlap"]
        roof = (weight_bytes + args.b1_context * kv_per_token) / bw
        rows.append(
            [
                f"decode TPOT, batch 1, ctx ~{args.b1_context}",
                f"{tpot * 1e3:.3f} ms",
                f"roofline {roof * 1e3:.3f} ms ({weight_bytes / 1e9:.2f} GB weights)",
                f"{tpot / roof:.3f}x roofline (target <= 1.15x)",
            ]
        )
        rows += mode_rows(modes, roof)
        settle(engine)
        if graphs is not None:
            from triton.testing import do_bench

            from kernels import ops

            fused_default = ops.fuses_linears is not ops.never
            # The graph holds the 32 layers, the final norm and lm_head; the sampler runs after it.
            graph_roof = weight_bytes / bw
            ms = do_bench(graphs._graphs[1][0].replay, warmup=20, rep=200, return_mode="median")
            rows.append(
                [
                    "  graph replay alone (layers + lm_head)",
                    f"{ms:.2f} ms",
                    f"roofline {graph_roof * 1e3:.2f} ms",
                    f"{ms * 1e-3 / graph_roof:.2f}x roofline",
                ]
            )
            if fused_default:
                set_fused_linears(engine, False)
                timed_steps(engine, 5)
                tpot_unfused = statistics.median(timed_steps(engine, args.steps))
                ms_unfused = do_bench(graphs._graphs[1][0].replay, warmup=20, rep=200, return_mode="median")
                set_fused_linears(engine, True, pdl=False)
                timed_steps(engine, 5)
                tpot_nopdl = statistics.median(timed_steps(engine, args.steps))
                ms_nopdl = do_bench(graphs._graphs[1][0].replay, warmup=20, rep=200, return_mode="median")
                set_fused_linears(engine, True)
                timed_steps(engine, 5)
                tpot_fused = statistics.median(timed_steps(engine, args.steps))
                ms = do_bench(graphs._graphs[1][0].replay, warmup=20, rep=200, return_mode="median")
                rows.append(
                    [
                        "  same, fused linears off (cuBLAS + norm/SiLU kernels)",
                        f"{tpot_unfused * 1e3:.2f} ms",
                        f"fused on, timed again: {tpot_fused * 1e3:.2f} ms",
                        f"{tpot_unfused / roof:.2f}x roofline; fused is {tpot_unfused / tpot_fused:.2f}x faster",
                    ]
                )
                pdl_default = "on" if gemv_pdl_default() else "off"
                rows.append(
                    [
                        "  same, PDL off (GEMVs, fused attention)",
                        f"{tpot_nopdl * 1e3:.2f} ms (graph {ms_nopdl:.2f} ms)",
                        f"default (PDL {pdl_default}): {tpot_fused * 1e3:.2f} ms (graph {ms:.2f} ms)",
                        f"default is {tpot_nopdl / tpot_fused:.2f}x faster (graph {ms_nopdl / ms:.2f}x)",
                    ]
                )
                rows.append(
                    [
                        "  graph replay, fused linears off",
                        f"{ms_unfused:.2f} ms",
                        f"fused on: {ms:.2f} ms",
                        f"{ms_unfused * 1e-3 / graph_roof:.2f}x roofline; fused is {ms_unfused / ms:.2f}x faster",
                    ]
                )
            from server.engine import cuda_graphs

            default = cuda_graphs.stage_kernel_enabled()
            cuda_graphs.STAGE_KERNEL = not default
            timed_steps(engine, 5)
            tpot_stage = statistics.median(timed_steps(engine, args.steps))
            cuda_graphs.STAGE_KERNEL = default
            timed_steps(engine, 5)
            tpot_default = statistics.median(timed_steps(engine, args.steps))
            rows.append(
                [
                    f"  same, input staging {'in torch ops' if default else 'as one Triton kernel'}",
                    f"{tpot_stage * 1e3:.3f} ms",
                    f"default ({'one kernel' if default else 'torch ops'}): {tpot_default * 1e3:.3f} ms",
                    f"default is {tpot_stage / tpot_default:.3f}x faster",
                ]
            )
            g1 = graphs._graphs[1][0]
            timeline_md = (
                "\n\nBatch-1 decode, one engine step as the device runs it (default settings; "
                "torch.profiler/CUPTI over 4 steps, the last full one shown):\n\n"
                + profile_steps(engine, 4)
            )
            breakdowns[1] = phase_breakdown(engine, 20)
            if args.profile_replays:
                profile_md, prof = profile_replays(g1, args.profile_replays)
                gap = prof["span_us"] - prof["busy_us"]
                profile_md = (
                    f"\n\nBatch-1 decode graph, kernel profile ({args.profile_replays} replays, "
                    f"torch.profiler/CUPTI): {prof['kernels_per_replay']} kernels per replay, "
                    f"{prof['busy_us'] / 1e3:.3f} ms of kernel time in a {prof['span_us'] / 1e3:.3f} ms "
                    f"span (first kernel start to last kernel end; {gap / 1e3:.3f} ms between "
                    f"kernels); graph's roofline {graph_roof * 1e3:.2f} ms.\n\n" + profile_md
                )
    abort_all(engine)

    # (b) decode at batch 64 and 128 (--decode-batches), 1k context: each mode on fresh
    # requests whose median timed step attends --decode-context keys, on average over the batch.
    for batch in () if args.only_b1 else [int(b) for b in args.decode_batches.split(",")]:
        # Tokens for the timed steps, the phase breakdown and the profile: every request must
        # still be running at the end, or the batch shrinks into a smaller graph.
        ab_tokens = (4 * (args.steps + 5) + 8) * (args.pdl_ab + args.fold_ab)
        max_tokens = args.steps + 60 + args.profile_replays + ab_tokens

        def start(prompt_len: int, batch: int = batch, max_tokens: int = max_tokens) -> float:
            """Fresh requests, prefilled; returns how far past its prompt the mean sequence is
            (1, plus the decode steps run by requests whose prefill ended before the last's)."""
            abort_all(engine)
            add(engine, f"b{batch}-{time.monotonic_ns()}", batch, prompt_len, max_tokens, gen)
            prefill_all(engine)
            return mean_length(engine) - prompt_len

        # A mode's median step attends prompt + ahead + 5 warm-up + steps / 2 keys on average;
        # one batch (guessing ahead = 1) measures `ahead` for the prompt length.
        ahead = start(args.decode_context - 6 - args.steps // 2)
        prompt_len = args.decode_context - 5 - args.steps // 2 - round(ahead)
        modes, contexts = decode_modes(engine, args.steps, functools.partial(start, prompt_len))
        step = modes["overlap"]
        settle(engine)
        pdl_times = knob_ab(engine, args.steps, set_pdl) if args.pdl_ab and graphs is not None else None
        folded = graphs is not None and engine.model.layers[0].norms_folded
        fold_times = knob_ab(engine, args.steps, set_folded) if args.fold_ab and folded else None
        if graphs is not None:
            breakdowns[batch] = phase_breakdown(engine, 10)
            if args.profile_replays:
                md, prof = profile_engine_steps(engine, args.profile_replays)
                profile_md += (
                    f"\n\nBatch-{batch} decode (ctx ~{args.decode_context}+), kernel profile of {args.profile_replays} "
                    f"engine steps (step overlap off, so each step's kernels are its own): "
                    f"{prof['busy_us'] / 1e3:.3f} ms of kernel time in a {prof['span_us'] / 1e3:.3f} ms "
                    "span a step.\n\n" + md
                )
        ctx = contexts["overlap"]
        roof = (weight_bytes + batch * ctx * kv_per_token) / bw
        anchor = f"SGLang {SGLANG_B128_MS} ms (H100)" if batch == 128 else ""
        rows.append(
            [
                f"decode step, batch {batch}, ctx {ctx:.0f}",
                f"{step * 1e3:.2f} ms",
                f"roofline {roof * 1e3:.2f} ms; {batch / step:.0f} tok/s",
                f"{step / roof:.2f}x roofline {anchor}".strip(),
            ]
        )
        rows += mode_rows(modes, roof)
        if pdl_times is not None:
            on, off = pdl_times
            rows.append(
                [
                    "  same, PDL off (A/B: on, off, off, on)",
                    f"{off * 1e3:.2f} ms",
                    f"PDL on: {on * 1e3:.2f} ms",
                    f"PDL on is {off / on:.3f}x faster",
                ]
            )
        if fold_times is not None:
            on, off = fold_times
            rows.append(
                [
                    "  same, with norm kernels (A/B: folded, norms, norms, folded)",
                    f"{off * 1e3:.2f} ms",
                    f"folded (no norm kernels): {on * 1e3:.2f} ms",
                    f"folded is {off / on:.3f}x faster",
                ]
            )
        abort_all(engine)

    # (c) prefill MFU
    hd = cfg.num_heads * cfg.head_dim
    for count, length in () if args.only_b1 else ((1, 8192), (16, 512)):
        times = []
        for rep in range(4):
            ids = add(engine, f"p{count}x{length}-{rep}", count, length, 1, gen)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.step()  # the whole batch fits one step (8192 tokens)
            times.append(time.perf_counter() - t0)
            engine.abort(ids)
            engine.step()
        t = statistics.median(times[1:])
        tokens = count * length
        flops = 2 * tokens * (layer_bytes // 2) + cfg.num_layers * 2 * hd * count * length * (
            length + 1
        )
        flops += 2 * count * params["lm_head.weight"] // 2  # one sampled row per sequence
        mfu = flops / t / peak
        rows.append(
            [
                f"prefill {count}x{length}",
                f"{t * 1e3:.1f} ms",
                f"{flops / t / 1e12:.0f} TFLOP/s ({tokens / t:.0f} tok/s)",
                f"MFU {mfu * 100:.1f}% of measured matmul (target >= 60%)",
            ]
        )

    head = (
        f"Model: {cfg.name} ({sum(params.values()) / 1e9:.2f} GB bf16), attention "
        f"{engine.attn.name}, CUDA graphs {'on' if graphs is not None else 'off'}.\n"
        f"Ceilings measured in this run: D2D copy {bw / 1e12:.2f} TB/s (read+write), "
        f"bf16 8192^3 matmul {peak / 1e12:.0f} TFLOP/s.\n"
    )
    out = table(["what", "time", "vs", "ratio"], rows)
    if breakdowns:
        names = list(next(iter(breakdowns.values())))
        out += "\n\nDecode step phases on the CUDA-graph path (medians, ms; synced per phase):\n\n"
        out += table(
            ["batch", *names, "sum"],
            [
                [b, *(f"{d[k] * 1e3:.3f}" for k in names), f"{sum(d.values()) * 1e3:.2f}"]
                for b, d in breakdowns.items()
            ],
        )
    out += timeline_md + profile_md
    print(head)
    print(out)
    path = write_result(
        "gpu-llama8b-b1" if args.only_b1 else "gpu-llama8b",
        head + "\n" + out,
        "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:]),
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
