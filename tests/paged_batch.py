"""Random paged-attention batches for kernel tests: decodes first, then prefill chunks with
or without cached context, blocks scattered over a block-major multi-layer cache."""

from __future__ import annotations

import torch

from kernels.attention.base import AttentionMetadata
from kvcache.layout import KVCacheSpec, allocate_kv_cache


def make_batch(
    query_lens: list[int],
    context_lens: list[int],
    block_size: int,
    num_blocks: int,
    device: torch.device,
    gen: torch.Generator,
) -> AttentionMetadata:
    """One sequence per (query_len, context_len): context tokens are already cached, the
    query tokens are this step's. Decodes (query_len 1) must come first."""
    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    need = sum(-(-s // block_size) for s in seq_lens)
    if need > num_blocks:
        raise ValueError(f"batch needs {need} blocks, cache has {num_blocks}")
    perm = torch.randperm(num_blocks, generator=gen, device=gen.device).tolist()
    tables, slots, starts = [], [], [0]
    for q, s in zip(query_lens, seq_lens, strict=True):
        n = -(-s // block_size)
        table, perm = perm[:n], perm[n:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
        starts.append(starts[-1] + q)
    width = max(len(t) for t in tables)
    num_decode = 0
    while num_decode < len(query_lens) and query_lens[num_decode] == 1:
        num_decode += 1
    return AttentionMetadata(
        num_seqs=len(query_lens),
        num_decode_seqs=num_decode,
        num_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
        query_start_loc_cpu=starts,
        block_size=block_size,
    )


def random_cache(
    num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device, gen: torch.Generator,
) -> torch.Tensor:
    """Block-major cache [blocks, layers, 2, block_size, Hkv, D] of random values (the cached
    context of every sequence)."""
    spec = KVCacheSpec(num_layers, num_kv_heads, head_dim, block_size, dtype)
    cache = allocate_kv_cache(spec, num_blocks, device)
    cache.copy_(torch.randn(cache.shape, generator=gen, device=device, dtype=torch.float32))
    return cache


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


# Relative-error bounds by output dtype (METHOD: bf16 operands land between 1e-3 and 1e-2).
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def poison_allocator(device: torch.device, nbytes: int = 64 << 20) -> None:
    """Leave NaN-filled blocks in the caching allocator, so outputs a kernel allocates with
    torch.empty start as NaN and any element it fails to write shows up."""
    blocks = [torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device) for _ in range(4)]
    del blocks
