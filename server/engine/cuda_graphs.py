"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with the step's
inputs copied into static buffers, so a decode step costs one H2D copy, a few tiny copies, the
backend's plan and one graph launch instead of ~15 kernel launches per layer.

- A graph runs the whole forward pass up to the logits, in the model's dtype
  (`model.forward_logits`: the layers, the final norm, lm_head), so the sampler's kernels follow
  the replay directly; at batch 1 the norm runs inside lm_head's fused GEMV, launched as the last
  layer's dependent. The logits buffers stay allocated: sum(buckets) x vocab x the dtype's size
  (`output_bytes`).

- Buckets 1, 2, 4, ..., up to max_num_seqs (which is itself a bucket). A batch of n sequences
  runs in the smallest bucket >= n; rows n..bucket-1 are padding: token 0 at position 0, slot -1
  (the K/V store skips it) and a one-token context in the dummy block (a KV block that the block
  manager never hands out), so they compute finite garbage that nobody reads.
- Captured largest-first into one memory pool: smaller graphs reuse the largest one's
  activation memory.
- Inputs: one pinned host buffer, one H2D copy per step into a device buffer of fixed layout
  [ids | positions | slots | seq_lens | token rows | block tables]; ids/positions/slots are
  int64 views of it, seq_lens and block tables are converted into int32 static tensors. The
  pinned buffer is rewritten only after the previous copy out of it has run (an event).
- `stage` (copy inputs + plan attention) and `replay` are separate, so the engine can stage
  step N+1 while step N still runs: everything `stage` queues lands after step N on the stream,
  and the input ids can be gathered on the device from step N's sampled tokens ("token rows").
- Only backends with `supports_cuda_graphs` are captured (FlashInfer, Triton); the attention
  plan runs before each replay, outside the graph.
"""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import torch

from kernels.attention.base import AttentionBackend, AttentionMetadata

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Fill the static inputs after the host->device copy with ONE Triton kernel
# (kernels/triton/stage_decode.py) instead of index_select + copy + two int32 conversions.
# None: env PDSERVE_STAGE_KERNEL (default 1; 0 = the torch ops). H200, 8B shape, batch 1
# (2026-12-02-gpu-llama8b-4.md): TPOT 4.006 ms vs 4.021 ms with the torch ops in the same run.
STAGE_KERNEL: bool | None = None


def stage_kernel_enabled() -> bool:
    global STAGE_KERNEL
    if STAGE_KERNEL is None:
        STAGE_KERNEL = os.environ.get("PDSERVE_STAGE_KERNEL", "1") == "1"
    return STAGE_KERNEL


class DecodeBatch(NamedTuple):
    """Host description of a pure-decode step (one new token per sequence)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]


class StagedDecode(NamedTuple):
    """A decode batch whose inputs and attention plan are in place for `replay`."""

    bucket: int  # the graph's batch size
    num_seqs: int  # real rows; the rest are padding


def bucket_sizes(max_num_seqs: int) -> list[int]:
    return [b for b in BUCKETS if b < max_num_seqs] + [max_num_seqs]


class CudaGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        attn: AttentionBackend,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        dummy_block: int,
        device: torch.device,
    ) -> None:
        if not attn.supports_cuda_graphs:
            raise ValueError(f"attention backend {attn.name!r} does not support CUDA graphs")
        self.model = model
        self.attn = attn
        self.block_size = block_size
        self.sizes = bucket_sizes(max_num_seqs)
        self.max_bs = n = self.sizes[-1]
        self.width = -(-max_model_len // block_size)  # block-table columns
        self.dummy_block = dummy_block
        self.device = device
        # Fixed layout of the packed int64 buffer (offsets depend on max_bs only).
        self._o_pos, self._o_slot, self._o_len, self._o_src, self._o_tab = n, 2 * n, 3 * n, 4 * n, 5 * n
        total = 5 * n + n * self.width
        self._host = torch.zeros(total, dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event()  # the last copy out of _host has run (unrecorded: no wait)
        self._dev = torch.zeros(total, dtype=torch.int64, device=device)
        self.input_ids = self._dev[:n]
        self.positions = self._dev[self._o_pos : self._o_pos + n]
        self.slots = self._dev[self._o_slot : self._o_slot + n]
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, self.width), dummy_block, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @staticmethod
    def output_bytes(max_num_seqs: int, vocab_size: int, dtype: torch.dtype) -> int:
        """Device memory the captured graphs' logits outputs (in the model's `dtype`) keep; the
        rest of their activations share one pool with the largest graph's."""
        return sum(bucket_sizes(max_num_seqs)) * vocab_size * dtype.itemsize

    def bucket(self, n: int) -> int:
        for b in self.sizes:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest captured size {self.max_bs}")

    def can_run(self, batch_size: int, max_blocks: int) -> bool:
        return 0 < batch_size <= self.max_bs and max_blocks <= self.width

    def _stage(
        self, batch: DecodeBatch, bs: int, tokens: tuple[torch.Tensor, list[int]] | None = None
    ) -> tuple[AttentionMetadata, int]:
        """Write the padded batch into the pinned buffer, copy it to the device once, fill the
        static int32 tensors; returns the metadata over the static buffers and the table width
        used. `tokens` = (token ids on the device, row of each sequence in them): the input ids
        are gathered from there on the device instead of taken from `batch.input_ids`."""
        n = len(batch.input_ids)
        self._copied.synchronize()  # the previous step's copy out of _host has run
        h = self._host_np
        h[:n] = batch.input_ids
        h[n:bs] = 0
        h[self._o_pos : self._o_pos + n] = batch.positions
        h[self._o_pos + n : self._o_pos + bs] = 0
        h[self._o_slot : self._o_slot + n] = batch.slots
        h[self._o_slot + n : self._o_slot + bs] = -1
        h[self._o_len : self._o_len + n] = batch.seq_lens
        h[self._o_len + n : self._o_len + bs] = 1
        w = max((len(t) for t in batch.block_tables), default=1)
        tab = h[self._o_tab : self._o_tab + bs * w].reshape(bs, w)
        tab[:] = self.dummy_block
        for i, t in enumerate(batch.block_tables):
            tab[i, : len(t)] = t
        if tokens is not None:
            h[self._o_src : self._o_src + n] = tokens[1]
        end = self._o_tab + bs * w
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        self._copied.record()
        if stage_kernel_enabled():
            from kernels.triton.stage_decode import stage_decode

            stage_decode(self._dev, None if tokens is None else tokens[0], n, bs, w, self._o_len,
                         self._o_src, self._o_tab, self.seq_lens, self.block_tables)
        else:
            if tokens is not None:
                rows = self._dev[self._o_src : self._o_src + n]
                self.input_ids[:n].copy_(tokens[0].index_select(0, rows))
            self.seq_lens[:bs].copy_(self._dev[self._o_len : self._o_len + bs])
            self.block_tables[:bs, :w].copy_(self._dev[self._o_tab : end].view(bs, w))
        seq_lens = list(batch.seq_lens) + [1] * (bs - n)
        meta = AttentionMetadata(
            num_seqs=bs,
            num_decode_seqs=bs,
            num_tokens=bs,
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slots[:bs],
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=list(range(bs + 1)),
            block_size=self.block_size,
        )
        return meta, w

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one pool."""
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        for bs in reversed(self.sizes):
            pad = DecodeBatch([], [], [], [], [])
            meta, _ = self._stage(pad, bs)
            self.attn.plan_cuda_graph(meta)
            # Warm-up outside the graph: compiles Triton kernels, creates cuBLAS handles.
            self.model.forward_logits(self.input_ids[:bs], self.positions[:bs], self.attn)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.model.forward_logits(self.input_ids[:bs], self.positions[:bs], self.attn)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[bs] = (graph, out)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s, %.0f MiB",
                 len(self._graphs), ",".join(map(str, self.sizes)), time.perf_counter() - t0,
                 used / 2**20)

    def recapture(self) -> None:
        """Drop every graph and capture again (after a kernel choice the graphs baked in, such
        as `kernels.ops.fuses_linears`, changed). Nothing may be staged across this."""
        self._graphs.clear()
        self._pool = None
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.capture()

    @torch.inference_mode()
    def stage(
        self, batch: DecodeBatch, tokens: tuple[torch.Tensor, list[int]] | None = None
    ) -> StagedDecode:
        """Put `batch`'s inputs into the static buffers and plan the attention for it (see
        `_stage` for `tokens`). Nothing may stage or run another batch before its `replay`."""
        n = len(batch.input_ids)
        bs = self.bucket(n)
        meta, _ = self._stage(batch, bs, tokens)
        self.attn.plan_cuda_graph(meta)
        return StagedDecode(bs, n)

    @torch.inference_mode()
    def replay(self, staged: StagedDecode) -> torch.Tensor:
        """Replay a staged batch; returns logits [n, vocab] in the model's dtype (a view of the
        graph's output buffer, valid until the next replay of that graph)."""
        graph, out = self._graphs[staged.bucket]
        graph.replay()
        return out[: staged.num_seqs]

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        return self.replay(self.stage(batch))

