"""KV handoff between two processes on one GPU through the pdserve KV connectors (NIXL over
UCX, VRAM -> VRAM), against a plain device copy of the same bytes measured in the same run.

Two spawned processes, a "prefill" sender and a "decode" receiver, each hold a block-major KV
tensor [blocks, layers, 2, block_size, kv_heads, head_dim] of the Llama-3.1-8B shape (32 layers,
8 KV heads, head_dim 128, block 16, bf16: 2 MiB per block) on the same device, registered with
`kvcache.transfer.create_connector`. The sender writes a 2k-token prompt's 128 blocks (256 MiB):

  - contiguous: a run of 128 block ids on both sides          -> 1 region (collated);
  - fragmented: 64 runs of 2 blocks (an allocator's holes)    -> 64 regions (collated);
  - per page:   `connector.collated = False` (the baseline)   -> 128 x 32 regions of 64 KiB;

then a size sweep (collated and per page). Times, medians over `--iters` after `--warmup`:
  send -> done:    `send()` until the sender's `poll_sent` reports the transfer finished;
  send -> arrival: `send()` until the receiver's `poll_received` returns the request (both read
                   the same monotonic clock, `time.perf_counter`, so the difference is exact);
  copy:            `dst.copy_(src)` of the same number of bytes, one contiguous device copy in
                   the sender process, wall clock with a device sync (what the handoff must beat).
Every case is checked byte for byte: the receiver regenerates the sender's pattern and compares
each destination block with its source block; blocks outside the destination must keep the
poison written before the case.

UCX picks its transports from the environment: each `--ucx-tls` value runs in a fresh process
pair with UCX_TLS set to it ("default" leaves UCX_TLS unset; seen on an H200: UCX then takes
`cuda_ipc` for the data and `tcp` for the notification; `cuda_ipc,cuda_copy,tcp` is the same;
without `tcp` the agent cannot be created). Each pair first runs an untimed warm-up case.
`--zmq-mib` adds the ZMQ fallback (GPU -> host staging -> TCP -> GPU) at one size.

    python benchmarks/bench_gpu_nixl.py [--ucx-tls default cuda_ipc,cuda_copy,tcp] [--iters 20]
    python benchmarks/bench_gpu_nixl.py --device cpu --sizes 16 --iters 5 --no-save  # DRAM check
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import machine, table, write_result  # noqa: E402
from kvcache.transfer import KVLayout, create_connector  # noqa: E402

LAYOUT = KVLayout(
    model="llama-3.1-8b",
    dtype="bfloat16",
    block_size=16,
    num_layers=32,
    num_kv_heads=8,
    head_dim=128,
)
BPB = LAYOUT.bytes_per_block  # 32 * 2 * 16 * 8 * 128 * 2 B = 2 MiB
MIB = 1 << 20
POISON = -21846  # int16 0xAAAA, written over the receiver's cache before every case
SEED = 1234


@dataclasses.dataclass
class Case:
    name: str
    src: list[int]
    dst: list[int]
    collated: bool
    iters: int
    warmup: int

    @property
    def nbytes(self) -> int:
        return len(self.src) * BPB


@dataclasses.dataclass
class Job:
    """What one process pair runs."""

    transport: str
    device: str
    num_blocks: int
    cases: list[Case]
    timeout: float = 30.0  # seconds any one step may take before the pair gives up


def kv_shape(num_blocks: int) -> tuple[int, ...]:
    return (
        num_blocks,
        LAYOUT.num_layers,
        2,
        LAYOUT.block_size,
        LAYOUT.num_kv_heads,
        LAYOUT.head_dim,
    )


def pattern(num_blocks: int, device: torch.device) -> torch.Tensor:
    """Random bits (every bf16 bit pattern, NaNs too: compared as int16), the same in every
    process for the same seed, shape and device type."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    bits = torch.randint(
        -32768, 32768, kv_shape(num_blocks), dtype=torch.int16, device=device, generator=gen
    )
    return bits.view(torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _get(q, what: str, timeout: float):
    msg = q.get(timeout=timeout)
    if msg[0] == "error":
        raise RuntimeError(f"peer failed: {msg[1]}")
    if msg[0] != what:
        raise RuntimeError(f"expected {what!r} from the peer, got {msg[0]!r}")
    return msg


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def receiver(job: Job, inbox, outbox) -> None:
    try:
        dev = torch.device(job.device)
        kv = torch.empty(kv_shape(job.num_blocks), dtype=torch.bfloat16, device=dev)
        conn = create_connector(job.transport, "decode-0", kv, LAYOUT)
        outbox.put(("endpoint", conn.endpoint()))
        conn.add_peer(_get(inbox, "endpoint", max(job.timeout, 180.0))[1])
        expected = pattern(job.num_blocks, dev).view(torch.int16)
        mine = kv.view(torch.int16)
        for case in job.cases:
            _get(inbox, "case", job.timeout)
            mine.fill_(POISON)
            sync(dev)
            outbox.put(("ready",))
            for _ in range(case.warmup + case.iters):
                deadline = time.monotonic() + job.timeout
                arrivals: list = []
                while not arrivals:
                    arrivals = conn.poll_received()
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{case.name}: nothing arrived in {job.timeout:.0f} s")
                t = time.perf_counter()
                outbox.put(("arrived", arrivals[0].request_id, t))
            sync(dev)
            exact = all(
                torch.equal(mine[d], expected[s]) for s, d in zip(case.src, case.dst, strict=True)
            )
            rest = sorted(set(range(job.num_blocks)) - set(case.dst))
            untouched = bool((mine[rest] == POISON).all()) if rest else True
            outbox.put(("verified", exact, untouched))
        _get(inbox, "stop", job.timeout)
        conn.close()
    except BaseException as exc:  # report, then die: the sender must not wait for its timeout
        outbox.put(("error", f"receiver: {exc!r}\n{traceback.format_exc()}"))
        raise


def sender(job: Job, inbox, outbox, results) -> None:
    peer = None
    try:
        dev = torch.device(job.device)
        kv = pattern(job.num_blocks, dev)
        conn = create_connector(job.transport, "prefill-0", kv, LAYOUT)
        conn.add_peer(_get(inbox, "endpoint", max(job.timeout, 180.0))[1])
        outbox.put(("endpoint", conn.endpoint()))
        peer = True
        flat = kv.view(-1).view(torch.uint8)
        scratch = torch.empty(max(c.nbytes for c in job.cases), dtype=torch.uint8, device=dev)
        for case in job.cases:
            conn.collated = case.collated
            outbox.put(("case",))
            _get(inbox, "ready", job.timeout)
            done, arrival, ndesc, errors = [], [], 0, []
            for i in range(case.warmup + case.iters):
                rid = f"{case.name}-{i}"
                t0 = time.perf_counter()
                conn.send(rid, case.src, "decode-0", case.dst, b"first-token")
                deadline = time.monotonic() + job.timeout
                sent: list = []
                while not sent:
                    sent = conn.poll_sent()
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{case.name}: send not finished in {job.timeout:.0f} s")
                t1 = time.perf_counter()
                if not sent[0].ok:
                    errors.append(sent[0].error)
                    raise RuntimeError(f"{case.name}: send failed: {sent[0].error}")
                ndesc = sent[0].num_descriptors
                _, got, t_arr = _get(inbox, "arrived", job.timeout)
                if got != rid:
                    raise RuntimeError(f"arrival {got!r} while waiting for {rid!r}")
                if i >= case.warmup:
                    done.append(t1 - t0)
                    arrival.append(t_arr - t0)
            _, exact, untouched = _get(inbox, "verified", job.timeout)
            # The reference: one device copy of the same number of bytes, same process.
            src, dst = flat[: case.nbytes], scratch[: case.nbytes]
            copies = []
            for i in range(case.warmup + case.iters):
                sync(dev)
                t0 = time.perf_counter()
                dst.copy_(src)
                sync(dev)
                if i >= case.warmup:
                    copies.append(time.perf_counter() - t0)
            results.put(
                {
                    "case": case.name,
                    "transport": job.transport,
                    "collated": case.collated,
                    "nbytes": case.nbytes,
                    "regions": ndesc,
                    "done_s": statistics.median(done),
                    "arrival_s": statistics.median(arrival),
                    "arrival_p10_s": quantile(arrival, 0.1),
                    "arrival_p90_s": quantile(arrival, 0.9),
                    "copy_s": statistics.median(copies),
                    "exact": bool(exact),
                    "untouched": bool(untouched),
                    "iters": case.iters,
                }
            )
        outbox.put(("stop",))
        conn.close()
    except BaseException as exc:
        results.put({"error": f"{exc!r}\n{traceback.format_exc()}"})
        if peer:
            outbox.put(("stop",))
    finally:
        results.put(None)


def run_job(job: Job, env: dict[str, str | None]) -> list[dict]:
    """One process pair with `env` applied (None: unset), the results of its cases."""
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    to_recv, to_send, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    try:
        recv = ctx.Process(target=receiver, args=(job, to_recv, to_send), daemon=True)
        send = ctx.Process(target=sender, args=(job, to_send, to_recv, results), daemon=True)
        recv.start()
        send.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = []
    deadline = time.monotonic() + 120 + job.timeout * (2 + len(job.cases))
    while time.monotonic() < deadline:
        try:
            r = results.get(timeout=5.0)
        except Exception:  # queue.Empty
            if not send.is_alive():
                out.append({"error": f"sender exited with {send.exitcode}"})
                break
            continue
        if r is None:
            break
        out.append(r)
    else:
        out.append({"error": "timed out"})
    for p in (send, recv):
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()
    return out


def fragmented(n: int, run: int, start: int = 0) -> list[int]:
    """n block ids in runs of `run` with one-run gaps: [0,1, 4,5, 8,9, ...] for run 2."""
    return [start + 2 * run * (i // run) + i % run for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--sizes", type=int, nargs="*", default=[16, 64, 256, 1024], help="MiB")
    ap.add_argument(
        "--ucx-tls",
        nargs="+",
        default=["default"],
        help='UCX_TLS values, one process pair each ("default": unset)',
    )
    ap.add_argument(
        "--ucx-proto-info",
        action="store_true",
        help="UCX_PROTO_INFO=y for the first configuration (UCX prints its choices)",
    )
    ap.add_argument("--zmq-mib", type=int, default=256, help="ZMQ fallback size (0: skip)")
    ap.add_argument("--zmq-iters", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per transfer step")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    n_prompt = -(-args.prompt_tokens // LAYOUT.block_size)
    largest = max([n_prompt, *(s * MIB // BPB for s in args.sizes)])
    num_blocks = max(2 * largest + 8, 4 * n_prompt + 8)
    it = dict(iters=args.iters, warmup=args.warmup)
    contig_src = list(range(n_prompt))
    contig_dst = list(range(n_prompt, 2 * n_prompt))
    main_cases = [
        Case(f"{args.prompt_tokens}-tok contiguous", contig_src, contig_dst, True, **it),
        Case(
            f"{args.prompt_tokens}-tok fragmented (runs of 2)",
            fragmented(n_prompt, 2),
            fragmented(n_prompt, 2, start=1 + 2 * n_prompt),
            True,
            **it,
        ),
        Case(f"{args.prompt_tokens}-tok per page", contig_src, contig_dst, False, **it),
    ]
    sweep = []
    for mib in args.sizes:
        n = mib * MIB // BPB
        for collated in (True, False):
            label = "collated" if collated else "per page"
            sweep.append(
                Case(f"{mib} MiB {label}", list(range(n)), list(range(n, 2 * n)), collated, **it)
            )
    print(
        f"machine: {machine()}; {BPB / MIB:.0f} MiB per block, {num_blocks} blocks "
        f"({num_blocks * BPB / 2**30:.2f} GiB) per process",
        flush=True,
    )

    configs: list[tuple[str, list[dict]]] = []
    swept = False
    for i, tls in enumerate(args.ucx_tls):
        env: dict[str, str | None] = {"UCX_TLS": None if tls == "default" else tls}
        if args.ucx_proto_info and i == 0:
            env["UCX_PROTO_INFO"] = "y"
        cases = main_cases + ([] if swept else sweep)
        t0 = time.perf_counter()
        # An unreported first case takes the one-time costs (endpoint lanes, IPC mappings).
        warm = dataclasses.replace(main_cases[1], name="warm-up", iters=10, warmup=0)
        res = run_job(Job("nixl", args.device, num_blocks, [warm, *cases], args.timeout), env)
        res = [r for r in res if r.get("case") != "warm-up"]
        ok = len(res) == len(cases) and all(
            "error" not in r and r["exact"] and r["untouched"] for r in res
        )
        swept = swept or (ok and bool(sweep))
        print(
            f"UCX_TLS={tls}: {len(res)} results in {time.perf_counter() - t0:.1f} s, "
            f"{'all exact' if ok else 'FAILED'}",
            flush=True,
        )
        for r in res:
            if "error" in r:
                print("  error:", r["error"], flush=True)
        configs.append((tls, res))
    zmq_res: list[dict] = []
    if args.zmq_mib:
        n = args.zmq_mib * MIB // BPB
        case = Case(
            f"{args.zmq_mib} MiB collated",
            list(range(n)),
            list(range(n, 2 * n)),
            True,
            iters=args.zmq_iters,
            warmup=1,
        )
        zmq_res = run_job(Job("zmq", args.device, num_blocks, [case], args.timeout), {})
        for r in zmq_res:
            if "error" in r:
                print("  zmq error:", r["error"], flush=True)

    def row(label: str, r: dict) -> list[object]:
        if "error" in r:
            return [label, r.get("case", "?"), "", "", "", "", "", "", "", "", "ERROR"]
        return [
            label,
            r["case"],
            r["regions"],
            f"{r['nbytes'] / MIB:.0f}",
            f"{r['copy_s'] * 1e6:.0f}",
            f"{r['done_s'] * 1e6:.0f}",
            f"{r['arrival_s'] * 1e6:.0f}",
            f"{r['arrival_p10_s'] * 1e6:.0f}-{r['arrival_p90_s'] * 1e6:.0f}",
            f"{r['arrival_s'] / r['copy_s']:.2f}x",
            f"{r['nbytes'] / r['arrival_s'] / 1e9:.1f}",
            "yes" if r["exact"] and r["untouched"] else "NO",
        ]

    headers = [
        "transport",
        "case",
        "regions",
        "MiB",
        "copy us",
        "send->done us",
        "send->arrival us",
        "p10-p90 us",
        "arrival / copy",
        "GB/s",
        "exact",
    ]
    rows = []
    for tls, res in configs:
        for r in res:
            rows.append(row(f"nixl UCX_TLS={tls}", r))
    for r in zmq_res:
        rows.append(row("zmq", r))
    out = table(headers, rows)
    head = (
        f"Two processes on {args.device}, KV of the Llama-3.1-8B shape (32 layers, 8 KV heads, "
        f"head_dim 128, block 16, bf16 = {BPB / MIB:.0f} MiB per block), "
        f"{args.prompt_tokens}-token prompt = {n_prompt} blocks = {n_prompt * BPB / MIB:.0f} MiB.\n"
        f"Medians of {args.iters} transfers after {args.warmup} warm-ups; copy = one "
        f"`dst.copy_(src)` of the same bytes in the sender process (wall clock, synced). "
        f"Target: send->arrival <= 1.5x copy.\n"
    )
    print()
    print(head)
    print(out, flush=True)
    if not args.no_save:
        path = write_result(
            "gpu-nixl-handoff",
            head + "\n" + out,
            "python benchmarks/bench_gpu_nixl.py " + " ".join(sys.argv[1:]),
        )
        print(f"\nwrote {path}")

    def all_ok(res: list[dict]) -> bool:
        return bool(res) and all("error" not in r and r["exact"] and r["untouched"] for r in res)

    return 0 if any(all_ok(res) for _, res in configs) else 1


if __name__ == "__main__":
    sys.exit(main())
