"""Is it the access pattern or the arithmetic that keeps the batch-128 decode attention ~7%
above the KV read time? Pure reads (no attention math) of a decode batch's paged KV on the
engine's block-major cache (32 layers, 16-token pages, 8 KV heads x 128 dims, bf16), each layer
a call, 32 calls captured in one CUDA graph, side by side in one run with the Triton paged
attention kernel on the same tables:

- per head: one program per (KV head, sequence), KV heads fastest, reading one head's 256-byte
  K and V rows (2 KiB apart within a page), the paged attention kernel's pattern;
- per sequence: one program per (sequence, split), reading whole pages (32 KiB of K, then of V,
  contiguous), split into 1, 2 or 4 page ranges.

Against the plain read rate measured in the same run (a Triton kernel streaming 4 GiB).

    python benchmarks/bench_kv_read_pattern.py [--batch 128] [--context 1064]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_decode_attention import read_bandwidth  # noqa: E402
from benchmarks.common import graph_replay_us, table, write_result  # noqa: E402

LAYERS, HQ, HKV, D, PAGE = 32, 32, 8, 128, 16


@triton.jit
def _read_per_head(Cache, Tables, Out, ctx, stride_page, stride_kv, stride_entry, stride_head, stride_bt,
                   HKV: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    h = tl.program_id(0)
    s = tl.program_id(1)
    d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    row = Tables + s.to(tl.int64) * stride_bt
    for start in range(0, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        ok = n < ctx
        page = tl.load(row + n // PAGE, mask=ok, other=0).to(tl.int64)
        off = page * stride_page + (n % PAGE).to(tl.int64) * stride_entry + h * stride_head
        k = tl.load(Cache + off[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(Cache + stride_kv + off[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(Out + s * HKV + h, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _read_per_seq(Cache, Tables, Out, num_pages, pages_per_split, stride_page, stride_kv, stride_bt,
                  SPLITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    split = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, num_pages)
    row = Tables + s.to(tl.int64) * stride_bt
    cols = tl.arange(0, BLOCK)
    for p in range(first, last):
        base = Cache + tl.load(row + p).to(tl.int64) * stride_page
        for c in tl.static_range(0, CHUNK, BLOCK):
            acc += tl.load(base + c + cols).to(tl.float32) + tl.load(base + stride_kv + c + cols).to(tl.float32)
    tl.store(Out + s * SPLITS + split, tl.sum(acc, axis=0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=1064)
    args = ap.parse_args()
    from kernels.triton.paged_attention import paged_attention

    b, ctx = args.batch, args.context
    read_bw = read_bandwidth()
    torch.cuda.empty_cache()
    pages = -(-ctx // PAGE)
    blocks = b * pages + 8
    cache = torch.randn(blocks, LAYERS, 2, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tables = torch.randperm(blocks, generator=gen)[: b * pages].view(b, pages).to(torch.int32).cuda()
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16)
    att_out = torch.empty_like(q)
    out = torch.empty(b * 8, device="cuda")
    kv = cache[:, 0]
    sp, skv, se, sh = kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)
    floor_tok = b * ctx * 2 * HKV * D * 2 / read_bw * 1e6
    floor_page = b * pages * PAGE * 2 * HKV * D * 2 / read_bw * 1e6
    rows = []

    def add(name: str, fn, floor: float) -> None:
        us = graph_replay_us(lambda: [fn(cache[:, i]) for i in range(LAYERS)], LAYERS)
        rows.append([name, f"{us:.1f}", f"{floor:.1f}", f"{us / floor:.3f}x"])
        print(rows[-1], flush=True)

    for tile in ((16, 2, 3), (64, 4, 3)):
        add(f"paged attention {tile}", lambda kv, tile=tile: paged_attention(
            q, kv, tables, seq_lens, qsl, 1, D**-0.5, out=att_out, config=tile), floor_tok)
    for block_n, warps, stages in ((16, 2, 3), (32, 4, 3), (64, 4, 3), (64, 8, 4)):
        add(f"read per head, BLOCK_N {block_n}, {warps} warps, {stages} stages",
            lambda kv, c=(block_n, warps, stages): _read_per_head[(HKV, b)](
                kv, tables, out, ctx, sp, skv, se, sh, tables.stride(0),
                HKV=HKV, PAGE=PAGE, BLOCK_N=c[0], D=D, num_warps=c[1], num_stages=c[2]), floor_tok)
    chunk = PAGE * HKV * D
    for splits in (1, 2, 4):
        for block, warps, stages in ((2048, 4, 3), (4096, 8, 3)):
            per = -(-pages // splits)
            add(f"read per sequence, {splits} split(s), BLOCK {block}, {warps} warps, {stages} stages",
                lambda kv, s=splits, c=(block, warps, stages), per=per: _read_per_seq[(b, s)](
                    kv, tables, out, pages, per, sp, skv, tables.stride(0),
                    SPLITS=s, CHUNK=chunk, BLOCK=c[0], num_warps=c[1], num_stages=c[2]), floor_page)
    head = (f"Read rate {read_bw / 1e12:.2f} TB/s measured in this run (a Triton kernel streaming 4 GiB). Batch {b} x {ctx} "
            f"tokens, random page tables over a cache of just those pages. Floors: the KV of {ctx} tokens ({floor_tok:.1f} us a "
            f"layer; per-head reads and attention) or of {pages} whole pages ({floor_page:.1f} us; per-sequence reads) at the "
            "read rate.\n")
    text = head + "\n" + table(["kernel", "us a layer", "floor us", "vs floor"], rows)
    print(text)
    cmd = "python benchmarks/bench_kv_read_pattern.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_result('kv-read-pattern', text, cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
