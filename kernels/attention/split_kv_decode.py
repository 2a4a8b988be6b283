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
        return m.num_decode_seqs == m.num_seqs == m.num_tokens and 0 < m.num_seqs <= self.max_batch

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
