"""`pdserve serve`: the API + router process and its worker processes.

`add_serve_args(parser)` declares the flags; `run_serve(args)` runs until Ctrl-C / SIGTERM and
returns the exit code. Start-up order: load the tokenizer (fail fast on a bad --model), bind
the control-plane socket, spawn `--num-workers` workers (role `both`), serve HTTP at once
(`/health` answers 503 until every worker has done its handshake). Shutdown: uvicorn stops
accepting and drains for up to `--graceful-shutdown-timeout` seconds, then every worker is
told to shut down and, failing that, terminated. A worker that dies before its handshake
stops the server with exit code 1; workers also exit on their own if this process dies.
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
from router.registry import WorkerInfo, WorkerState
from server.api.app import create_app
from server.api.context import ServerConfig, ServerContext
from server.cli import add_engine_args, engine_config_from_args
from server.frontend.tokenizer_loader import load_tokenizer
from server.metrics import ServerMetrics
from server.worker.spawn import WorkerProcess, spawn_worker, stop_workers

logger = logging.getLogger("server.api")

API_KEY_ENV = "PDSERVE_API_KEY"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)  # the engine flags `pdserve generate` has, for every worker
    g = parser.add_argument_group("workers")
    g.add_argument(
        "--served-model-name", nargs="+", default=None, help="name(s) clients use as `model`"
    )
    g.add_argument(
        "--worker-threads", type=int, default=None, help="CPU threads per worker (default: torch's)"
    )
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key", default=None, help=f"require this bearer key (default: ${API_KEY_ENV})"
    )
    s.add_argument("--num-workers", type=int, default=1)
    s.add_argument(
        "--max-pending-requests",
        type=int,
        default=None,
        help="engine requests in flight before 429 (default: 4 x max-num-seqs per worker; 0: no limit)",
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
        default=None,
        help="ZMQ address for the control plane (default: an ipc:// socket)",
    )
    s.add_argument("--access-log", action="store_true", help="log every HTTP request (uvicorn)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def engine_config(args: argparse.Namespace) -> dict[str, Any]:
    """`EngineConfig` fields as JSON-able values (each worker builds the dataclass)."""
    config = engine_config_from_args(args)
    config.num_threads = args.worker_threads
    config.progress = False
    if args.num_workers > 1:
        # Workers that share a GPU each profile what is free: split the fraction between them.
        config.gpu_memory_utilization /= args.num_workers
    return dataclasses.asdict(config)


def _check_args(args: argparse.Namespace) -> None:
    if args.num_workers < 1:
        raise SystemExit("--num-workers must be at least 1")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")


def run_serve(args: argparse.Namespace) -> int:
    _check_args(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    max_pending = args.max_pending_requests
    if max_pending is None:
        max_pending = 4 * args.max_num_seqs * args.num_workers
    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError) as exc:
        logger.error("cannot load the tokenizer of %s: %s", args.model or "the embedded model", exc)
        return 1
    address = args.control_addr or (
        f"ipc://{tempfile.gettempdir()}/pdserve-{os.getpid()}-{secrets.token_hex(4)}.sock"
    )
    cluster = Cluster(
        address, heartbeat_timeout=args.heartbeat_timeout, start_timeout=args.worker_start_timeout
    )
    ctx = ServerContext(
        config=ServerConfig(
            served_model_names=list(args.served_model_name or []),
            api_key=api_key,
            max_pending_requests=max_pending,
        ),
        tokenizer=tokenizer,
        cluster=cluster,
        metrics=ServerMetrics(lambda: ctx.model_name),
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
        for i in range(args.num_workers):
            w = spawn_worker(f"worker-{i}", address, engine_config(args), log_level=args.log_level)
            workers.append(w)
            cluster.attach_process(w)
        await cluster.start()
        logger.info(
            "pdserve listening on http://%s:%d with %d worker(s); control plane %s",
            args.host, args.port, args.num_workers, address,
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
