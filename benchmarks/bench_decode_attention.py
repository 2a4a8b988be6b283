"""Decode attention alone, per layer, on a Llama-3.1-8B shape (32 query heads, 8 KV heads, head
dim 128, 16-token pages, block-major cache of 32 layers): FlashInfer tensor-core decode (the
default backend), FlashInfer CUDA-core decode, the Triton kernel, and the Triton split-KV decode
kernel (kernels/triton/decode_attention.py, not used by the engine yet), side by side in one run,
over batch sizes and context lengths. Each variant runs as the engine runs it: planned once,
then 32 calls (one per layer) captured in a CUDA graph; time = graph replay / 32. Also the KV
bytes each call must read at the measured D2D copy rate, and the largest output difference from
the first variant.

    python benchmarks/bench_decode_attention.py [--batches 1,8,64] [--contexts 256,2048,8192]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_gpu import copy_bandwidth  # noqa: E402
from benchmarks.common import table, write_result  # noqa: E402
from kernels.attention.base import AttentionMetadata  # noqa: E402

LAYERS, HQ, HKV, D, PAGE = 32, 32, 8, 128, 16


def metadata(batch: int, ctx: int, num_blocks: int, gen: torch.Generator) -> AttentionMetadata:
    pages = -(-ctx // PAGE)
    perm = torch.randperm(num_blocks, generator=gen)[: batch * pages].view(batch, pages)
    tables = perm.to(torch.int32).cuda()
    pos = ctx - 1
    slots = (perm[:, pos // PAGE] * PAGE + pos % PAGE).cuda()
    return AttentionMetadata(
        num_seqs=batch, num_decode_seqs=batch, num_tokens=batch,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
        block_tables=tables, slot_mapping=slots,
        query_lens_cpu=[1] * batch, seq_lens_cpu=[ctx] * batch,
        query_start_loc_cpu=list(range(batch + 1)), block_size=PAGE,
    )  # fmt: skip


class SplitKVDecode:
    """kernels/triton/decode_attention.py driven as the engine drives a backend here (store this
    step's K/V with the Triton store kernel, then attend); not an engine backend (yet)."""

    def __init__(self, cache: torch.Tensor, chunk: int) -> None:
        self.cache, self.chunk = cache, chunk

    def plan_cuda_graph(self, meta: AttentionMetadata) -> None:
        self.meta = meta

    def forward(self, layer: int, q, k, v) -> torch.Tensor:
        from kernels.triton.decode_attention import decode_attention
        from kernels.triton.rope_store import store_kv

        m, view = self.meta, self.cache[:, layer]
        store_kv(k, v, view, m.slot_mapping)
        return decode_attention(q, view, m.block_tables, m.seq_lens, max(m.seq_lens_cpu), D**-0.5, self.chunk)


def variants():
    from kernels.attention.flashinfer_backend import FlashInferAttentionBackend
    from kernels.attention.triton_backend import TritonAttentionBackend

    return {
        "flashinfer tensor-core": lambda c: FlashInferAttentionBackend(c, HQ, HKV, D, cuda_core_decode_max_batch=0),
        "flashinfer cuda-core": lambda c: FlashInferAttentionBackend(c, HQ, HKV, D, cuda_core_decode_max_batch=1 << 20),
        "triton": lambda c: TritonAttentionBackend(c, HQ, HKV, D),
        "triton split-KV, 64-key splits": lambda c: SplitKVDecode(c, 64),
        "triton split-KV, 256-key splits": lambda c: SplitKVDecode(c, 256),
    }


@torch.inference_mode()
def time_variant(make, cache, meta, q, k, v) -> tuple[float, torch.Tensor]:
    from triton.testing import do_bench

    backend = make(cache)
    backend.plan_cuda_graph(meta)
    run = lambda: [backend.forward(layer, q, k, v) for layer in range(LAYERS)]  # noqa: E731
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    ms = do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    return ms * 1e3 / LAYERS, outs[0].reshape(q.shape[0], -1).float().clone()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--contexts", default="256,2048,8192")
    ap.add_argument("--max-cache-gib", type=float, default=40.0)
    args = ap.parse_args()
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    per_token = LAYERS * 2 * HKV * D * 2  # bf16 bytes of one token's K and V, all layers
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            blocks = batch * -(-ctx // PAGE) + 8
            if blocks * PAGE * per_token > args.max_cache_gib * 2**30:
                continue
            cache = torch.randn(blocks, LAYERS, 2, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
            meta = metadata(batch, ctx, blocks, gen)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, HKV, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(batch, HKV, D, device="cuda", dtype=torch.bfloat16)
            floor_us = batch * ctx * per_token / LAYERS / bw * 1e6
            ref = None
            names = variants()
            for name, make in names.items():
                try:
                    us, out = time_variant(make, cache, meta, q, k, v)
                except Exception as e:  # a variant this install cannot build: say so, go on
                    rows.append([batch, ctx, name, f"failed: {type(e).__name__}: {str(e)[:60]}", "", ""])
                    continue
                diff = 0.0 if ref is None else (out - ref).abs().max().item()
                ref = out if ref is None else ref
                rows.append([batch, ctx, name, f"{us:.1f}", f"{floor_us:.1f}", f"{diff:.3g}"])
            print(table(["batch", "context", "variant", "us per layer", "KV read at copy rate us", "max |diff|"], rows[-len(names):]), flush=True)
            del cache
            torch.cuda.empty_cache()
    out = table(["batch", "context", "variant", "us per layer", "KV read at copy rate us", "max |diff|"], rows)
    head = f"D2D copy {bw / 1e12:.2f} TB/s (read+write) measured in this run.\n"
    print(head + out)
    print(f"wrote {write_result('decode-attention', head + chr(10) + out, 'python benchmarks/bench_decode_attention.py ' + ' '.join(sys.argv[1:]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
