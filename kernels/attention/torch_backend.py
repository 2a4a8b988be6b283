"""Reference paged attention in plain torch: runs on CPU and GPU, used by tests as the ground
truth for the fast backends and as the CPU serving path.

Decodes (query length 1) are batched: one `index_select` gathers every decode sequence's
blocks of the layer (K and V each), then one SDPA call over [seqs, KV heads, the KV head's
query heads as rows, D] with a key-length mask. With the query heads of a KV head as the query
rows, SDPA's CPU flash kernel gets a G-row tile instead of one row (asked as [seqs, heads, 1, D]
with enable_gqa it was slower than two batched matmuls with a softmax between them; this way it
is 1.3-3.5x faster than those in a micro-benchmark (SmolLM2's 3 KV heads x 3, 1-32 sequences of
64-1024 keys, bf16 and float32, 2-core AMD EPYC) and 1.05x end to end at 1 and 16 streams
(benchmarks/results/2026-12-02-cpu-decode-attention.md). Prefill chunks are looped per sequence (one
SDPA each): prefill is compute-bound, so the loop costs little next to the matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention.base import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_piecewise_graphs = True  # through the runner's eager stand-in only (CPU tests)

    def plan(self, metadata: AttentionMetadata) -> None:
        self.metadata = m = metadata
        bs = m.block_size
        # The cache as rows of one token's K (or V) for one layer: [blocks * layers * 2 * bs, Hkv*D].
        # Row of (block b, layer l, K, offset o) = ((b * L + l) * 2) * bs + o; V is bs rows later.
        # Storing is then one index_copy_ per K/V on a contiguous 2-D tensor.
        num_layers = self.kv_cache.shape[1]
        blocks = torch.div(m.slot_mapping, bs, rounding_mode="floor")
        base = blocks * (num_layers * 2 * bs) + m.slot_mapping % bs
        layer_off = torch.arange(num_layers, device=base.device)[:, None] * (2 * bs)
        self._k_rows = base[None, :] + layer_off  # [L, T]
        self._v_rows = self._k_rows + bs
        self._rows = self.kv_cache.view(-1, self.num_kv_heads * self.head_dim)
        nd = m.num_decode_seqs
        if nd:
            max_ctx = max(m.seq_lens_cpu[:nd])
            nblk = -(-max_ctx // bs)
            self._dec_nblk = nblk
            self._dec_index = m.block_tables[:nd, :nblk].reshape(-1).long()
            pos = torch.arange(nblk * bs, device=m.seq_lens.device)
            # [nd, 1, 1, S]: True where the key position exists (SDPA's boolean mask)
            self._dec_valid = (pos[None, :] < m.seq_lens[:nd, None])[:, None, None, :]
        self._prefill: list[tuple[int, int, int, torch.Tensor, torch.Tensor | None]] = []
        starts = m.query_start_loc_cpu
        for i in range(nd, m.num_seqs):
            ql, sl = m.query_lens_cpu[i], m.seq_lens_cpu[i]
            nblk = -(-sl // bs)
            mask = None
            if sl != ql:  # cached prefix: query i sees keys [0, sl - ql + i]
                qpos = torch.arange(sl - ql, sl, device=m.seq_lens.device)
                kpos = torch.arange(sl, device=m.seq_lens.device)
                mask = kpos[None, :] <= qpos[:, None]
            self._prefill.append((starts[i], ql, sl, m.block_tables[i, :nblk], mask))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        t = q.shape[0]
        self._rows.index_copy_(0, self._k_rows[layer], k.reshape(t, -1))
        self._rows.index_copy_(0, self._v_rows[layer], v.reshape(t, -1))
        return self._attention(layer, q)

    def store_rope(self, layer, q, k, v, positions, rope, slot_mapping, q_out) -> None:
        """Reads nothing from the plan (slots -1 are skipped); not graph-capturable on GPU (its
        boolean mask has a data-dependent shape), which only the eager stand-in of the
        piecewise runner needs."""
        q, k = rope(positions, q, k)
        q_out.copy_(q)
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        blocks, offsets = slots // self.kv_cache.shape[3], slots % self.kv_cache.shape[3]
        self.kv_cache[blocks, layer, 0, offsets] = k[keep].to(self.kv_cache.dtype)
        self.kv_cache[blocks, layer, 1, offsets] = v[keep].to(self.kv_cache.dtype)

    def attend(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(self._attention(layer, q).view(out.shape))

    def _attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        t = q.shape[0]
        cache = self.kv_cache[:, layer]  # [num_blocks, 2, block_size, Hkv, D]
        out = torch.empty(t, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        nd = m.num_decode_seqs
        gqa = self.num_heads != self.num_kv_heads
        if nd:
            hk, d = self.num_kv_heads, self.head_dim
            s_len = self._dec_nblk * cache.shape[2]
            # [num_blocks, block_size * Hkv * D] views (block stride = all layers): one gather each
            keys = cache[:, 0].flatten(1).index_select(0, self._dec_index).view(nd, s_len, hk, d)
            vals = cache[:, 1].flatten(1).index_select(0, self._dec_index).view(nd, s_len, hk, d)
            qg = q[:nd].view(nd, hk, self.num_heads // hk, d)  # [nd, Hkv, G, D]: G query rows
            o = F.scaled_dot_product_attention(
                qg, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=self._dec_valid, scale=self.scale
            )  # [nd, Hkv, G, D]
            out[:nd] = o.reshape(nd, self.num_heads, d)
        for start, ql, sl, table, mask in self._prefill:
            kv = cache[table].transpose(0, 1).flatten(1, 2)[:, :sl]  # [2, sl, Hkv, D]
            o = F.scaled_dot_product_attention(
                q[start : start + ql].transpose(0, 1),  # [H, ql, D]
                kv[0].transpose(0, 1),
                kv[1].transpose(0, 1),
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scale,
                enable_gqa=gqa,
            )
            out[start : start + ql] = o.transpose(0, 1)
        return out.view(t, self.num_heads * self.head_dim)
