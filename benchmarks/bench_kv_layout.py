"""Does the KV cache's memory layout cost the decode attention kernel time? Batch-128 decode
attention on a Llama-3.1-8B shape (32 query heads, 8 KV heads, head dim 128, 32 layers), the
Triton paged kernel with the engine's start-up tiles, timed per layer as a CUDA graph of 32
calls, over layouts of the same KV bytes:

- block-major (the engine's: [blocks, layers, 2, page, Hkv, D]; one layer's page every
  layers * 2 * page * Hkv * D * 2 bytes), small (just the blocks used) or big (a cache the size
  the engine sizes from free memory), tables sequential or a random permutation;
- layer-major ([layers, blocks, 2, page, Hkv, D]; one layer's pages are adjacent);
- block-major with 32- and 64-token pages;

and each layout again with a 128 x 4096 x 28672 GEMM (the gate|up projection) between the
attention calls, as in a step (time = graph with both - graph of GEMMs alone). Also the four
128-row linears of a layer as x @ W.T (the engine's) and as (W @ x.T).T, against the weight
read at the measured copy rate.

    python benchmarks/bench_kv_layout.py [--batch 128] [--context 1064] [--big-gib 40]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_decode_attention import read_bandwidth  # noqa: E402
from benchmarks.bench_gpu import copy_bandwidth  # noqa: E402
from benchmarks.common import graph_replay_us, table, write_result  # noqa: E402

LAYERS, HQ, HKV, D = 32, 32, 8, 128
TILES = ((32, 4, 2), (64, 4, 3))


def layout(kind: str, page: int, blocks: int) -> tuple[torch.Tensor, callable]:
    if kind == "block-major":
        cache = torch.zeros(blocks, LAYERS, 2, page, HKV, D, device="cuda", dtype=torch.bfloat16)
        return cache, lambda i: cache[:, i]
    cache = torch.zeros(LAYERS, blocks, 2, page, HKV, D, device="cuda", dtype=torch.bfloat16)
    return cache, lambda i: cache[i]


@torch.inference_mode()
def attention_rows(batch: int, ctx: int, big_gib: float) -> list[list[str]]:
    from kernels.triton.paged_attention import paged_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(28672, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(batch, 28672, device="cuda", dtype=torch.bfloat16)
    gemm_us = graph_replay_us(lambda: [torch.matmul(x, w.t(), out=y) for _ in range(LAYERS)], LAYERS)
    rows = []
    cases = [("block-major", 16, "small", "sequential"), ("block-major", 16, "big", "sequential"),
             ("block-major", 16, "big", "random"), ("block-major", 16, "small", "random"),
             ("layer-major", 16, "small", "sequential"), ("layer-major", 16, "small", "random"),
             ("layer-major", 16, "big", "random"),
             ("block-major", 32, "small", "random"), ("block-major", 64, "small", "random"),
             ("layer-major", 64, "small", "random")]
    for kind, page, size, order in cases:
        pages = -(-ctx // page)
        used = batch * pages
        per_block = LAYERS * 2 * page * HKV * D * 2
        blocks = max(used, int(big_gib * 2**30) // per_block) if size == "big" else used + 8
        cache, view = layout(kind, page, blocks)
        ids = torch.randperm(blocks, generator=gen)[:used] if order == "random" else torch.arange(used)
        tables = ids.to(torch.int32).view(batch, pages).cuda()
        for tile in TILES:
            def attend(i: int, view=view, tables=tables, tile=tile) -> None:
                paged_attention(q, view(i), tables, seq_lens, qsl, 1, D**-0.5, out=out, config=tile)

            alone = graph_replay_us(lambda attend=attend: [attend(i) for i in range(LAYERS)], LAYERS)
            mixed = graph_replay_us(lambda attend=attend: [(attend(i), torch.matmul(x, w.t(), out=y)) for i in range(LAYERS)],
                             LAYERS) - gemm_us
            rows.append([kind, page, f"{size} ({blocks * per_block / 2**30:.1f} GiB)", order, str(tile),
                         f"{alone:.1f}", f"{mixed:.1f}"])
            print(rows[-1], flush=True)
        del cache, view, attend
        gc.collect()
        torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def gemm_rows(batch: int, bw: float) -> list[list[str]]:
    rows = []
    for name, n, k in (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate|up", 28672, 4096), ("down", 4096, 14336)):
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]  # 8 copies: no L2 reuse
        ideal = n * k * 2 / bw * 1e6
        nt = graph_replay_us(lambda x=x, ws=ws: [x @ w.t() for w in ws], len(ws))
        tn = graph_replay_us(lambda x=x, ws=ws: [(w @ x.t()).t().contiguous() for w in ws], len(ws))
        tn_raw = graph_replay_us(lambda x=x, ws=ws: [w @ x.t() for w in ws], len(ws))
        rows.append([name, f"{batch}x{k} @ {k}x{n}", f"{ideal:.1f}", f"{nt:.1f} ({nt / ideal:.2f}x)",
                     f"{tn_raw:.1f} ({tn_raw / ideal:.2f}x)", f"{tn:.1f} ({tn / ideal:.2f}x)"])
        print(rows[-1], flush=True)
        del ws
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=1064)
    ap.add_argument("--big-gib", type=float, default=40.0)
    args = ap.parse_args()
    bw, read_bw = copy_bandwidth(), read_bandwidth()
    torch.cuda.empty_cache()
    kv_us = args.batch * args.context * 2 * HKV * D * 2 / read_bw * 1e6
    head = (f"D2D copy {bw / 1e12:.2f} TB/s (read+write), read {read_bw / 1e12:.2f} TB/s, measured in this run. "
            f"Batch {args.batch} x {args.context} tokens: a layer's KV at the read rate {kv_us:.1f} us.\n")
    att = table(["layout", "page", "cache", "tables", "tile", "us a layer", "us a layer between GEMMs"],
                attention_rows(args.batch, args.context, args.big_gib))
    gem = table(["linear", "shape", "weight read us", "x @ W.T us", "W @ x.T us", "(W @ x.T).T contiguous us"],
                gemm_rows(args.batch, bw))
    text = head + "\n" + att + "\n\n" + gem
    print(text)
    print(f"wrote {write_result('kv-layout', text, 'python benchmarks/bench_kv_layout.py ' + ' '.join(sys.argv[1:]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
