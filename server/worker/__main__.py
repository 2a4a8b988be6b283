"""Worker process entry point: `python -m server.worker --worker-id ... --router-addr ...`.

Started by `server/worker/spawn.py` (or, for a worker joining a running router from anywhere,
by `pdserve worker`, which calls `run_worker`). Loads the engine (seconds), opens its KV
connector, connects a DEALER socket to the router, sends the `Hello` handshake (with its KV
endpoint) and runs `WorkerLoop` until told to stop. SIGTERM drains it (no new requests; the
ones it holds finish within `--drain-timeout` seconds; then Goodbye and exit 0); a second
SIGTERM, or `--drain-timeout 0`, stops it at once. A spawned worker ignores SIGINT (the router
process owns shutdown on Ctrl-C and tells each worker); the kernel's parent-death signal and a
`getppid()` check stop it if the router dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys

import msgspec
import zmq

from server.worker import messages as m
from server.worker.loop import WorkerLoop

logger = logging.getLogger("server.worker")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (best effort elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


ROLES = ("both", "prefill", "decode")
KV_TRANSPORTS = ("auto", "nixl", "zmq", "none")


def add_kv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-transport",
        default="auto",
        choices=KV_TRANSPORTS,
        help="KV handoff transport: nixl, the zmq fallback, auto (nixl when it is "
        "installed) or none (this worker takes no part in disaggregation)",
    )
    p.add_argument("--kv-host", default="auto",
                   help="address peers reach this worker's KV transport at (zmq) (default: the "
                        "local address that routes to the router)")  # fmt: skip


def add_drain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to finish the requests this worker holds (it takes "
                        "no new ones) before they end with an error; 0: exit at once")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.worker")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--role", default="both", choices=ROLES)
    p.add_argument("--router-addr", required=True, help="ZMQ address of the router's socket")
    p.add_argument("--engine-config", required=True, help="EngineConfig as a JSON object")
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--log-level", default="info")
    add_kv_args(p)
    add_drain_args(p)
    return p.parse_args(argv)


def kv_host_for(router_addr: str) -> str:
    """The local address on the route to the router: where peers on its network reach us."""
    if not router_addr.startswith("tcp://"):
        return "127.0.0.1"  # ipc:// or inproc://: every worker is on this host
    host, _, port = router_addr[len("tcp://") :].rpartition(":")
    host = host.strip("[]")
    if host in ("localhost", "0.0.0.0", "*") or host.startswith("127."):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port)))  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{args.worker_id}] %(name)s: %(message)s",
    )
    _die_with_parent()
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        return 1  # the parent died before we got here
    from server.engine.engine import EngineConfig  # heavy: torch + model code

    config = EngineConfig(**msgspec.json.decode(args.engine_config.encode()))
    return run_worker(
        args.worker_id, args.role, args.router_addr, config,
        parent_pid=args.parent_pid, heartbeat_interval=args.heartbeat_interval,
        kv_transport=args.kv_transport, kv_host=args.kv_host, ignore_sigint=True,
        drain_timeout=args.drain_timeout,
    )  # fmt: skip


def run_worker(
    worker_id: str,
    role: str,
    router_addr: str,
    config,
    *,
    parent_pid: int | None = None,
    heartbeat_interval: float = 0.5,
    kv_transport: str = "auto",
    kv_host: str = "auto",
    ignore_sigint: bool = False,
    drain_timeout: float = 30.0,
) -> int:
    """Load the engine, connect to the router, say Hello, serve until told to stop.

    SIGTERM (and SIGINT unless `ignore_sigint`: a spawned worker leaves Ctrl-C to the router
    process, which tells each worker) drains it, a second one stops it at once (so does the
    first with `drain_timeout` 0, or while the model loads)."""
    stop = {"flag": False, "drain": False}

    def on_stop(signum: int, frame: object) -> None:
        if drain_timeout > 0 and not stop["drain"]:
            stop["drain"] = True
        else:
            stop["flag"] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else on_stop)

    from kvcache.transfer import create_connector
    from server.engine.engine import EngineCore
    from server.worker.kv_handoff import kv_layout

    config.worker_id = worker_id
    try:
        engine = EngineCore(config)
    except (ValueError, FileNotFoundError) as exc:  # the config or the model, not a bug: one line
        logger.error("cannot start the engine: %s", exc)
        return 1
    if stop["flag"] or stop["drain"]:
        return 0
    connector = None
    if kv_transport != "none":
        host = kv_host_for(router_addr) if kv_host == "auto" else kv_host
        try:
            connector = create_connector(
                kv_transport, worker_id, engine.kv_cache, kv_layout(engine), host=host
            )
        except ImportError as exc:
            logger.error("KV transport %s is not available: %s", kv_transport, exc)
            return 1
        logger.info("KV transport %s (%s)", connector.transport, host)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, worker_id.encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(router_addr)
    stats = engine.stats()
    hello = m.Hello(
        worker_id=worker_id,
        role=role,
        model_name=engine.model_name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        pid=os.getpid(),
        num_blocks=stats.num_blocks,
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        kv_endpoint=connector.endpoint() if connector is not None else None,
    )
    loop = WorkerLoop(
        engine,
        sock,
        hello,
        connector=connector,
        heartbeat_interval=heartbeat_interval,
        parent_pid=parent_pid,
        should_stop=lambda: stop["flag"],
        should_drain=lambda: stop["drain"],
        drain_timeout=drain_timeout,
    )
    code = 0
    try:
        reason = loop.run()
        logger.info("worker %s exiting (%s)", worker_id, reason)
    except Exception:
        logger.exception("worker loop failed")
        with contextlib.suppress(zmq.ZMQError):
            sock.send(m.encode(m.Goodbye(worker_id=worker_id, reason="engine failure")))
        code = 1
    if connector is not None:
        connector.close()
    sock.close(linger=1000)
    ctx.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
