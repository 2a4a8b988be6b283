"""KV transfer throughput between two processes: bytes/s vs transfer size, per-page vs
collated, NIXL vs the ZMQ fallback — all side by side in one run.

A receiver process registers a KV pool and reports when each request's KV has landed (its
connector's `poll_received`); the sender writes N consecutive blocks into N consecutive
reserved blocks and times send -> landed with the system-wide monotonic clock both processes
share (time.perf_counter is CLOCK_MONOTONIC on Linux). "collated" sends one region per run of
consecutive blocks (here: one); "per-page" sends one region per block per layer, what a
per-layer paged layout forces (`connector.collated = False`).

    python benchmarks/bench_kv_transfer.py                 # Llama-3-8B-shaped blocks, bf16
    python benchmarks/bench_kv_transfer.py --blocks 1,8,64 --reps 3 --transports zmq
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import machine, table, write_result  # noqa: E402
from kvcache.transfer import KVLayout, create_connector  # noqa: E402

# Llama-3-8B: 32 layers, 8 KV heads of 128; 16-token blocks in bf16 = 2 MiB a block, 64 KiB a
# per-layer page (the page size the architecture notes measured on the H200).
LAYOUT = KVLayout("bench", "bfloat16", 16, 32, 8, 128)


def _shape(num_blocks: int) -> tuple[int, ...]:
    return (num_blocks, LAYOUT.num_layers, 2, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)


def _receiver(transport: str, num_blocks: int, q_out, q_in) -> None:
    kv = torch.zeros(_shape(num_blocks), dtype=torch.bfloat16)
    conn = create_connector(transport, "recv", kv, LAYOUT)
    q_out.put(conn.endpoint())
    conn.add_peer(q_in.get())
    q_out.put("ready")
    # Sleep in the socket (ZMQ) or briefly (NIXL has none): a spinning receiver would take a
    # core from the sender on a small machine.
    wakeup = conn.wakeup_socket
    while True:
        for a in conn.poll_received():
            landed = time.perf_counter()
            if a.request_id == "stop":
                conn.close()
                return
            q_out.put((a.request_id, landed))
        if wakeup is not None:
            wakeup.poll(100)
        else:
            time.sleep(0.00005)


def run_transport(transport: str, blocks: list[int], reps: int) -> list[dict]:
    num_blocks = max(blocks)
    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(transport, num_blocks, q_out, q_in), daemon=True)
    proc.start()
    rows = []
    try:
        kv = torch.randn(_shape(num_blocks)).to(torch.bfloat16)
        conn = create_connector(transport, "send", kv, LAYOUT)
        conn.add_peer(q_out.get(timeout=120))
        q_in.put(conn.endpoint())
        assert q_out.get(timeout=120) == "ready"
        n = 0
        for collated in (True, False):
            conn.collated = collated
            for size in blocks:
                src = list(range(size))
                times, sender_times, ndesc = [], [], 0
                for rep in range(reps + 1):  # the first one warms the path up
                    n += 1
                    rid = f"r{n}"
                    t0 = time.perf_counter()
                    conn.send(rid, src, "recv", src, b"")
                    results = conn.poll_sent()
                    while not results:
                        time.sleep(0.00005)
                        results = conn.poll_sent()
                    (res,) = results
                    assert res.ok, res.error
                    got_rid, landed = q_out.get(timeout=120)
                    assert got_rid == rid
                    if rep:
                        times.append(landed - t0)
                        sender_times.append(res.seconds)
                        ndesc = res.num_descriptors
                nbytes = size * LAYOUT.bytes_per_block
                med = statistics.median(times)
                rows.append(
                    {
                        "transport": transport,
                        "mode": "collated" if collated else "per-page",
                        "blocks": size,
                        "bytes": nbytes,
                        "descriptors": ndesc,
                        "median_s": med,
                        "sender_median_s": statistics.median(sender_times),
                        "gb_per_s": nbytes / med / 1e9,
                    }
                )
                print(
                    f"{transport:5} {rows[-1]['mode']:9} {size:4} blocks "
                    f"{nbytes / 2**20:7.1f} MiB {ndesc:5} desc  {med * 1e3:8.2f} ms  "
                    f"{rows[-1]['gb_per_s']:6.2f} GB/s",
                    flush=True,
                )
        conn.send("stop", [], "recv", [], b"")
        deadline = time.monotonic() + 30
        while not conn.poll_sent() and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.join(30)
        conn.close()
    finally:
        if proc.is_alive():
            proc.kill()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="1,4,16,64,256", help="transfer sizes, in blocks")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--transports", default="nixl,zmq")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    blocks = [int(x) for x in args.blocks.split(",")]
    rows = []
    for transport in args.transports.split(","):
        try:
            rows += run_transport(transport, blocks, args.reps)
        except ImportError as exc:
            print(f"{transport}: not available ({exc})")
    headers = ["transport", "mode", "blocks", "MiB", "descriptors", "median ms", "GB/s",
               "sender-side ms"]  # fmt: skip
    body = table(
        headers,
        [
            [r["transport"], r["mode"], r["blocks"], f"{r['bytes'] / 2**20:.1f}", r["descriptors"],
             f"{r['median_s'] * 1e3:.2f}", f"{r['gb_per_s']:.2f}", f"{r['sender_median_s'] * 1e3:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    print("\n" + body)
    if not args.no_save:
        note = (
            f"Blocks of {LAYOUT.bytes_per_block / 2**20:.0f} MiB ({LAYOUT.num_layers} layers x "
            f"{LAYOUT.bytes_per_block // LAYOUT.num_layers // 1024} KiB pages, Llama-3-8B shape, "
            f"bf16), DRAM to DRAM between two processes on one host; median of {args.reps} "
            "after one warm-up. Time = send() -> the receiver's connector reports the KV landed "
            "(shared monotonic clock); sender-side = send() -> the sender's connector reports "
            "the send done.\n\n"
        )
        tag = "".join(c if c.isalnum() else "-" for c in machine().split(",")[0]).strip("-").lower()
        path = write_result(f"kv-transfer-cpu{os.cpu_count()}-{tag}"[:80], note + body,
                            "python benchmarks/bench_kv_transfer.py " + " ".join(argv or sys.argv[1:]))  # fmt: skip
        print("results:", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
