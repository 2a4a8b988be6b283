"""The attention-backend interface: plan once per step, run once per layer.

Every backend (torch reference, FlashInfer, Triton) implements `AttentionBackend`. The model
calls `backend.forward(layer, q, k, v)` and never sees block tables or where KV lives; the model
runner builds one `AttentionMetadata` per step and calls `backend.plan(metadata)` once before the
first layer.

Paged KV layout (owned by `kvcache.layout`): one tensor per worker,
    kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
"block-major": all layers of one block are one contiguous region, so a run of consecutive
block ids is one contiguous region for KV transfer. A layer's view `kv_cache[:, layer]` is the
FlashInfer NHD paged layout [num_pages, 2, page_size, num_kv_heads, head_dim] with a page stride
of num_layers * 2 * block_size * num_kv_heads * head_dim elements.

Batch layout: the T tokens of a step are packed sequence after sequence. Sequences with exactly
one new token (decodes) come first, so backends can treat `[:num_decode_tokens]` as a pure decode
batch and the rest as (chunked) prefill.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels import ops

if TYPE_CHECKING:
    from server.models.rope import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Per-step batch description. Device tensors live on the model's device; the `*_cpu`
    lists are host copies built alongside them (never read back from the device).

    query_start_loc: [num_seqs + 1] int32, prefix sums of per-sequence new-token counts.
    seq_lens:        [num_seqs] int32, context length of each sequence *after* this step
                     (cached tokens + new tokens); the new tokens are the last ones.
    block_tables:    [num_seqs, max_blocks_per_seq] int32, padded with 0 (never read past
                     seq_lens).
    slot_mapping:    [num_tokens] int64, flat slot (block_id * block_size + offset) where each
                     new token's K/V is stored.
    """

    num_seqs: int
    num_decode_seqs: int  # the first num_decode_seqs sequences have exactly one new token
    num_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    query_start_loc_cpu: list[int]
    block_size: int

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decode_seqs

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)


class AttentionBackend(ABC):
    """Computes causal paged attention and stores the step's K/V into the cache.

    Contract:
    - `plan(metadata)` is called once per step before any `forward`; it may build
      auxiliary index structures. It must not allocate per-layer state.
    - `forward(layer, q, k, v)` first writes k/v into `kv_cache[:, layer]` at
      `metadata.slot_mapping`, then returns attention of each query over its sequence's first
      `seq_len - query_len + i + 1` tokens (causal). Shapes:
        q: [num_tokens, num_heads, head_dim], k/v: [num_tokens, num_kv_heads, head_dim]
        returns [num_tokens, num_heads * head_dim], dtype of q.
    - `forward_rope(layer, q, k, v, positions, rope)` is `forward` with the rotary embedding
      applied to q and k first; the default rotates with `rope` and calls `forward`, backends
      with a fused rotate-and-store kernel override it. The model calls this one. With
      `norm_of=s, eps=...`, q/k/v were projected from the un-normalised rows s (RMSNorm
      weights folded into the projection) and are first scaled by each row's RMSNorm factor;
      `fuses_row_scale()` says whether that costs no extra kernel for the planned batch.
    - CUDA graphs (`supports_cuda_graphs`): a backend that sets it keeps every tensor its
      `forward` reads for a pure-decode batch either in the metadata it was planned with or in
      buffers it owns at fixed addresses, so a graph captured after `plan_cuda_graph(m)`
      replays correctly after `plan_cuda_graph(m2)` whenever m2 is a pure-decode batch of the
      same `num_seqs` whose device tensors are the same (static) tensors as m's. Padded rows carry slot -1 (no store) and a
      one-token context in a dummy block.
    - Piecewise CUDA graphs (`supports_piecewise_graphs`; server/engine/piecewise_graphs.py):
      `forward_rope` split in two. `store_rope` rotates q and k, stores k/v at the slots it is
      given and writes the rotated q into `q_out`, reading nothing from the plan (it runs
      inside a graph captured once per token-count bucket); `attend` runs the planned batch's
      attention of q into `out`, outside any graph, after `plan` for the real batch.
    - Backends are single-stream and not thread-safe; one per model runner.
    """

    name: str = "abstract"
    supports_cuda_graphs: bool = False
    supports_piecewise_graphs: bool = False

    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.metadata: AttentionMetadata | None = None

    def plan(self, metadata: AttentionMetadata) -> None:
        self.metadata = metadata

    def plan_cuda_graph(self, metadata: AttentionMetadata) -> None:
        """`plan` for a pure-decode batch that a CUDA graph captures or replays (only called
        when `supports_cuda_graphs`); backends with per-batch-size graph state override it."""
        self.plan(metadata)

    def tune_decode(self, sizes: list[int], max_context: int, tiles: list[tuple[int, int, int]]) -> list[str]:
        """Pick, by timing on this device, the decode kernel for each pure-decode batch size in
        `sizes` (the CUDA-graph batch sizes) among the backend's own and the Triton paged
        kernel with each of `tiles`; returns one log line per size timed. Called once at engine
        start, before graph capture. Backends with a single decode kernel time nothing."""
        return []

    def store_rope(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        positions: torch.Tensor, rope: RotaryEmbedding, slot_mapping: torch.Tensor,
        q_out: torch.Tensor,
    ) -> None:
        """Rotate q [T, Hq, D] and k by `positions`, store k/v of layer `layer` at
        `slot_mapping` ([T] int64, -1 = skip), write the rotated q into `q_out` [T, Hq, D]."""
        raise NotImplementedError(f"{self.name} has no piecewise CUDA graph support")

    def attend(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """Attention of the planned batch's rotated q [num_tokens, Hq, D] over layer `layer`'s
        cache (its K/V already stored) into `out` [num_tokens, Hq, D]."""
        raise NotImplementedError(f"{self.name} has no piecewise CUDA graph support")

    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...

    def forward_rope(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        norm_of: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor:
        """`forward` after rotating q and k by `positions` ([num_tokens] int64) with `rope`
        (its precomputed `cos`/`sin` tables [max_positions, head_dim] are what fused kernels
        read). q/k/v may be strided views of one fused projection output. With `norm_of`
        ([num_tokens, hidden]: the un-normalised rows q/k/v were projected from, by weights
        with the RMSNorm weight folded in), q, k and v are first scaled by its rows' RMSNorm
        factors (`kernels.ops.rms_factor_ref`); here with torch ops, in the store kernel where
        `fuses_row_scale`."""
        if norm_of is not None:
            q, k, v = scale_rows(norm_of, eps, q, k, v)
        q, k = rope(positions, q, k)
        return self.forward(layer, q, k, v)

    def fuses_row_scale(self) -> bool:
        """Whether `forward_rope` for the planned batch applies `norm_of`'s RMSNorm factors
        inside its store kernel (no extra launches), so the model may skip its norm kernels."""
        return False

    def decode_fuses_row_scale(self, num_seqs: int) -> bool:
        """`fuses_row_scale` as it will be for a pure-decode batch of `num_seqs` sequences,
        asked before any such batch is planned (the start-up tuners)."""
        return False


def scale_rows(norm_of: torch.Tensor, eps: float, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each [T, heads, D] tensor of `xs` times `norm_of`'s row RMSNorm factors, in float32,
    rounded back to its dtype (the unfused path of `AttentionBackend.forward_rope`)."""
    r = ops.rms_factor_ref(norm_of, eps).unsqueeze(-1)
    return tuple((x.float() * r).to(x.dtype) for x in xs)
