"""`pdserve` command line: generate (offline), serve (API + workers), router (API alone) and
worker (one worker joining a router, on any host), env (capabilities)."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-memory", default="1GiB", help="KV cache budget, e.g. 512MiB, 4GiB")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--attention-backend", default="auto",
                   help="auto | flashinfer | triton | torch (env PDSERVE_ATTENTION_BACKEND)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="on CUDA: fraction of GPU memory to fill; the KV cache gets what weights "
                        "and activations leave (0: use --kv-cache-memory)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (neither the decode graphs nor the piecewise ones)")
    g.add_argument("--max-piecewise-tokens", type=int, default=2048,
                   help="with CUDA graphs: prefill / mixed steps of up to this many tokens run as "
                        "piecewise CUDA graphs split at attention (0: always eager)")
    g.add_argument("--no-step-lookahead", action="store_true",
                   help="with CUDA graphs: do not stage the predicted next decode step while the "
                        "current one runs (host and device then take turns)")
    g.add_argument("--no-step-overlap", action="store_true",
                   help="with step lookahead: do not launch the predicted next decode step before "
                        "the current one's tokens reach the host (stage it only)")


def engine_config_from_args(args: argparse.Namespace, **overrides):
    """The EngineConfig the engine flags describe (plus `overrides`); a bad value exits with a
    message that names its flag, not a traceback."""
    from server.engine.config import EngineConfig

    fields = dict(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        attention_backend=args.attention_backend,
        seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        step_lookahead=not args.no_step_lookahead,
        step_overlap=not args.no_step_overlap,
        max_piecewise_tokens=args.max_piecewise_tokens,
    )
    try:
        return EngineConfig(**fields, **overrides)
    except ValueError as e:
        sys.exit(f"pdserve: error: {e}")


def cmd_generate(args: argparse.Namespace) -> int:
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    try:
        llm = LLM(engine_config_from_args(args))
    except (ValueError, FileNotFoundError) as e:  # the flags or the model: one line
        sys.exit(f"pdserve: error: {e}")
    prompt = args.prompt
    ids = (llm.chat_prompt([{"role": "user", "content": prompt}]) if not args.raw
           else llm.encode(prompt))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.sampling_seed, stop=args.stop or [])
    t0 = time.perf_counter()
    first = None
    n = 0
    reason = None
    for delta in llm.stream(ids, params):
        if first is None:
            first = time.perf_counter()
        n += len(delta.token_ids)
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        reason = delta.finish_reason
    end = time.perf_counter()
    decode = (n - 1) / (end - first) if n > 1 and first else 0.0
    print(f"\n\n[{len(ids)} prompt tokens, {n} generated, finish={reason}; "
          f"TTFT {1e3 * ((first or end) - t0):.0f} ms, decode {decode:.1f} tok/s, "
          f"{llm.engine.device} {str(llm.engine.dtype).removeprefix('torch.')}]", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker that joins the router at --router (and drains, then leaves, on SIGTERM /
    Ctrl-C; a second one stops it at once)."""
    import os
    import socket

    from server.worker.__main__ import run_worker

    config = engine_config_from_args(args, num_threads=args.worker_threads)
    worker_id = args.worker_id or f"{args.role}-{socket.gethostname()}-{os.getpid()}"
    return run_worker(
        worker_id, args.role, args.router, config, heartbeat_interval=args.heartbeat_interval,
        kv_transport=args.kv_transport, kv_host=args.kv_host, drain_timeout=args.drain_timeout,
    )  # fmt: skip


def _cmd_env(args: argparse.Namespace) -> int:
    from server.env_report import cmd_env

    return cmd_env(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text offline and print it as it streams")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("env", help="print versions, devices and the kernels that would be chosen")
    e.set_defaults(func=_cmd_env)

    try:
        from server.api.launch import add_router_args, add_serve_args, run_router, run_serve
        from server.worker.__main__ import ROLES, add_drain_args, add_kv_args
    except ImportError:
        pass
    else:
        s = sub.add_parser("serve", help="run the OpenAI-compatible server and its workers")
        add_serve_args(s)
        s.set_defaults(func=run_serve)
        r = sub.add_parser("router", help="run the OpenAI-compatible server; workers join it")
        add_router_args(r)
        r.set_defaults(func=run_router)
        w = sub.add_parser("worker", help="run one worker that joins a router")
        w.add_argument("--router", required=True,
                       help="the router's control address, e.g. tcp://router-host:5555")
        w.add_argument("--role", default="both", choices=ROLES)
        w.add_argument("--worker-id", default=None, help="default: ROLE-HOSTNAME-PID")
        w.add_argument("--worker-threads", type=int, default=None)
        w.add_argument("--heartbeat-interval", type=float, default=0.5)
        add_kv_args(w)
        add_drain_args(w)
        add_engine_args(w)
        w.set_defaults(func=cmd_worker)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
