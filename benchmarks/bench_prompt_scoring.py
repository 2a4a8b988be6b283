"""Prompt scoring throughput (prompt logprobs: what `echo` + `logprobs` and evaluation harnesses
ask for), side by side in one run:

  pdserve plain:   the engine prefills the prompts and samples one token each (max_tokens=1):
                   what the same prompts cost without scoring;
  pdserve scored:  the same, with `prompt_logprobs=k`: every prompt position's lm_head row,
                   log-softmax, the next prompt token's logprob and rank, the top k; with the
                   engine's slices of logits and with slices of max_num_seqs rows;
  HF forward:      transformers' `LlamaForCausalLM` (same shapes, random bf16 weights, sdpa)
                   scoring the same prompts the way one scores with it: a batched forward
                   (its logits for every position), float32 log-softmax, the next token's
                   logprob and the top k, in batches of `--hf-batch` prompts. Run first, in a
                   child process with the image's own packages.

Each pdserve variant runs twice, alternating, on distinct random prompts (no prefix hits); the
best round is kept. Prompt tok/s = prompt tokens / wall time of `LLM.generate`.

    python benchmarks/bench_prompt_scoring.py [--num-prompts 64 --input-len 2048 --k 1]
    python benchmarks/bench_prompt_scoring.py --model random:smollm2-135m --device cpu \\
        --num-prompts 4 --input-len 64 --budget 128 --hf-batch 2 --no-save  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu_server import hf_random_model, token_prompts  # noqa: E402
from benchmarks.common import table, write_result  # noqa: E402

HF_TAG = "HF_SCORING "


def hf_main(spec_json: str) -> int:
    import torch

    spec = json.loads(spec_json)
    dev = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    model = hf_random_model(spec["model"], dev, dtype)
    prompts = token_prompts(spec["num_prompts"], spec["input_len"], spec["seed"])
    k, b = spec["k"], spec["hf_batch"]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    @torch.inference_mode()
    def score(batch: list[list[int]]) -> None:
        ids = torch.tensor(batch, device=dev)
        lp = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
        chosen = lp.gather(-1, ids[:, 1:, None])
        rank = (lp > chosen).sum(-1)
        top = lp.topk(max(k, 1), dim=-1)
        torch.cat([chosen.flatten(), rank.flatten().float(), top.values.flatten()]).cpu()

    score(prompts[:b])  # warm-up
    sync()
    t = time.perf_counter()
    for i in range(0, len(prompts), b):
        score(prompts[i : i + b])
    sync()
    seconds = time.perf_counter() - t
    tokens = sum(len(p) for p in prompts)
    print(HF_TAG + json.dumps({
        "transformers": __import__("transformers").__version__,
        "attn": model.config._attn_implementation, "seconds": seconds, "tokens": tokens,
        "throughput": tokens / seconds,
        "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0,
    }), flush=True)  # fmt: skip
    return 0


def run_engine(a: argparse.Namespace) -> tuple[dict[str, list[float]], float, int]:
    import torch

    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=a.model, device=a.device, dtype=a.dtype, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.budget, max_model_len=a.input_len + 8,
              gpu_memory_utilization=a.gpu_memory_utilization, kv_cache_memory=a.kv_cache_memory,
              progress=False)  # fmt: skip
    build_s = time.perf_counter() - t0
    runner = llm.engine.runner
    slice_rows = runner.max_logit_rows
    scored = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=a.k)
    # name -> (params, rows of logits scored at a time)
    variants = {
        "plain": (SamplingParams(max_tokens=1, temperature=0.0), slice_rows),
        "scored": (scored, slice_rows),
        "scored, small slices": (scored, a.max_num_seqs),
    }
    if slice_rows == a.max_num_seqs:
        del variants["scored, small slices"]
    warm = token_prompts(min(4, a.num_prompts), a.input_len, a.seed + 1000)
    for params, _ in variants.values():
        llm.generate(warm, params)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    seed = a.seed + 1
    for _ in range(a.rounds):
        for name, (params, rows) in variants.items():
            runner.max_logit_rows = rows
            prompts = token_prompts(a.num_prompts, a.input_len, seed)
            seed += 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = llm.generate(prompts, params)
            seconds = time.perf_counter() - t
            if params.prompt_logprobs is not None:
                assert all(len(r.prompt_logprobs) == a.input_len for r in out)
            rounds[name].append(a.num_prompts * a.input_len / seconds)
    llm.engine.check_integrity()
    return rounds, build_s, slice_rows


def run_hf(a: argparse.Namespace) -> dict:
    spec = {"model": a.model, "device": a.device, "dtype": a.dtype, "num_prompts": a.num_prompts,
            "input_len": a.input_len, "seed": a.seed + 1, "k": a.k, "hf_batch": a.hf_batch}  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)  # the image's transformers, not the carried wheels
    proc = subprocess.run([sys.executable, __file__, "--hf", json.dumps(spec)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith(HF_TAG)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"HF run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len(HF_TAG) :])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--hf"]:
        return hf_main(argv[1])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--k", type=int, default=1, help="top-k alternatives per position")
    p.add_argument("--budget", type=int, default=8192, help="--max-num-batched-tokens")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hf-batch", type=int, default=4)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-memory", default="1GiB", help="used on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    if a.device == "cpu":
        a.gpu_memory_utilization = 0
    # HF first, in its child process: that process's memory is gone when it exits, while the
    # engine's would stay cached in this one
    hf = None if a.skip_hf else run_hf(a)
    rounds, build_s, slice_rows = run_engine(a)
    best = {name: max(v) for name, v in rounds.items()}
    rows = [
        ["pdserve, plain prefill (max_tokens=1)", " / ".join(f"{x:.0f}" for x in rounds["plain"]),
         f"{best['plain']:.0f}", "1.00x"],
        [f"pdserve, prompt_logprobs={a.k}", " / ".join(f"{x:.0f}" for x in rounds["scored"]),
         f"{best['scored']:.0f}", f"{best['scored'] / best['plain']:.2f}x"],
    ]  # fmt: skip
    if "scored, small slices" in rounds:
        small = rounds["scored, small slices"]
        rows.append([f"pdserve, prompt_logprobs={a.k}, {a.max_num_seqs}-row slices",
                     " / ".join(f"{x:.0f}" for x in small), f"{max(small):.0f}",
                     f"{max(small) / best['plain']:.2f}x"])  # fmt: skip
    if hf is not None:
        rows.append([f"HF forward + log_softmax (transformers {hf['transformers']}, {hf['attn']}, "
                     f"batches of {a.hf_batch})", "1 round", f"{hf['throughput']:.0f}",
                     f"{hf['throughput'] / best['plain']:.2f}x"])  # fmt: skip
    body = (
        f"Model: {a.model}, {a.dtype} on {a.device}; {a.num_prompts} prompts of {a.input_len} random "
        f"ids (distinct every round), one token generated; token budget {a.budget}, at most "
        f"{a.max_num_seqs} running; logits scored {slice_rows} rows at a time; engine built in "
        f"{build_s:.0f} s.\n\n"
        + table(["variant", "prompt tok/s per round", "best", "vs plain"], rows)
    )
    if hf is not None:
        body += (f"\n\npdserve scored / HF forward scoring = {best['scored'] / hf['throughput']:.2f}x "
                 f"(HF peak memory {hf['peak_mem_gib']:.1f} GiB)")  # fmt: skip
    print(body)
    if not a.no_save:
        cmd = "python benchmarks/bench_prompt_scoring.py " + " ".join(argv)
        print(f"\nwrote {write_result('prompt-scoring', body, cmd.strip())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
