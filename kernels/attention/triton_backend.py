"""Paged attention through one Triton kernel (`kernels/triton/paged_attention.py`), with RoPE
fused into the K/V store. The fallback on CUDA devices where FlashInfer is absent (sm75+).

CUDA-graph safe for decode: `plan` only keeps references to the metadata's device tensors and
host ints that a pure-decode batch of a given size never changes, so a graph captured after
planning the runner's static buffers replays correctly.

Small pure-decode batches (up to `split_kv_decode_max_batch` sequences) run `forward_rope` as
one fused Triton kernel per layer instead (kernels/attention/split_kv_decode.py).
"""

from __future__ import annotations

import torch

from kernels.attention.base import AttentionBackend, AttentionMetadata, scale_rows
from kernels.attention.split_kv_decode import SplitKVDecode


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    supports_piecewise_graphs = True

    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        split_kv_decode_max_batch: int | None = None,
        decode_config: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(kv_cache, num_heads, num_kv_heads, head_dim, scale)
        # (BLOCK_N, num_warps, num_stages) of the paged kernel for batches of one query token
        # per sequence; None: the kernel's default. Prefill batches always take the default.
        self._decode_config = decode_config
        # Imported here: the CPU test suite must never import triton.
        from kernels.triton.paged_attention import paged_attention
        from kernels.triton.rope_store import rope_and_store, store_kv

        self._attend_fn = paged_attention
        self._rope_store = rope_and_store
        self._store = store_kv
        # forward_rope of pure-decode batches of up to this many sequences: the fused split-KV
        # kernel. None: env PDSERVE_SPLIT_KV_DECODE_MAX_BATCH (default 32); 0 = never.
        self._split_kv = SplitKVDecode.for_backend(
            split_kv_decode_max_batch, kv_cache, num_heads, num_kv_heads, head_dim, self.scale
        )
        self._fused_decode = False

    def plan(self, metadata: AttentionMetadata) -> None:
        self.metadata = metadata
        self._max_query_len = metadata.max_query_len
        self._config = self._decode_config if metadata.max_query_len == 1 else None
        self._fused_decode = self._split_kv is not None and self._split_kv.applies(metadata)

    def _attend(self, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        out = self._attend_fn(
            q, self._layer_view, m.block_tables, m.seq_lens, m.query_start_loc,
            self._max_query_len, self.scale, out=out, config=self._config,
        )
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def store_rope(self, layer, q, k, v, positions, rope, slot_mapping, q_out) -> None:
        self._rope_store(q, k, v, positions, rope.cos, rope.sin, self.kv_cache[:, layer], slot_mapping,
                         out=q_out)

    def attend(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        self._layer_view = self.kv_cache[:, layer]
        self._attend(q, out)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        self._layer_view = self.kv_cache[:, layer]
        self._store(k, v, self._layer_view, m.slot_mapping)
        return self._attend(q)

    def forward_rope(self, layer, q, k, v, positions, rope, norm_of=None, eps=0.0) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        self._layer_view = self.kv_cache[:, layer]
        if self._fused_decode and q.dtype == self.kv_cache.dtype:
            if norm_of is not None:  # not fused there (`fuses_row_scale`): scaled first
                q, k, v = scale_rows(norm_of, eps, q, k, v)
            return self._split_kv.forward_rope(m, self._layer_view, q, k, v, positions, rope)
        q = self._rope_store(q, k, v, positions, rope.cos, rope.sin, self._layer_view, m.slot_mapping,
                             norm_of=norm_of, eps=eps)
        return self._attend(q)

    def fuses_row_scale(self) -> bool:
        """The rotate-and-store kernel takes the RMSNorm factors; the fused small-batch decode
        kernel does not."""
        return not self._fused_decode

    def decode_fuses_row_scale(self, num_seqs: int) -> bool:
        return self._split_kv is None or not self._split_kv.covers(num_seqs)
