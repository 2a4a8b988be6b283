"""Size the KV cache from free GPU memory (`--gpu-memory-utilization`), after the weights are
loaded and a warm-up forward of `max_num_batched_tokens` tokens has shown the activations' peak.

budget = min(utilization * total - (this process's memory: its allocator's reservations plus
                                    a CUDA-context allowance),
             free memory now)
         - (activation + sampler peak of the warm-up step) - reserve (CUDA graphs, workspaces)

`utilization` is this process's share of the GPU, so other processes' memory does not come off
it -- it only caps the budget through what is free. (Counting every process's memory, two
workers sharing a GPU with 0.45 each failed at start whenever one profiled after the other had
taken its KV cache: 2026-11-22, H200.)
"""

from __future__ import annotations

import gc
import logging

import torch

from kernels.attention.base import AttentionBackend, AttentionMetadata
from kvcache.layout import KVCacheSpec, allocate_kv_cache
from server.engine.sampler import Sampler, SamplingRow
from server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# CUDA-graph pools, per-bucket attention wrappers and allocator fragmentation.
RESERVE_BYTES = 1 << 30
# This process's memory outside PyTorch's allocator: CUDA context, cuBLAS / NCCL handles.
CONTEXT_BYTES = 1 << 30


def kv_budget(
    total: int, free: int, own_reserved: int, peak: int, utilization: float,
    reserve: int = RESERVE_BYTES, context: int = CONTEXT_BYTES,
) -> int:  # fmt: skip
    """The KV cache's bytes: this process's share of the GPU less what it already holds, never
    more than is free, less the warm-up peak and the reserve (negative: nothing fits)."""
    share = int(total * utilization) - own_reserved - context
    return min(share, free) - peak - reserve


@torch.inference_mode()
def profile_kv_cache_bytes(
    model: torch.nn.Module,
    backend_cls: type[AttentionBackend],
    spec: KVCacheSpec,
    num_heads: int,
    vocab_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    utilization: float,
    device: torch.device,
    extra_reserve: int = 0,
) -> int:
    """Bytes the KV cache may take. Runs one full-size prefill step (one sequence of
    min(max_num_batched_tokens, max_model_len) tokens through the chosen backend, logits and a
    top-p sampling of max_num_seqs rows) on a scratch cache and measures its peak.
    extra_reserve: bytes on top of RESERVE_BYTES that will stay allocated (CUDA graphs' outputs)."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    t = max(1, min(max_num_batched_tokens, max_model_len))
    bs = spec.block_size
    nblk = -(-t // bs)
    scratch = allocate_kv_cache(spec, nblk, device)
    attn = backend_cls(scratch, num_heads, spec.num_kv_heads, spec.head_dim)
    attn.plan(
        AttentionMetadata(
            num_seqs=1, num_decode_seqs=0, num_tokens=t,
            query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([t], dtype=torch.int32, device=device),
            block_tables=torch.arange(nblk, dtype=torch.int32, device=device)[None],
            slot_mapping=torch.arange(t, dtype=torch.int64, device=device),
            query_lens_cpu=[t], seq_lens_cpu=[t], query_start_loc_cpu=[0, t], block_size=bs,
        )
    )
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    ids = torch.randint(0, vocab_size, (t,), device=device, generator=gen)
    hidden = model(ids, torch.arange(t, device=device), attn)
    rows = min(max_num_seqs, t)
    logits = model.compute_logits(hidden[-rows:])
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
    Sampler(seed=0)(logits, [SamplingRow(params, (), ())] * rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del scratch, attn, ids, hidden, logits
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    budget = kv_budget(total, free, torch.cuda.memory_reserved(device), peak, utilization,
                       reserve=RESERVE_BYTES + extra_reserve)
    log.info(
        "GPU memory: %.1f GiB total, %.1f GiB in use (all processes), warm-up peak %.2f GiB "
        "for %d tokens; KV cache gets %.1f GiB at utilization %.2f",
        total / 2**30, in_use / 2**30, peak / 2**30, t, max(budget, 0) / 2**30, utilization,
    )
    if budget < spec.bytes_per_block:
        raise ValueError(
            f"no GPU memory left for the KV cache at gpu_memory_utilization {utilization} "
            f"({in_use / 2**30:.1f} GiB in use, warm-up peak {peak / 2**30:.2f} GiB of "
            f"{total / 2**30:.1f} GiB); raise it, or lower max_num_batched_tokens"
        )
    return budget
