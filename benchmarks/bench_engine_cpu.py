"""pdserve's engine vs Hugging Face transformers `generate`, same weights, same dtype, same
machine, one run: single-stream decode speed and throughput with 16 concurrent sequences.

    python benchmarks/bench_engine_cpu.py [--dtype bfloat16] [--new-tokens 64]

Both sides generate exactly --new-tokens tokens greedily (EOS ignored) and are timed the same
way: prefill + decode wall time per generated token ("output tok/s"), and decode-only speed
(tokens after the first over the time after the first token).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import table, write_result  # noqa: E402
from server.engine.engine import EngineConfig  # noqa: E402
from server.engine.llm import LLM  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.models.loader import embedded_model_path  # noqa: E402
from tests.reference import hf_model  # noqa: E402

TOPICS = [
    "the ocean",
    "volcanoes",
    "bread",
    "chess",
    "the moon",
    "bees",
    "trains",
    "rain",
    "music",
    "glaciers",
    "owls",
    "bridges",
    "coffee",
    "maps",
    "tea",
    "comets",
]


def hf_run(model, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """Returns (total seconds, seconds to first token) for a batched greedy generate."""
    from transformers import StoppingCriteria

    first = []

    class FirstToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            if not first:
                first.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=[FirstToken()],
        )
    total = time.perf_counter() - t0
    assert out.shape[1] == width + n
    return total, first[0] - t0


def pd_run(llm: LLM, prompts: list[list[int]], n: int) -> tuple[float, float]:
    eng = llm.engine
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
    first = None
    done = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        if first is None and outs:
            first = time.perf_counter()
        done += sum(len(o.new_token_ids) for o in outs)
    total = time.perf_counter() - t0
    assert done == n * len(prompts), done
    return total, first - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, args.dtype)
    n = args.new_tokens

    llm = LLM(EngineConfig(dtype=args.dtype, kv_cache_memory="512MiB", progress=False))
    prompts = [
        llm.chat_prompt([{"role": "user", "content": f"Write a short poem about {t}."}])
        for t in TOPICS[: args.streams]
    ]
    hf = hf_model(str(embedded_model_path()), dtype)

    results = {}
    for name, fn, model in (("HF transformers", hf_run, hf), ("pdserve", pd_run, llm)):
        fn(model, prompts[:1], 4)  # warm-up
        for label, batch in (("1 stream", prompts[:1]), (f"{args.streams} streams", prompts)):
            best = None
            for _ in range(args.repeats):
                total, ttft = fn(model, batch, n)
                if best is None or total < best[0]:
                    best = (total, ttft)
            total, ttft = best
            out_tps = n * len(batch) / total
            dec_tps = (n - 1) * len(batch) / (total - ttft)
            results[(name, label)] = (out_tps, dec_tps, ttft)
            print(
                f"{name:16s} {label:10s} output {out_tps:8.1f} tok/s  decode {dec_tps:8.1f} tok/s  "
                f"TTFT {ttft * 1e3:7.1f} ms",
                flush=True,
            )

    rows = []
    for label in ("1 stream", f"{args.streams} streams"):
        hf_o, hf_d, hf_t = results[("HF transformers", label)]
        pd_o, pd_d, pd_t = results[("pdserve", label)]
        rows.append(
            [
                label,
                f"{hf_o:.1f}",
                f"{pd_o:.1f}",
                f"{pd_o / hf_o:.1f}x",
                f"{hf_d:.1f}",
                f"{pd_d:.1f}",
                f"{pd_d / hf_d:.1f}x",
            ]
        )
    body = table(
        [
            "load",
            "HF output tok/s",
            "pdserve output tok/s",
            "ratio",
            "HF decode tok/s",
            "pdserve decode tok/s",
            "ratio",
        ],
        rows,
    )
    body = (
        f"SmolLM2-135M-Instruct (embedded GGUF, dequantized), {args.dtype} on both sides, "
        f"{n} new tokens per sequence, greedy, EOS ignored, best of {args.repeats}.\n"
        f"Targets: >=5x HF single-stream, >=10x HF at 16 streams.\n\n{body}"
    )
    print("\n" + body)
    path = write_result(f"engine-cpu-{args.dtype}", body, "python " + " ".join(sys.argv))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
