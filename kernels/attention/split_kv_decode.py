"""The small-decode-batch path that the FlashInfer and Triton backends share: a pure-decode
step of at most `max_batch` sequences runs `forward_rope` as ONE Triton kernel per layer
(RoPE + K/V store + split-KV attention + merge, kernels/triton/decode_attention.py) instead of
rope_store followed by the backend's attention kernels.

CUDA-graph safe: the decision is made in `applies` from host ints that a graph's static
metadata never changes (num_seqs, all query lengths 1); the kernel reads only the metadata's
device tensors, the model's positions and rope tables, and the workspace allocated here once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels.attention.base import AttentionMetadata

if TYPE_CHECKING:
    from server.models.rope import RotaryEmbedding


# About two programs per SM: measured on an H100 over batches 1-32 and contexts 256-8192
# (benchmarks/results/2026-12-06-decode-attention-5.md), the fused kernel's (64, 4, 2) tile at
# this split count was within 1.2x of the best split count and tile of each shape; four
# programs per SM lost up to 1.45x (batch 1 at 8k tokens: a 64-way merge).
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64


def split_count(num_seqs: int, num_kv_heads: int, sm_count: int, cap: int = MAX_SPLITS) -> int:
    """Splits per (sequence, KV head) of a fused decode launch over `num_seqs` sequences: the
    largest power of two p with num_seqs * num_kv_heads * p <= PROGRAMS_PER_SM * sm_count, at
    least 1, at most `cap` and MAX_SPLITS (32 at batch 1, 4 at batch 8, 1 from batch 24 for 8 KV
    heads on a 132-SM H100). Each sequence uses only the splits its length fills; the grid's
    count is fixed per CUDA graph, so it cannot follow the context."""
    per = PROGRAMS_PER_SM * sm_count // max(1, num_seqs * num_kv_heads)
    return max(1, min(cap, MAX_SPLITS, 1 << max(0, per.bit_length() - 1)))


class SplitKVDecode:
    """Owns the kernel's workspace (partials + arrival counters for `max_batch` sequences).
    One per backend: launches sharing it must be ordered on one stream."""

    def __init__(
        self,
        max_batch: int,
        kv_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
    ) -> None:
        from kernels.triton.decode_attention import SplitKVWorkspace, fused_decode_attention

        self.max_batch = max_batch
        self.scale = scale
        self.workspace = SplitKVWorkspace(max_batch, num_heads, num_kv_heads, head_dim, kv_cache.device)
        self._fn = fused_decode_attention

    @classmethod
    def for_backend(
        cls,
        max_batch: int | None,
        kv_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
    ) -> SplitKVDecode | None:
        """What a backend owns for `split_kv_decode_max_batch`: None = the setting of
        kernels.capabilities (env PDSERVE_SPLIT_KV_DECODE_MAX_BATCH, default 32); 0 = never (None
        is returned)."""
        if max_batch is None:
            from kernels.capabilities import split_kv_decode_max_batch

            max_batch = split_kv_decode_max_batch()
        if max_batch <= 0:
            return None
        return cls(max_batch, kv_cache, num_heads, num_kv_heads, head_dim, scale)

    def applies(self, m: AttentionMetadata) -> bool:
        """A pure-decode batch (one new token per sequence) of 1..max_batch sequences."""
        return m.num_decode_seqs == m.num_seqs == m.num_tokens and self.covers(m.num_seqs)

    def covers(self, num_seqs: int) -> bool:
        """Whether a pure-decode batch of `num_seqs` sequences runs this kernel."""
        return 0 < num_seqs <= self.max_batch

    def forward_rope(
        self,
        m: AttentionMetadata,
        layer_view: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
    ) -> torch.Tensor:
        """`AttentionBackend.forward_rope` for a batch that `applies`: [S, Hq * D], q's dtype."""
        return self._fn(
            q, k, v, positions, rope.cos, rope.sin, layer_view, m.slot_mapping,
            m.block_tables, m.seq_lens, self.scale, self.workspace,
        )  # fmt: skip
