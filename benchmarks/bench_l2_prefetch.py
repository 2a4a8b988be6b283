"""Does prefetching the next GEMM's weights into L2, beside the kernels that leave HBM idle,
shorten the batch-128 decode layer? (kernels/triton/l2_prefetch.py says why it might.)

The layer is the batch-128 decode graph's own kernel chain at ~1k context (Llama-3.1-8B shape):
add+RMSNorm, qkv (cuBLAS), RoPE + K/V store, paged attention (Triton, the tuned batch-128 tile),
o, add+RMSNorm, gate|up, SiLU·mul, down (cuBLASLt, as the BLAS plan picks at 128 rows), over
LAYERS distinct layers' weights and one ~560 MB KV cache, captured in one CUDA graph. A
prefetch runs on a forked stream of the same graph: it starts when the kernel it hides behind
starts and the main stream waits for it before the kernel whose weight it fetched.

Each variant is timed between two baseline runs and reported against their mean (A B A), so
drift on a shared machine shows as the baselines' spread.

    python benchmarks/bench_l2_prefetch.py [--rows 128] [--context 1064] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_gpu import copy_bandwidth  # noqa: E402
from benchmarks.common import table, write_result  # noqa: E402

HIDDEN, INTER, HQ, HKV, D, PAGE = 4096, 14336, 32, 8, 128, 16
QKV = (HQ + 2 * HKV) * D
LAYERS = 8
OPS = ("norm1", "qkv", "rope_store", "attention", "o", "norm2", "gate_up", "silu_mul", "down")
WEIGHT_OF = {"qkv": "qkv", "o": "o", "gate_up": "gate_up", "down": "down"}
MB = 1 << 20


@dataclass(frozen=True)
class Prefetch:
    """Fetch the first `mb` MiB of `weight` (of this layer, or the next with `next_layer`)
    on the side stream, forked when op `fork` starts and joined before op `join`."""

    fork: str
    join: str
    weight: str
    mb: int
    next_layer: bool = False


class Layer:
    def __init__(self, gen: torch.Generator) -> None:
        def w(n: int, k: int) -> torch.Tensor:
            return (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)

        self.w = {"qkv": w(QKV, HIDDEN), "o": w(HIDDEN, HQ * D), "gate_up": w(2 * INTER, HIDDEN),
                  "down": w(HIDDEN, INTER)}  # fmt: skip
        self.ln1 = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.ln2 = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)


class Chain:
    """The decode layer chain of `rows` sequences at `ctx` tokens, with optional prefetches."""

    def __init__(self, rows: int, ctx: int, attn_tile: tuple[int, int, int]) -> None:
        from server.models.rope import RotaryEmbedding

        gen = torch.Generator(device="cuda").manual_seed(0)
        self.layers = [Layer(gen) for _ in range(LAYERS)]
        pages = -(-(ctx + 1) // PAGE)
        blocks = rows * pages + 8
        self.cache = torch.randn(blocks, 1, 2, PAGE, HKV, D, generator=gen, device="cuda").to(torch.bfloat16)
        self.kv = self.cache[:, 0]
        perm = torch.randperm(blocks, generator=gen, device="cuda")[: rows * pages]
        self.tables = perm.view(rows, pages).to(torch.int32)
        self.seq_lens = torch.full((rows,), ctx + 1, dtype=torch.int32, device="cuda")
        self.qsl = torch.arange(rows + 1, dtype=torch.int32, device="cuda")
        self.positions = torch.full((rows,), ctx, dtype=torch.int64, device="cuda")
        slot_page = self.tables[:, ctx // PAGE].long()
        self.slots = slot_page * PAGE + ctx % PAGE
        self.rope = RotaryEmbedding(D, ctx + 16, 500000.0, None, torch.bfloat16).to("cuda")
        self.x = (torch.randn(rows, HIDDEN, generator=gen, device="cuda") * 0.1).to(torch.bfloat16)
        self.residual = torch.zeros_like(self.x)
        self.q_out = torch.empty(rows, HQ, D, device="cuda", dtype=torch.bfloat16)
        self.attn_out = torch.empty_like(self.q_out)
        self.attn_tile = attn_tile
        # Every kernel's input exists up front, so one kernel can be timed alone.
        self.h = torch.randn(rows, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
        self.qkv = torch.randn(rows, QKV, generator=gen, device="cuda").to(torch.bfloat16)
        self.gu = torch.randn(rows, 2 * INTER, generator=gen, device="cuda").to(torch.bfloat16)
        self.act = torch.randn(rows, INTER, generator=gen, device="cuda").to(torch.bfloat16)
        self.rows = rows
        self.side = torch.cuda.Stream()
        self._scratch: dict[str, torch.Tensor] = {}

    def scratch(self, mode: str) -> torch.Tensor:
        from kernels.triton.l2_prefetch import scratch_for

        if mode not in self._scratch:
            self._scratch[mode] = scratch_for(256 * MB, mode, "cuda")
        return self._scratch[mode]

    def run(self, ops: tuple[str, ...] = OPS, prefetches: tuple[Prefetch, ...] = (), mode: str = "bulk",
            evict_last: bool = False) -> None:  # fmt: skip
        from kernels.blas_plan import library
        from kernels.triton.l2_prefetch import l2_prefetch
        from kernels.triton.paged_attention import paged_attention
        from kernels.triton.rms_norm import add_rms_norm
        from kernels.triton.rope_store import rope_and_store
        from kernels.triton.silu_mul import silu_and_mul

        main = torch.cuda.current_stream()
        scratch = self.scratch(mode)
        x, res = self.x, self.residual
        h, qkv, a, gu, act = self.h, self.qkv, self.attn_out, self.gu, self.act
        pending = 0
        for li, layer in enumerate(self.layers):
            for op in ops:
                if op in [p.join for p in prefetches] and pending:
                    main.wait_stream(self.side)
                    pending = 0
                for p in prefetches:
                    if p.fork == op:
                        target = self.layers[(li + 1) % LAYERS] if p.next_layer else layer
                        self.side.wait_stream(main)
                        with torch.cuda.stream(self.side):
                            l2_prefetch(target.w[p.weight], p.mb * MB, scratch, mode, evict_last)
                        pending += 1
                if op == "norm1":
                    h, res = add_rms_norm(x, res, layer.ln1, 1e-5)
                elif op == "qkv":
                    qkv = torch.nn.functional.linear(h, layer.w["qkv"])
                elif op == "rope_store":
                    q, k, v = qkv.view(self.rows, -1, D).split([HQ, HKV, HKV], dim=1)
                    rope_and_store(q, k, v, self.positions, self.rope.cos, self.rope.sin_signed, self.kv,
                                   self.slots, out=self.q_out)  # fmt: skip
                elif op == "attention":
                    a = paged_attention(self.q_out, self.kv, self.tables, self.seq_lens, self.qsl, 1, D**-0.5,
                                        out=self.attn_out, config=self.attn_tile)  # fmt: skip
                elif op == "o":
                    x = torch.nn.functional.linear(a.view(self.rows, -1), layer.w["o"])
                elif op == "norm2":
                    h, res = add_rms_norm(x, res, layer.ln2, 1e-5)
                elif op == "gate_up":
                    gu = torch.nn.functional.linear(h, layer.w["gate_up"])
                elif op == "silu_mul":
                    act = silu_and_mul(gu)
                elif op == "down":
                    with library("cublaslt"):
                        x = torch.nn.functional.linear(act, layer.w["down"])
        if pending:
            main.wait_stream(self.side)


def layer_us(chain: Chain, **kw) -> float:
    from kernels.cuda_timing import graph_us

    return graph_us(lambda i: chain.run(**kw), 1, reps=20) / LAYERS


VARIANTS: list[tuple[str, tuple[Prefetch, ...]]] = [
    *[(f"o -> gate_up {mb} MiB", (Prefetch("o", "gate_up", "gate_up", mb),)) for mb in (8, 16, 24, 32)],
    *[(f"silu_mul -> down {mb} MiB", (Prefetch("silu_mul", "down", "down", mb),)) for mb in (4, 8, 16)],
    *[(f"down -> next qkv {mb} MiB", (Prefetch("down", "qkv", "qkv", mb, next_layer=True),)) for mb in (8, 16, 32)],
    *[(f"norm1 -> qkv {mb} MiB", (Prefetch("norm1", "qkv", "qkv", mb),)) for mb in (4, 8)],
    *[(f"qkv -> o {mb} MiB (through attention)", (Prefetch("qkv", "o", "o", mb),)) for mb in (16, 32)],
    *[(f"rope_store -> o {mb} MiB (through attention)", (Prefetch("rope_store", "o", "o", mb),)) for mb in (8, 16)],
]


def combos(best: dict[str, int]) -> list[tuple[str, tuple[Prefetch, ...]]]:
    """The best size of each hiding place, together."""
    parts = {
        "o": Prefetch("o", "gate_up", "gate_up", best["o"]),
        "silu_mul": Prefetch("silu_mul", "down", "down", best["silu_mul"]),
        "down": Prefetch("down", "qkv", "qkv", best["down"], next_layer=True),
    }
    return [
        ("o + silu_mul", (parts["o"], parts["silu_mul"])),
        ("o + silu_mul + down", tuple(parts.values())),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--context", type=int, default=1064)
    ap.add_argument("--attn-tile", default="16,2,3")
    ap.add_argument("--modes", default="bulk,bulk+evict_last,line,load",
                    help="prefetch modes to sweep: bulk, line, load, each optionally +evict_last")
    args = ap.parse_args()
    bw = copy_bandwidth()
    tile = tuple(int(v) for v in args.attn_tile.split(","))
    chain = Chain(args.rows, args.context, tile)  # type: ignore[arg-type]
    torch.cuda.synchronize()

    # What each kernel of the layer costs alone (same graph method), against its HBM bytes.
    kv_bytes = args.rows * (args.context + 1) * 2 * HKV * D * 2
    op_rows = []
    for op in OPS:
        us = layer_us(chain, ops=(op,))
        floor = {"attention": kv_bytes}.get(op, 0)
        if op in WEIGHT_OF:
            floor = chain.layers[0].w[WEIGHT_OF[op]].numel() * 2
        op_rows.append([op, f"{us:.1f}", f"{floor / bw * 1e6:.1f}" if floor else "-",
                        f"{us / (floor / bw * 1e6):.2f}x" if floor else "-"])  # fmt: skip
        print(op_rows[-1], flush=True)
    whole = layer_us(chain)
    op_sum = sum(float(r[1]) for r in op_rows)

    rows = []
    base_last = layer_us(chain)
    best_gain: dict[tuple[str, str], tuple[float, int]] = {}

    def variant(label: str, mode_name: str, prefetches: tuple[Prefetch, ...]) -> float:
        nonlocal base_last
        mode, _, flag = mode_name.partition("+")
        us = layer_us(chain, prefetches=prefetches, mode=mode, evict_last=flag == "evict_last")
        base_next = layer_us(chain)
        base = (base_last + base_next) / 2
        rows.append([label, mode_name, f"{us:.1f}", f"{base:.1f} ({base_last:.1f}, {base_next:.1f})",
                     f"{base / us:.3f}x", f"{base - us:+.1f}"])  # fmt: skip
        print(rows[-1], flush=True)
        base_last = base_next
        return base - us

    for mode_name in args.modes.split(","):
        for label, prefetches in VARIANTS:
            gain = variant(label, mode_name, prefetches)
            where = prefetches[0].fork
            if where in ("o", "silu_mul", "down") and gain > best_gain.get((mode_name, where), (-1e9, 0))[0]:
                best_gain[(mode_name, where)] = (gain, prefetches[0].mb)
        picks = {w: best_gain.get((mode_name, w), (0.0, 8))[1] for w in ("o", "silu_mul", "down")}
        for label, prefetches in combos(picks):
            variant(f"{label} ({', '.join(f'{p.mb}' for p in prefetches)} MiB)", mode_name, prefetches)

    head = (
        f"D2D copy {bw / 1e12:.2f} TB/s (read+write) measured in this run. Batch {args.rows} x "
        f"{args.context + 1} tokens, Llama-3.1-8B layer shapes, {LAYERS} layers' distinct weights in one "
        f"CUDA graph; attention tile {tile}.\n\n"
        f"Each kernel alone (us a layer; floor = its weight or KV bytes at the copy rate); the "
        f"whole chain runs {whole:.1f} us a layer against {op_sum:.1f} us for the kernels alone:\n\n"
        + table(["kernel", "us", "floor us", "vs floor"], op_rows)
        + "\n\nPrefetch variants (us a layer; baseline = mean of the runs just before and after):\n\n"
    )
    text = head + table(["prefetch", "mode", "us", "baseline us", "baseline / variant", "saved us"], rows)
    print(text)
    cmd = "python benchmarks/bench_l2_prefetch.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_result('l2-prefetch', text, cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
