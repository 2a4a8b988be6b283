"""Paged attention through one Triton kernel (`kernels/triton/paged_attention.py`), with RoPE
fused into the K/V store. The fallback on CUDA devices where FlashInfer is absent (sm75+).

CUDA-graph safe for decode: `plan` only keeps references to the metadata's device tensors and
host ints that a pure-decode batch of a given size never changes, so a graph captured after
planning the runner's static buffers replays correctly.
"""

from __future__ import annotations

import torch

from kernels.attention.base import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
    ) -> None:
        super().__init__(kv_cache, num_heads, num_kv_heads, head_dim, scale)
        # Imported here: the CPU test suite must never import triton.
        from kernels.triton.paged_attention import paged_attention
        from kernels.triton.rope_store import rope_and_store, store_kv

        self._attend_fn = paged_attention
        self._rope_store = rope_and_store
        self._store = store_kv

    def plan(self, metadata: AttentionMetadata) -> None:
        self.metadata = metadata
        self._max_query_len = metadata.max_query_len

    def _attend(self, q: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        out = self._attend_fn(
            q, self._layer_view, m.block_tables, m.seq_lens, m.query_start_loc,
            self._max_query_len, self.scale,
        )
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        self._layer_view = self.kv_cache[:, layer]
        self._store(k, v, self._layer_view, m.slot_mapping)
        return self._attend(q)

    def forward_rope(self, layer, q, k, v, positions, rope) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        self._layer_view = self.kv_cache[:, layer]
        q = self._rope_store(q, k, v, positions, rope.cos, rope.sin, self._layer_view, m.slot_mapping)
        return self._attend(q)
