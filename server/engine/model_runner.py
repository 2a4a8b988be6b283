"""Turns a `SchedulerOutput` into one forward pass: build the packed batch and attention
metadata once, `plan` the backend once, run the model, sample the rows that need a token."""

from __future__ import annotations

import torch

from kernels.attention.base import AttentionBackend, AttentionMetadata
from kvcache.manager import KVCacheManager
from server.engine.outputs import TokenLogprobs
from server.engine.sampler import Sampler, SamplingRow
from server.engine.scheduler import SchedulerOutput
from server.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        attn: AttentionBackend,
        kv: KVCacheManager,
        sampler: Sampler,
        device: torch.device,
    ) -> None:
        self.model = model
        self.attn = attn
        self.kv = kv
        self.sampler = sampler
        self.device = device
        self.block_size = kv.block_size

    def build_metadata(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        tables: list[list[int]] = []
        for req, n in out.scheduled:
            start = req.num_computed_tokens
            table = self.kv.block_table(req.request_id)
            input_ids.extend(req.all_token_ids[start : start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            query_lens.append(n)
            seq_lens.append(start + n)
            starts.append(starts[-1] + n)
            tables.append(table)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        num_decode = 0
        while num_decode < len(query_lens) and query_lens[num_decode] == 1:
            num_decode += 1
        dev = self.device
        meta = AttentionMetadata(
            num_seqs=len(query_lens),
            num_decode_seqs=num_decode,
            num_tokens=len(input_ids),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=starts,
            block_size=bs,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos_t, meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, tuple[int, TokenLogprobs | None]]:
        ids, positions, meta = self.build_metadata(out)
        self.attn.plan(meta)
        hidden = self.model(ids, positions, self.attn)
        # Only rows whose chunk reaches the end of their known tokens produce a token.
        rows, last = [], []
        for i, s in enumerate(out.scheduled):
            if s.samples:
                rows.append(SamplingRow.from_request(s.request))
                last.append(meta.query_start_loc_cpu[i + 1] - 1)
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=self.device)])
        result = self.sampler(logits, rows)
        reqs = [s.request for s in out.scheduled if s.samples]
        return {
            r.request_id: (tok, lp)
            for r, tok, lp in zip(reqs, result.token_ids, result.logprobs, strict=True)
        }
