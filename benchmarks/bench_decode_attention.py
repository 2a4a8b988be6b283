"""Decode attention alone, per layer, on a Llama-3.1-8B shape (32 query heads, 8 KV heads, head
dim 128, 16-token pages, block-major cache of 32 layers), timed as the engine calls it: the
backend's `forward_rope` (rotate q and k, store k/v, attend). Side by side in one run, over
batch sizes and context lengths: rope_store + FlashInfer tensor-core decode (the baseline),
rope_store + FlashInfer CUDA-core decode, rope_store + the Triton paged kernel, the fused
one-launch split-KV kernel (kernels/triton/decode_attention.py) at fixed split counts, and the
FlashInfer backend with its defaults (the fused kernel up to PDSERVE_SPLIT_KV_DECODE_MAX_BATCH
sequences). Each variant is planned once, then 32 calls (one per layer) are captured in a CUDA
graph; time = graph replay / 32. Also the KV bytes each call must read at the measured D2D copy
rate and at the measured read rate (a Triton kernel that only reads, the ceiling of a kernel
like attention that reads far more than it writes), and the largest output difference from the
first variant. (2026-12-02-decode-attention.md and earlier
timed `forward`, store + attend without RoPE.)

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
from server.models.rope import RotaryEmbedding  # noqa: E402

LAYERS, HQ, HKV, D, PAGE = 32, 32, 8, 128, 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


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


class FusedDecode:
    """The fused kernel at a fixed split count, driven as a backend's forward_rope (the engine
    picks the split count from the SM count: `SplitKVWorkspace.splits_for`)."""

    def __init__(self, cache: torch.Tensor, batch: int, splits: int, config=None) -> None:
        from kernels.triton.decode_attention import SplitKVWorkspace

        self.cache, self.splits, self.config = cache, splits, config
        self.ws = SplitKVWorkspace(batch, HQ, HKV, D, cache.device, max_splits=splits)

    def plan_cuda_graph(self, meta: AttentionMetadata) -> None:
        self.meta = meta

    def forward_rope(self, layer: int, q, k, v, positions, rope) -> torch.Tensor:
        from kernels.triton.decode_attention import fused_decode_attention

        m = self.meta
        return fused_decode_attention(q, k, v, positions, rope.cos, rope.sin, self.cache[:, layer], m.slot_mapping,
                                      m.block_tables, m.seq_lens, D**-0.5, self.ws, num_splits=self.splits,
                                      config=self.config)


class XQADecode:
    """rope_store + FlashInfer's XQA decode kernel (TensorRT-LLM's, `xqa_batch_decode_with_kv_cache`;
    on sm90 with a bf16 cache its generic kernel), driven as a backend's forward_rope."""

    def __init__(self, cache: torch.Tensor) -> None:
        self.cache = cache
        self.workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=cache.device)  # zeroed: its semaphores

    def plan_cuda_graph(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        self.max_len = meta.block_tables.shape[1] * PAGE

    def forward_rope(self, layer: int, q, k, v, positions, rope) -> torch.Tensor:
        from flashinfer.decode import xqa_batch_decode_with_kv_cache

        from kernels.triton.rope_store import rope_and_store

        m, kv = self.meta, self.cache[:, layer]
        q = rope_and_store(q, k, v, positions, rope.cos, rope.sin, kv, m.slot_mapping)
        return xqa_batch_decode_with_kv_cache(q, kv, self.workspace, m.block_tables, m.seq_lens, self.max_len,
                                              bmm1_scale=D**-0.5)


def read_bandwidth() -> float:
    """Bytes/s of a Triton kernel that reads 4 GiB and writes one float per program."""
    import triton
    import triton.language as tl
    from triton.testing import do_bench

    @triton.jit
    def _read(x, out, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ITERS):
            acc += tl.load(x + base + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(out + tl.program_id(0), tl.sum(acc))

    n, block, iters = 1 << 31, 4096, 16  # 2 Gi bf16 elements, a multiple of block * iters
    x = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n // (block * iters), device="cuda")
    ms = do_bench(lambda: _read[(out.numel(),)](x, out, BLOCK=block, ITERS=iters, num_warps=8),
                  warmup=20, rep=200, return_mode="median")
    return n * 2 / (ms * 1e-3)


TRITON_DECODE_CONFIGS = [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2), (128, 8, 3), (64, 4, 4),
                         (16, 2, 3), (16, 2, 4), (32, 2, 2), (16, 4, 3)]


FUSED_CONFIGS = [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2)]
# the Triton paged kernel's best tiles at 64-128 sequences (2026-12-06-decode-attention-4.md)
FUSED_CONFIGS_LARGE = [(16, 2, 3), (16, 2, 4), (32, 2, 2)]


def variants(batch: int, sweep: bool = False, fused_sweep: bool = False):
    from kernels.attention.flashinfer_backend import FlashInferAttentionBackend
    from kernels.attention.triton_backend import TritonAttentionBackend

    fi = FlashInferAttentionBackend
    if fused_sweep:  # the fused split-KV kernel's split counts and tiles against FlashInfer
        out = {"rope_store + flashinfer tensor-core": lambda c: fi(c, HQ, HKV, D, cuda_core_decode_max_batch=0, split_kv_decode_max_batch=0),
               "rope_store + flashinfer xqa": XQADecode,
               "flashinfer backend, defaults": lambda c: fi(c, HQ, HKV, D)}
        programs = batch * HKV
        for splits in (1, 2, 4, 8, 16, 32, 64, 128):
            if not 128 <= programs * splits <= 1024 and not (programs >= 1024 and splits == 1):
                continue
            for cfg in FUSED_CONFIGS + (FUSED_CONFIGS_LARGE if programs >= 512 else []):
                out[f"fused, {splits} splits, {cfg}"] = lambda c, s=splits, cfg=cfg: FusedDecode(c, batch, s, cfg)
        if programs >= 512:  # large batches: against the Triton paged kernel the engine tunes
            for cfg in FUSED_CONFIGS_LARGE:
                out[f"rope_store + triton {cfg}"] = lambda c, cfg=cfg: TritonAttentionBackend(
                    c, HQ, HKV, D, split_kv_decode_max_batch=0, decode_config=cfg)
        return out
    if sweep:  # the Triton paged kernel's decode tiles against FlashInfer's tensor-core decode
        out = {"rope_store + flashinfer tensor-core": lambda c: fi(c, HQ, HKV, D, cuda_core_decode_max_batch=0, split_kv_decode_max_batch=0)}
        for cfg in TRITON_DECODE_CONFIGS:
            out[f"rope_store + triton {cfg}"] = lambda c, cfg=cfg: TritonAttentionBackend(
                c, HQ, HKV, D, split_kv_decode_max_batch=0, decode_config=cfg)
        out["flashinfer backend, defaults"] = lambda c: fi(c, HQ, HKV, D)
        out["rope_store + flashinfer xqa"] = XQADecode
        return out
    return {
        "rope_store + flashinfer tensor-core": lambda c: fi(c, HQ, HKV, D, cuda_core_decode_max_batch=0, split_kv_decode_max_batch=0),
        "rope_store + flashinfer cuda-core": lambda c: fi(c, HQ, HKV, D, cuda_core_decode_max_batch=1 << 20, split_kv_decode_max_batch=0),
        "rope_store + triton": lambda c: TritonAttentionBackend(c, HQ, HKV, D, split_kv_decode_max_batch=0),
        "fused split-KV, 4 splits": lambda c: FusedDecode(c, batch, 4),
        "fused split-KV, 8 splits": lambda c: FusedDecode(c, batch, 8),
        "fused split-KV, 16 splits": lambda c: FusedDecode(c, batch, 16),
        "fused split-KV, 32 splits": lambda c: FusedDecode(c, batch, 32),
        "flashinfer backend, defaults": lambda c: fi(c, HQ, HKV, D),
        "rope_store + flashinfer xqa": XQADecode,
    }  # fmt: skip


HEADERS = ["batch", "context", "variant", "us per layer", "KV read at copy rate us", "at read rate us", "max |diff|"]


@torch.inference_mode()
def time_variant(make, cache, meta, q, k, v, positions, rope) -> tuple[float, torch.Tensor]:
    from triton.testing import do_bench

    backend = make(cache)
    backend.plan_cuda_graph(meta)
    run = lambda: [backend.forward_rope(layer, q, k, v, positions, rope) for layer in range(LAYERS)]  # noqa: E731
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
    ap.add_argument("--triton-sweep", action="store_true",
                    help="FlashInfer tensor-core decode vs the Triton paged kernel's decode tiles "
                         "(BLOCK_N, warps, stages), and the FlashInfer backend's defaults")
    ap.add_argument("--fused-sweep", action="store_true",
                    help="the fused split-KV kernel's split counts and (BLOCK_N, warps, stages) tiles "
                         "against FlashInfer's tensor-core and XQA decode")
    ap.add_argument("--no-flashinfer", action="store_true",
                    help="leave out the FlashInfer variants (no FlashInfer JIT on a fresh machine)")
    args = ap.parse_args()
    bw, read_bw = copy_bandwidth(), read_bandwidth()
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
            # q/k/v as the model passes them: strided views of one fused qkv projection output.
            qkv = torch.randn(batch, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
            q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
            q, k, v = q.view(batch, HQ, D), k.view(batch, HKV, D), v.view(batch, HKV, D)
            rope = RotaryEmbedding(D, ctx + 1, 500000.0, LLAMA3_ROPE, torch.bfloat16).cuda()
            positions = meta.seq_lens.long() - 1
            floor_us = batch * ctx * per_token / LAYERS / bw * 1e6
            read_us = batch * ctx * per_token / LAYERS / read_bw * 1e6
            ref = None
            names = variants(batch, args.triton_sweep, args.fused_sweep)
            if args.no_flashinfer:
                names = {n: f for n, f in names.items() if "flashinfer" not in n}
            for name, make in names.items():
                try:
                    us, out = time_variant(make, cache, meta, q, k, v, positions, rope)
                except Exception as e:  # a variant this install cannot build: say so, go on
                    rows.append([batch, ctx, name, f"failed: {type(e).__name__}: {str(e)[:60]}", "", "", ""])
                    continue
                diff = 0.0 if ref is None else (out - ref).abs().max().item()
                ref = out if ref is None else ref
                rows.append([batch, ctx, name, f"{us:.1f}", f"{floor_us:.1f}", f"{read_us:.1f}", f"{diff:.3g}"])
            print(table(HEADERS, rows[-len(names):]), flush=True)
            del cache
            torch.cuda.empty_cache()
    out = table(HEADERS, rows)
    head = f"D2D copy {bw / 1e12:.2f} TB/s (read+write), read {read_bw / 1e12:.2f} TB/s, measured in this run.\n"
    print(head + out)
    print(f"wrote {write_result('decode-attention', head + chr(10) + out, 'python benchmarks/bench_decode_attention.py ' + ' '.join(sys.argv[1:]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
