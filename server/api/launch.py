"""`pdserve serve` / `pdserve router`: the API + router process (and its worker processes).

`add_serve_args(parser)` declares the flags; `run_serve(args)` runs until Ctrl-C / SIGTERM and
returns the exit code. Start-up order: load the tokenizer (fail fast on a bad --model), bind
the control-plane socket, spawn `--num-workers` workers of role `both`, `--prefill-workers`
of role `prefill` and `--decode-workers` of role `decode`, serve HTTP at once (`/health`
answers 503 until every worker has done its handshake). More workers may join at any time
(`pdserve worker --router ADDR`, with `--control-addr` a tcp:// address) and leave again.
`pdserve router` (`add_router_args`) is the same process with no workers of its own.
Shutdown: uvicorn stops accepting and drains for up to `--graceful-shutdown-timeout` seconds,
then every worker is told to shut down and, failing that, terminated. A spawned worker that
dies before its handshake stops the server with exit code 1; spawned workers also exit on
their own if this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from router.cluster import Cluster
from router.disagg_policy import DisaggConfig
from router.registry import WorkerInfo, WorkerState
from server.api.app import create_app
from server.api.context import ServerConfig, ServerContext
from server.cli import add_engine_args, engine_config_from_args
from server.frontend.tokenizer_loader import load_tokenizer
from server.metrics import ServerMetrics
from server.worker.placement import cpu_threads, parse_gpus, place_workers
from server.worker.spawn import WorkerProcess, spawn_worker, stop_workers

logger = logging.getLogger("server.api")

API_KEY_ENV = "PDSERVE_API_KEY"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)  # the engine flags `pdserve generate` has, for every worker
    g = parser.add_argument_group("workers")
    g.add_argument(
        "--worker-threads", type=int, default=None, help="CPU threads per worker (default: the host's cores split among its CPU workers; one worker: torch's default)"
    )
    g.add_argument("--num-workers", type=int, default=None,
                   help="workers of role both (default: 1, or 0 with --prefill/--decode-workers)")
    g.add_argument("--prefill-workers", type=int, default=0, help="workers of role prefill")
    g.add_argument("--decode-workers", type=int, default=0, help="workers of role decode")
    g.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "zmq", "none"],
                   help="KV handoff transport of the spawned workers (auto: nixl if installed)")
    g.add_argument("--gpus", default=None,
                   help="GPUs the spawned workers are spread over, round-robin in the order both, "
                        "prefill, decode (e.g. 0,1; default: all visible; --device cuda:N pins "
                        "every worker to GPU N); workers sharing a GPU split "
                        "--gpu-memory-utilization")
    _add_router_args(parser, control_addr=None)


def add_router_args(parser: argparse.ArgumentParser) -> None:
    """`pdserve router`: the API + router alone; workers join with `pdserve worker`."""
    parser.add_argument("--model", default=None,
                        help="the served model, for its tokenizer (default: the embedded one)")
    _add_router_args(parser, control_addr="tcp://0.0.0.0:5555")


def _add_router_args(parser: argparse.ArgumentParser, control_addr: str | None) -> None:
    g = parser.add_argument_group("disaggregation")
    g.add_argument("--disagg-mode", choices=["conditional", "always", "never"], default=None,
                   help="where prompts are prefilled: by the scoring rules (conditional), on a "
                        "prefill worker whenever there is one (always), on the decode worker "
                        "(never); overrides the config file's mode")
    g.add_argument("--disagg-config", default=None,
                   help="JSON file of scoring weights and thresholds (router.disagg_policy."
                        "DisaggConfig fields)")
    g.add_argument("--kv-lease", type=float, default=30.0,
                   help="seconds a decode worker holds blocks for remote KV before it prefills "
                        "the prompt itself")
    g.add_argument("--kv-lease-grace", type=float, default=5.0,
                   help="seconds after the lease before those blocks may be reused")  # fmt: skip
    s = parser.add_argument_group("server")
    s.add_argument(
        "--served-model-name", nargs="+", default=None, help="name(s) clients use as `model`"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key", default=None, help=f"require this bearer key (default: ${API_KEY_ENV})"
    )
    s.add_argument(
        "--max-pending-requests",
        type=int,
        default=None,
        help="engine requests in flight before 429 (default: 4 x max-num-seqs per spawned "
        "worker, or 256 with none; 0: no limit)",
    )
    s.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=60.0,
        help="seconds without a heartbeat before a worker is dead (heartbeats come between engine "
        "steps, so this must exceed the longest step; a worker whose process exits is noticed at once)",
    )
    s.add_argument("--worker-start-timeout", type=float, default=600.0)
    s.add_argument("--graceful-shutdown-timeout", type=float, default=5.0)
    s.add_argument(
        "--control-addr",
        default=control_addr,
        help="ZMQ address the control plane binds, e.g. tcp://0.0.0.0:5555 so workers on other "
        f"hosts can join (default: {control_addr or 'an ipc:// socket: this host only'})",
    )
    s.add_argument("--access-log", action="store_true", help="log every HTTP request (uvicorn)")
    s.add_argument("--enable-debug-endpoints", action="store_true",
                   help="serve GET /debug/integrity (KV-cache checks of every worker)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def engine_configs(
    args: argparse.Namespace, num_workers: int
) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Each spawned worker's `EngineConfig` fields as JSON-able values (each worker builds the
    dataclass) -- the same flags, with the device and memory share of its placement -- and the
    environment it starts with (CUDA_VISIBLE_DEVICES of its GPU)."""
    config = engine_config_from_args(args, num_threads=args.worker_threads, progress=False)
    placements = place_workers(
        num_workers, config.device, config.gpu_memory_utilization, visible_gpus(config.device),
        parse_gpus(args.gpus), os.environ.get("CUDA_VISIBLE_DEVICES"),
    )  # fmt: skip
    on_cpu = [p.device in ("cpu", "auto") for p in placements]  # "auto" stays only without GPUs
    threads = config.num_threads
    if threads is None and sum(on_cpu) > 1:  # several CPU workers: split the cores
        threads = cpu_threads(sum(on_cpu), len(os.sched_getaffinity(0)))
    return [
        (dataclasses.asdict(dataclasses.replace(
            config, device=p.device, gpu_memory_utilization=p.gpu_memory_utilization,
            num_threads=threads if cpu else config.num_threads,
        )), {"CUDA_VISIBLE_DEVICES": p.visible_devices} if p.visible_devices else {})
        for p, cpu in zip(placements, on_cpu, strict=True)
    ]  # fmt: skip


def gpu_device_nodes() -> bool:
    """Whether this host has any GPU device node (NVIDIA, AMD ROCm, WSL): without one CUDA
    sees no device, which the router can tell without importing torch."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def visible_gpus(device: str) -> int:
    """CUDA devices this host shows (0 when the workers run on the CPU anyway)."""
    if device == "cpu" or not gpu_device_nodes():
        return 0
    import torch  # only where a GPU may be: importing it costs the router ~1.5 s of start-up

    return torch.cuda.device_count()


def worker_plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(worker id, role) of each worker to spawn."""
    prefill = getattr(args, "prefill_workers", 0)
    decode = getattr(args, "decode_workers", 0)
    both = getattr(args, "num_workers", 0)
    if both is None:
        both = 0 if prefill or decode else 1
    return (
        [(f"worker-{i}", "both") for i in range(both)]
        + [(f"prefill-{i}", "prefill") for i in range(prefill)]
        + [(f"decode-{i}", "decode") for i in range(decode)]
    )


def disagg_config(args: argparse.Namespace) -> DisaggConfig:
    config = DisaggConfig.from_file(args.disagg_config) if args.disagg_config else DisaggConfig()
    if args.disagg_mode is not None:
        config = dataclasses.replace(config, mode=args.disagg_mode)
    return config


def _check_args(args: argparse.Namespace, plan: list[tuple[str, str]], spawn: bool) -> None:
    for name in ("num_workers", "prefill_workers", "decode_workers"):
        if (getattr(args, name, 0) or 0) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must not be negative")
    if spawn and not plan:
        raise SystemExit("nothing to serve: give --num-workers, --decode-workers or both")
    if spawn and all(role == "prefill" for _, role in plan):
        raise SystemExit("prefill workers need a decode worker: add --decode-workers or --num-workers")
    if spawn:  # every engine flag's range, before anything starts (exits naming the flag)
        engine_config_from_args(args, num_threads=args.worker_threads)
    if args.kv_lease <= 0 or args.kv_lease_grace < 0:
        raise SystemExit("--kv-lease must be positive and --kv-lease-grace not negative")


def run_router(args: argparse.Namespace) -> int:
    return run_serve(args, spawn=False)


def run_serve(args: argparse.Namespace, spawn: bool = True) -> int:
    plan = worker_plan(args) if spawn else []
    _check_args(args, plan, spawn)
    try:
        disagg = disagg_config(args)
    except (OSError, ValueError, TypeError) as exc:
        raise SystemExit(f"--disagg-config {args.disagg_config}: {exc}") from None
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    max_pending = args.max_pending_requests
    if max_pending is None:
        decoders = sum(role != "prefill" for _, role in plan)
        max_pending = 4 * args.max_num_seqs * decoders if decoders else 256
    try:
        configs = engine_configs(args, len(plan)) if spawn else []
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError) as exc:
        logger.error("cannot load the tokenizer of %s: %s", args.model or "the embedded model", exc)
        return 1
    address = args.control_addr or (
        f"ipc://{tempfile.gettempdir()}/pdserve-{os.getpid()}-{secrets.token_hex(4)}.sock"
    )
    metrics = ServerMetrics(lambda: ctx.model_name)
    cluster = Cluster(
        address,
        heartbeat_timeout=args.heartbeat_timeout,
        start_timeout=args.worker_start_timeout,
        disagg=disagg,
        lease_s=args.kv_lease,
        grace_s=args.kv_lease_grace,
        metrics=metrics.stages,
    )
    ctx = ServerContext(
        config=ServerConfig(
            served_model_names=list(args.served_model_name or []),
            api_key=api_key,
            max_pending_requests=max_pending,
            debug_endpoints=args.enable_debug_endpoints,
        ),
        tokenizer=tokenizer,
        cluster=cluster,
        metrics=metrics,
        created=int(time.time()),
    )
    result = {"code": 0}
    server: uvicorn.Server | None = None

    def on_worker_dead(info: WorkerInfo, reason: str, previous: WorkerState) -> None:
        if previous is WorkerState.STARTING and not cluster.closing:
            logger.error("worker %s failed to start (%s); shutting down", info.worker_id, reason)
            result["code"] = 1
            if server is not None:
                server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cluster.bind()
        cluster.on_worker_dead.append(on_worker_dead)
        workers: list[WorkerProcess] = []
        for (worker_id, role), (config, env) in zip(plan, configs, strict=True):
            w = spawn_worker(
                worker_id, address, config, role=role, env=env,
                log_level=args.log_level, kv_transport=args.kv_transport,
            )  # fmt: skip
            workers.append(w)
            cluster.attach_process(w)
        await cluster.start()
        logger.info(
            "pdserve listening on http://%s:%d with %d worker(s) %s; control plane %s; "
            "disaggregation %s, KV lease %.0fs",
            args.host, args.port, len(plan), [wid for wid, _ in plan], address, disagg.mode,
            args.kv_lease,
        )  # fmt: skip
        try:
            yield
        finally:
            await cluster.close(timeout=10.0)
            await asyncio.to_thread(stop_workers, workers, 5.0)
            if address.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(address[len("ipc://") :])
            logger.info("pdserve stopped")

    app = create_app(ctx, lifespan)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_shutdown_timeout,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGINT / SIGTERM it handled once it has shut down; by then every
    # worker is stopped, so the signal has done its job: exit 0 instead of dying of it.
    stopped_by: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda s, f: stopped_by.append(s))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return int(exc.code or 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return result["code"] or (0 if server.started else 1)
