"""FlashInfer paged attention: tensor-core batch decode for the decode rows of a step and causal
paged prefill for the (chunked) prefill rows, planned once per step and run by every layer. K/V
are stored, with RoPE fused in, by `kernels/triton/rope_store.py`.

The cache is the block-major tensor [num_blocks, num_layers, 2, block_size, Hkv, D]; a layer's
view `kv_cache[:, layer]` is FlashInfer's NHD layout with a page stride of
num_layers * 2 * block_size * Hkv * D elements, which FlashInfer reads through its strides.

Page indices are gathered on the device from the block table (sizes known on the host, so no
sync). CUDA graphs: `plan_cuda_graph` plans a per-batch-size decode wrapper whose index buffers
are static (FlashInfer's use_cuda_graph mode); a graph captured after planning it replays
correctly after re-planning the same wrapper.

Prefill uses FlashInfer's "fa2" kernels by default, the same JIT module as tensor-core decode
(one compile instead of two); `PDSERVE_FLASHINFER_PREFILL_BACKEND=auto` picks fa3 on Hopper.

Small pure-decode batches (up to `split_kv_decode_max_batch` sequences) skip all of the above in
`forward_rope`: one fused Triton kernel per layer (kernels/attention/split_kv_decode.py).
Pure-decode batches in the `triton_decode_batches` range run rope_store and the Triton paged
kernel (kernels/triton/paged_attention.py) with a decode tile instead: every batch in the range
with one tile, or, once `tune_decode` has timed both kernels per CUDA-graph batch size at
engine start (kernels/attention/decode_tune.py), the batch sizes where the Triton kernel won,
each with its winning tile. For both, FlashInfer's plan is deferred until something asks for
FlashInfer and otherwise never made.
"""

from __future__ import annotations

import os

import torch

from kernels.attention import decode_tune
from kernels.attention.base import AttentionBackend, AttentionMetadata, scale_rows
from kernels.attention.split_kv_decode import SplitKVDecode

WORKSPACE_BYTES = 256 << 20


class FlashInferAttentionBackend(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graphs = True
    supports_piecewise_graphs = True

    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        cuda_core_decode_max_batch: int | None = None,
        split_kv_decode_max_batch: int | None = None,
        triton_decode_batches: tuple[int, int, tuple[int, int, int]] | None = None,
    ) -> None:
        super().__init__(kv_cache, num_heads, num_kv_heads, head_dim, scale)
        # (min, max, tile): pure-decode batches of min..max sequences attend with the Triton
        # paged kernel and this (BLOCK_N, warps, stages) tile. None: kernels.capabilities.
        if triton_decode_batches is None:
            from kernels.capabilities import triton_decode_batches as _setting

            triton_decode_batches = _setting()
        self._triton_lo, self._triton_hi, self._triton_tile = triton_decode_batches
        self._triton_tuned: dict[int, tuple[int, int, int] | None] | None = None  # tune_decode
        self._tile: tuple[int, int, int] | None = None  # this batch's Triton tile, if any
        self._triton_decode = False
        # Decode runs on the tensor cores (FlashInfer's prefill kernel: one JIT module for decode
        # and prefill), except CUDA-graph batches of up to this many sequences, which use the
        # CUDA-core decode kernel (a second JIT module). None: env
        # PDSERVE_FLASHINFER_CUDA_CORE_DECODE_MAX_BATCH, default 0 (never: slower on an H200 at
        # every batch and context measured, benchmarks/results/2026-12-01-decode-attention.md).
        if cuda_core_decode_max_batch is None:
            cuda_core_decode_max_batch = int(os.environ.get("PDSERVE_FLASHINFER_CUDA_CORE_DECODE_MAX_BATCH", "0"))
        self._cuda_core_max_batch = cuda_core_decode_max_batch
        # forward_rope of pure-decode batches of up to this many sequences: the fused split-KV
        # kernel. None: env PDSERVE_SPLIT_KV_DECODE_MAX_BATCH (default 32); 0 = never.
        self._split_kv = SplitKVDecode.for_backend(
            split_kv_decode_max_batch, kv_cache, num_heads, num_kv_heads, head_dim, self.scale
        )
        self._fused_decode = False
        self._pending_plan = None  # FlashInfer's plan for the current batch, when deferred
        # Imported here: the CPU test suite must never import flashinfer or triton.
        import flashinfer

        from kernels.triton.paged_attention import paged_attention
        from kernels.triton.rope_store import rope_and_store, store_kv

        self._paged = paged_attention
        self._fi = flashinfer
        self._rope_store = rope_and_store
        self._store = store_kv
        dev = kv_cache.device
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        self._decode_eager = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=True
        )
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, "NHD", backend=os.environ.get("PDSERVE_FLASHINFER_PREFILL_BACKEND", "fa2")
        )
        self._graph_decode: dict[int, object] = {}  # batch size -> use_cuda_graph wrapper
        self._decode = self._decode_eager
        self._has_prefill = False
        self._plan_copied = torch.cuda.Event()  # recorded after each plan; unrecorded: no wait

    # -- planning ---------------------------------------------------------------------------

    def _wait_previous_plan(self) -> None:
        """FlashInfer's plan() writes its plan into a pinned host buffer per wrapper and copies
        it to the device without blocking. A step that samples nothing (a prefill chunk in the
        middle of a long prompt, no decodes) has no host sync, so the next plan() could rewrite
        that buffer before the GPU, still busy with earlier steps, had copied it: the kernels
        then read another step's plan (illegal memory accesses serving 2k-8k prompts on H200,
        gone under CUDA_LAUNCH_BLOCKING). Wait until the previous plan's copies have run."""
        self._plan_copied.synchronize()

    def _plan_done(self) -> None:
        self._plan_copied.record()

    def _page_info(self, m: AttentionMetadata):
        """Host indptr / last-page lengths (int32 CPU tensors) and the device page indices
        [total_pages] int32 of all sequences, in batch order."""
        bs = m.block_size
        counts = [-(-s // bs) for s in m.seq_lens_cpu]
        indptr = [0]
        for c in counts:
            indptr.append(indptr[-1] + c)
        last = [s - (c - 1) * bs for s, c in zip(m.seq_lens_cpu, counts, strict=True)]
        total = indptr[-1]
        dev = m.block_tables.device
        counts_dev = torch.div(m.seq_lens + (bs - 1), bs, rounding_mode="floor")
        rows = torch.repeat_interleave(
            torch.arange(m.num_seqs, device=dev), counts_dev, output_size=total
        )
        first = torch.cumsum(counts_dev, 0) - counts_dev  # exclusive prefix sum
        cols = torch.arange(total, device=dev) - first[rows]
        indices = m.block_tables[rows, cols].to(torch.int32)
        # Pinned: FlashInfer copies these to the device non-blocking, and a pageable copy would
        # wait for the work queued before it (the engine plans the next step during this one).
        return (
            torch.tensor(indptr, dtype=torch.int32).pin_memory(),
            torch.tensor(last, dtype=torch.int32).pin_memory(),
            indices,
            indptr,
        )

    def _plan_decode(self, wrapper, indptr, indices, last) -> None:
        dtype = self.kv_cache.dtype
        wrapper.plan(
            indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim,
            self.kv_cache.shape[3], q_data_type=dtype, kv_data_type=dtype,
            sm_scale=self.scale,
        )

    def plan(self, metadata: AttentionMetadata) -> None:
        self._plan_or_defer(metadata, self._plan_eager)

    def _plan_or_defer(self, m: AttentionMetadata, make_plan) -> None:
        """Plan FlashInfer for `m` now, or, for a batch that forward_rope runs on the fused
        kernel (which needs no plan), only when something asks for FlashInfer (`_attend`)."""
        self.metadata = m
        self._fused_decode = self._split_kv is not None and self._split_kv.applies(m)
        pure_decode = not self._fused_decode and m.num_decode_seqs == m.num_seqs == m.num_tokens
        self._tile = decode_tune.tile_for(m.num_seqs, self._triton_lo, self._triton_hi, self._triton_tile,
                              self._triton_tuned) if pure_decode else None
        self._triton_decode = self._tile is not None
        if self._fused_decode or self._triton_decode:
            self._pending_plan = make_plan
        else:
            make_plan()

    def _plan_eager(self) -> None:
        self._pending_plan = None
        self._wait_previous_plan()
        m = self.metadata
        nd = m.num_decode_seqs
        indptr, last, indices, indptr_list = self._page_info(m)
        self._decode = self._decode_eager
        if nd:
            split = indptr_list[nd]
            self._plan_decode(self._decode, indptr[: nd + 1], indices[:split], last[:nd])
        self._has_prefill = nd < m.num_seqs
        if self._has_prefill:
            split = indptr_list[nd]
            q0 = m.query_start_loc_cpu[nd]
            qo_indptr = torch.tensor([s - q0 for s in m.query_start_loc_cpu[nd:]], dtype=torch.int32)
            dtype = self.kv_cache.dtype
            self._prefill.plan(
                qo_indptr, indptr[nd:] - split, indices[split:], last[nd:],
                self.num_heads, self.num_kv_heads, self.head_dim, self.kv_cache.shape[3],
                causal=True, sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype,
            )
        self._plan_done()

    def plan_cuda_graph(self, metadata: AttentionMetadata) -> None:
        m = metadata
        if m.num_decode_seqs != m.num_seqs:
            raise ValueError("CUDA graphs cover pure-decode batches only")
        self._has_prefill = False
        self._plan_or_defer(m, self._plan_graph)

    def graph_decode_wrapper(self, batch: int, max_pages: int):
        """A FlashInfer decode wrapper in CUDA-graph mode (static index buffers) for `batch`
        sequences of up to `max_pages` pages each."""
        dev = self.kv_cache.device
        return self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_cuda_graph=True,
            use_tensor_cores=batch > self._cuda_core_max_batch,
            paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(batch * max_pages, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=dev),
        )

    def _plan_graph(self) -> None:
        self._pending_plan = None
        self._wait_previous_plan()
        m = self.metadata
        bs = m.num_seqs
        wrapper = self._graph_decode.get(bs)
        if wrapper is None:
            wrapper = self._graph_decode[bs] = self.graph_decode_wrapper(bs, m.block_tables.shape[1])
        indptr, last, indices, _ = self._page_info(m)
        self._plan_decode(wrapper, indptr, indices, last)
        self._decode = wrapper
        self._plan_done()

    def tune_decode(self, sizes: list[int], max_context: int, tiles: list[tuple[int, int, int]]) -> list[str]:
        """Time FlashInfer's decode against the Triton kernel with each of `tiles` at every
        CUDA-graph batch size in `sizes` within the Triton range and route each size to its
        winner from now on; returns one log line per size timed. Call before capturing graphs."""
        self._triton_tuned, lines = decode_tune.tune(self, sizes, max_context, tiles)
        return lines

    # -- running ----------------------------------------------------------------------------

    def _attend(self, q: torch.Tensor, layer_view: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._pending_plan is not None:  # a batch planned for the fused path, run otherwise
            self._pending_plan()
        m = self.metadata
        nd = m.num_decode_seqs
        out = torch.empty_like(q) if out is None else out
        if nd:
            self._decode.run(q[:nd], layer_view, out=out[:nd])
        if self._has_prefill:
            self._prefill.run(q[nd:], layer_view, out=out[nd:])
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def store_rope(self, layer, q, k, v, positions, rope, slot_mapping, q_out) -> None:
        self._rope_store(q, k, v, positions, rope.cos, rope.sin, self.kv_cache[:, layer], slot_mapping,
                         out=q_out)

    def _attend_triton(self, q: torch.Tensor, layer_view: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        m = self.metadata
        out = self._paged(q, layer_view, m.block_tables, m.seq_lens, m.query_start_loc, 1, self.scale,
                          out=out, config=self._tile)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def attend(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        if self._triton_decode:
            self._attend_triton(q, self.kv_cache[:, layer], out)
        else:
            self._attend(q, self.kv_cache[:, layer], out)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        view = self.kv_cache[:, layer]
        self._store(k, v, view, m.slot_mapping)
        return self._attend(q.contiguous(), view)

    def forward_rope(self, layer, q, k, v, positions, rope, norm_of=None, eps=0.0) -> torch.Tensor:
        m = self.metadata
        assert m is not None, "plan() must be called before forward()"
        view = self.kv_cache[:, layer]
        if self._fused_decode and q.dtype == self.kv_cache.dtype:
            if norm_of is not None:  # not fused there (`fuses_row_scale`): scaled first
                q, k, v = scale_rows(norm_of, eps, q, k, v)
            return self._split_kv.forward_rope(m, view, q, k, v, positions, rope)
        q = self._rope_store(q, k, v, positions, rope.cos, rope.sin, view, m.slot_mapping,
                             norm_of=norm_of, eps=eps)
        return self._attend_triton(q, view) if self._triton_decode else self._attend(q, view)

    def fuses_row_scale(self) -> bool:
        """The rotate-and-store kernel takes the RMSNorm factors; the fused small-batch decode
        kernel does not."""
        return not self._fused_decode

    def decode_fuses_row_scale(self, num_seqs: int) -> bool:
        return self._split_kv is None or not self._split_kv.covers(num_seqs)
