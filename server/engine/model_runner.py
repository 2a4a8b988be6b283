"""Turns a `SchedulerOutput` into one forward pass: build the packed batch and attention
metadata once, `plan` the backend once, run the model, sample the rows that need a token.

On CUDA the step's host lists reach the device in one copy (pinned, non-blocking), and pure
decode steps replay a captured CUDA graph when the engine gave the runner one
(`server/engine/cuda_graphs.py`). The sampler's device->host copy is the step's one sync.

`launch` queues a step and returns before the device has run it; `PendingStep.result()` waits.
In between, `prepare_ahead` stages the decode step the scheduler predicts next (inputs copied,
attention planned, input ids gathered on the device from the tokens being sampled), so that
host work overlaps the device. The next `launch` replays it directly when its batch is exactly
the prediction, and stages from scratch otherwise: a wrong prediction costs nothing but the
overlapped host time. `launch_ahead` goes one further (step overlap): it launches the
predicted step right away, so the device never waits for the host between decode steps."""

from __future__ import annotations

import torch

from kernels.attention.base import AttentionBackend, AttentionMetadata
from kvcache.manager import KVCacheManager
from server.engine.cuda_graphs import CudaGraphRunner, DecodeBatch, StagedDecode
from server.engine.host_copy import device_tensor
from server.engine.outputs import TokenLogprobs
from server.engine.piecewise_graphs import PiecewiseGraphRunner
from server.engine.prompt_logprobs import PendingPromptLogprobs, launch_prompt_logprobs, prompt_rows
from server.engine.request import Request
from server.engine.sampler import PendingSample, Sampler, SamplingRow
from server.engine.scheduler import DecodeRow, SchedulerOutput
from server.models.llama import LlamaForCausalLM

Sampled = dict[str, tuple[int, TokenLogprobs | None]]
PromptLogprobs = dict[str, tuple[int, list[TokenLogprobs]]]


class PendingStep:
    """A launched step: its sampled tokens (and prompt logprobs) are on the device until
    `result()` (`prompt_logprobs()`)."""

    def __init__(
        self,
        requests: list[Request],
        sample: PendingSample | None,
        prompt: PendingPromptLogprobs | None = None,
    ) -> None:
        self.requests = requests  # the rows that sample, in the sampler's order
        self.sample = sample
        self.prompt = prompt

    def prompt_logprobs(self) -> PromptLogprobs:
        """request id -> (first prompt index scored, logprobs) of the requests whose prompt
        positions this step computed with SamplingParams.prompt_logprobs; waits for the device."""
        return {} if self.prompt is None else self.prompt.result()

    def result(self) -> Sampled:
        """request id -> (token, logprobs) for each request that sampled; waits for the device."""
        if self.sample is None:
            return {}
        res = self.sample.result()
        return {
            r.request_id: (tok, lp)
            for r, tok, lp in zip(self.requests, res.token_ids, res.logprobs, strict=True)
        }


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        attn: AttentionBackend,
        kv: KVCacheManager,
        sampler: Sampler,
        device: torch.device,
        cuda_graphs: CudaGraphRunner | None = None,
        piecewise: PiecewiseGraphRunner | None = None,
        max_logit_rows: int = 64,
    ) -> None:
        self.model = model
        self.attn = attn
        self.kv = kv
        self.sampler = sampler
        self.device = device
        self.block_size = kv.block_size
        self.cuda_graphs = cuda_graphs
        self.piecewise = piecewise  # prefill / mixed steps up to its token count
        self.max_logit_rows = max_logit_rows  # rows of logits at a time for prompt logprobs
        # The step staged by prepare_ahead: (its batch without input ids, staged graph inputs).
        self._ahead: tuple[tuple, StagedDecode] | None = None
        self.ahead_used = 0  # steps that replayed a prepared batch
        self.ahead_missed = 0  # prepared batches that the next step did not match
        self.launched_ahead = 0  # steps launched before the previous one's tokens were known

    @property
    def can_prepare_ahead(self) -> bool:
        return self.cuda_graphs is not None

    def _host_batch(self, out: SchedulerOutput):
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
            if n == 1:  # a decode: most rows of most steps
                input_ids.append(req.all_token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(req.all_token_ids[start : start + n])
                pos = range(start, start + n)
                positions.extend(pos)
                slots.extend(table[p // bs] * bs + p % bs for p in pos)
            query_lens.append(n)
            seq_lens.append(start + n)
            starts.append(starts[-1] + n)
            tables.append(table)
        return input_ids, positions, slots, query_lens, seq_lens, starts, tables

    def build_metadata(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return self._to_device(*self._host_batch(out))

    def _to_device(self, input_ids, positions, slots, query_lens, seq_lens, starts, tables):
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        num_decode = 0
        while num_decode < len(query_lens) and query_lens[num_decode] == 1:
            num_decode += 1
        dev = self.device
        if dev.type == "cuda":
            # One pinned host buffer, one non-blocking H2D copy; int32 fields converted there.
            n, s = len(input_ids), len(query_lens)
            flat = torch.tensor(
                [*input_ids, *positions, *slots, *starts, *seq_lens, *(x for row in padded for x in row)],
                dtype=torch.int64,
            ).pin_memory()
            d = flat.to(dev, non_blocking=True)
            ids, pos_t, slot_t = d[:n], d[n : 2 * n], d[2 * n : 3 * n]
            o = 3 * n
            qsl = d[o : o + s + 1].to(torch.int32)
            lens = d[o + s + 1 : o + 2 * s + 1].to(torch.int32)
            tab = d[o + 2 * s + 1 :].view(s, width).to(torch.int32)
        else:
            qsl = torch.tensor(starts, dtype=torch.int32, device=dev)
            lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
            tab = torch.tensor(padded, dtype=torch.int32, device=dev)
            slot_t = torch.tensor(slots, dtype=torch.int64, device=dev)
            ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
            pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(
            num_seqs=len(query_lens),
            num_decode_seqs=num_decode,
            num_tokens=len(input_ids),
            query_start_loc=qsl,
            seq_lens=lens,
            block_tables=tab,
            slot_mapping=slot_t,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            query_start_loc_cpu=starts,
            block_size=self.block_size,
        )
        return ids, pos_t, meta

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> PendingStep:
        """Queue the step's forward pass and sampling on the device; returns without waiting."""
        host = self._host_batch(out)
        input_ids, positions, slots, query_lens, seq_lens, starts, tables = host
        graphs = self.cuda_graphs
        ahead, self._ahead = self._ahead, None
        if (
            graphs is not None
            and len(input_ids) == len(query_lens)  # pure decode: one new token each
            and graphs.can_run(len(query_lens), max(len(t) for t in tables))
        ):
            rids = [s.request.request_id for s in out.scheduled]
            staged = None
            if ahead is not None:
                if ahead[0] == (rids, positions, slots, seq_lens, tables):
                    staged = ahead[1]  # its input ids are this step's, gathered on the device
                    self.ahead_used += 1
                else:
                    self.ahead_missed += 1
            if staged is None:
                staged = graphs.stage(DecodeBatch(input_ids, positions, slots, seq_lens, tables))
            out_rows, are_logits = graphs.replay(staged), True  # the graph ends in lm_head
        else:
            self.ahead_missed += ahead is not None
            ids, pos_t, meta = self._to_device(*host)
            if self.piecewise is not None and self.piecewise.can_run(len(input_ids)):
                out_rows = self.piecewise.run(ids, pos_t, meta)
            else:
                self.attn.plan(meta)
                out_rows = self.model(ids, pos_t, self.attn)
            are_logits = False
        prompt = None
        jobs = prompt_rows(out.scheduled, starts)
        if jobs:
            hidden = out_rows

            def logits_of(idx: torch.Tensor) -> torch.Tensor:
                rows = hidden.index_select(0, idx)
                return rows if are_logits else self.model.compute_logits(rows)

            prompt = launch_prompt_logprobs(logits_of, jobs, self.device, self.max_logit_rows)
        # Only rows whose chunk reaches the end of their known tokens produce a token.
        rows, last = [], []
        for i, s in enumerate(out.scheduled):
            if s.samples:
                rows.append(SamplingRow.from_request(s.request))
                last.append(starts[i + 1] - 1)
        reqs = [s.request for s in out.scheduled if s.samples]
        if not rows:
            return PendingStep(reqs, None, prompt)
        if len(last) != out_rows.shape[0]:  # else every row samples (decode steps): no gather
            out_rows = out_rows[device_tensor(last, torch.int64, self.device)]
        logits = out_rows if are_logits else self.model.compute_logits(out_rows)
        return PendingStep(reqs, self.sampler.launch(logits, rows), prompt)

    @torch.inference_mode()
    def prepare_ahead(self, rows: list[DecodeRow], pending: PendingStep) -> None:
        """Stage the predicted next decode step while `pending` runs: its inputs and attention
        plan land on the stream after `pending`, its input ids are gathered there from
        `pending`'s sampled tokens. Every predicted request must sample in `pending`."""
        self._ahead = self._stage_ahead(rows, pending)

    @torch.inference_mode()
    def launch_ahead(self, rows: list[DecodeRow], pending: PendingStep) -> PendingStep | None:
        """Stage the predicted next decode step as `prepare_ahead` does and launch it at once,
        sampling included, before `pending`'s tokens reach the host (step overlap). Every row
        samples; the sampler reads each request's state now, so the caller launches ahead
        only rows whose sampling does not depend on the token `pending` is sampling (no
        penalties, min_tokens reached). None when the batch cannot run as a graph."""
        ahead = self._stage_ahead(rows, pending)
        if ahead is None:
            return None
        self.launched_ahead += 1
        logits = self.cuda_graphs.replay(ahead[1])
        reqs = [r.request for r in rows]
        return PendingStep(reqs, self.sampler.launch(logits, [SamplingRow.from_request(r) for r in reqs]))

    def _stage_ahead(self, rows: list[DecodeRow], pending: PendingStep) -> tuple[tuple, StagedDecode] | None:
        graphs = self.cuda_graphs
        if graphs is None or pending.sample is None:
            return None
        bs = self.block_size
        tables = [self.kv.block_table(r.request.request_id) for r in rows]
        if not graphs.can_run(len(rows), max(len(t) for t in tables)):
            return None
        positions = [r.position for r in rows]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        seq_lens = [p + 1 for p in positions]
        row_of = {r.request_id: i for i, r in enumerate(pending.requests)}
        rids = [r.request.request_id for r in rows]
        src = [row_of[rid] for rid in rids]
        batch = DecodeBatch([0] * len(rows), positions, slots, seq_lens, tables)
        staged = graphs.stage(batch, (pending.sample.token_ids, src))
        return (rids, positions, slots, seq_lens, tables), staged
