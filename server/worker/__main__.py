"""Worker process entry point: `python -m server.worker --worker-id ... --router-addr ...`.

Started by `server/worker/spawn.py`. Loads the engine (seconds), connects a DEALER socket to the
router, sends the `Hello` handshake and runs `WorkerLoop` until told to stop. SIGTERM stops it
cleanly; SIGINT is ignored (the router process owns shutdown on Ctrl-C and tells each worker);
the kernel's parent-death signal and a `getppid()` check stop it if the router dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.worker")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--role", default="both", choices=["both"])
    p.add_argument("--router-addr", required=True, help="ZMQ address of the router's socket")
    p.add_argument("--engine-config", required=True, help="EngineConfig as a JSON object")
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{args.worker_id}] %(name)s: %(message)s",
    )
    _die_with_parent()
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        return 1  # the parent died before we got here
    stop = {"flag": False}

    def on_term(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from server.engine.engine import EngineConfig, EngineCore  # heavy: torch + model code

    config = EngineConfig(**msgspec.json.decode(args.engine_config.encode()))
    config.worker_id = args.worker_id
    engine = EngineCore(config)
    if stop["flag"]:
        return 0

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, args.worker_id.encode())
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(args.router_addr)
    stats = engine.stats()
    hello = m.Hello(
        worker_id=args.worker_id,
        role=args.role,
        model_name=engine.model_name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        pid=os.getpid(),
        num_blocks=stats.num_blocks,
        block_size=config.block_size,
    )
    loop = WorkerLoop(
        engine,
        sock,
        hello,
        heartbeat_interval=args.heartbeat_interval,
        parent_pid=args.parent_pid,
        should_stop=lambda: stop["flag"],
    )
    try:
        reason = loop.run()
    except Exception:
        logger.exception("worker loop failed")
        with contextlib.suppress(zmq.ZMQError):
            sock.send(m.encode(m.Goodbye(worker_id=args.worker_id, reason="engine failure")))
        sock.close(linger=1000)
        ctx.term()
        return 1
    logger.info("worker %s exiting (%s)", args.worker_id, reason)
    sock.close(linger=1000)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
