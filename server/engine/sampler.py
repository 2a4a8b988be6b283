"""Batched sampler: logits [N, V] -> one token id (and, on request, its logprobs) per row.

Pipeline; each step runs only when some row of the batch needs it, so an all-greedy batch with no
penalties costs one argmax:

  0. allowed_token_ids: every other token -> -inf; then logit_bias: each row's biases added
     to their tokens' logits.
  1. min_tokens: EOS and stop token ids -> -inf until the row has generated min_tokens tokens.
  2. penalties: repetition (HF/CTRL, over prompt + output tokens), then frequency and presence
     (OpenAI, over output tokens).
  3. greedy rows (temperature ~ 0): argmax of the penalized logits.
  4. other rows: temperature, top-k, top-p, min-p, then the exponential race
     argmax(probs / E) with E ~ Exp(1) i.i.d., an exact draw from probs (as in gpt-fast).
  5. logprobs: from the log_softmax of the RAW logits (vLLM v1's default).

All math is float32 on the logits' device (the logits come in the model's dtype: each step that
changes them works on a float32 copy, and an all-greedy batch with no processing takes the argmax
of the logits as they are, which a widening cast cannot change); results reach the host in one
device->host copy, queued at launch.
`launch` queues the device work and returns at once (the few host->device copies of per-row
parameters are pinned and non-blocking), `PendingSample.result()` is the step's one sync: the
engine prepares its next step in between.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from kernels import ops
from server.engine.host_copy import HostCopy, device_tensor, to_device
from server.engine.outputs import TokenLogprobs
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams

# Temperatures below this are greedy: dividing float32 logits by a smaller one can overflow to
# inf, and softmax turns inf into NaN. Same threshold as vLLM.
_GREEDY_EPS = 1e-5
# Smallest uniform draw: keeps the Exp(1) noise -log(U) finite (at most ~87.3).
_TINY = torch.finfo(torch.float32).tiny
# Seeded rows' CPU draws go to a thread pool from this many values per step (~1 ms of RNG) on.
_POOL_MIN_DRAWS = 1 << 18


class SamplingRow(NamedTuple):
    """What the sampler needs to know about one row of the logits."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]  # for repetition_penalty
    output_token_ids: Sequence[int]  # for penalties and min_tokens
    generator: torch.Generator | None = None  # per-request seeded; None = the sampler's own
    eos_token_ids: frozenset[int] = frozenset()

    @classmethod
    def from_request(cls, req: Request) -> SamplingRow:
        return cls(
            params=req.sampling_params,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids,
            generator=req.generator,
            eos_token_ids=req.eos_token_ids,
        )

    @property
    def greedy(self) -> bool:
        return self.params.temperature < _GREEDY_EPS


class SamplerOutput(NamedTuple):
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # one per row; None where params.logprobs is None


class PendingSample:
    """Tokens sampled on the device, not yet on the host. On CUDA the device->host copy of
    the tokens (and logprobs) is queued at once into pinned memory behind an event, so
    `result()` waits for this step only, not for work queued on the stream after it (the
    engine may launch the next step first)."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        self.token_ids = tokens  # [N] int64 on the logits' device
        self._rows = rows
        if not rows:
            return
        payload, self._layout = _payload(logits, tokens, rows)
        self._host = HostCopy(payload)

    def result(self) -> SamplerOutput:
        """Token ids (and logprobs) on the host; waits for the device."""
        if not self._rows:
            return SamplerOutput([], [])
        # SYNC: the step's one wait for the device
        return _parse(self._host.get(), self._rows, self._layout)


class Sampler:
    """Samples one token per row of a logits batch.

    `seed` seeds the generator shared by rows without their own generator (one per device,
    created on first use); None seeds it from system entropy.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pool: ThreadPoolExecutor | None = None  # for seeded rows' CPU draws; lazy

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits: [N, V], any float dtype, any device; rows: N entries, row i for logits[i]."""
        return self.launch(logits, rows).result()

    def launch(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> PendingSample:
        """`__call__` without waiting for the device: the tokens stay there until `result()`."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"expected logits [N, V] with N = len(rows) = {len(rows)}, got {tuple(logits.shape)}"
            )
        n = len(rows)
        if n == 0:
            return PendingSample(logits, torch.empty(0, dtype=torch.int64, device=logits.device), rows)

        # Every step below is out-of-place, so the caller's logits (also needed raw for logprobs)
        # are never modified; a step that acts widens them to float32 first (`.float()` aliases
        # float32 input), one that does not returns them as they are.
        x = _keep_allowed_tokens(logits, rows)
        x = _apply_logit_bias(x, rows)
        x = _mask_until_min_tokens(x, rows)
        x = _apply_penalties(x, rows)

        random_rows = [i for i, row in enumerate(rows) if not row.greedy]
        if not random_rows:
            tokens = ops.argmax(x)
        elif len(random_rows) == n:
            tokens = self._sample(x, rows)
        else:
            idx = device_tensor(random_rows, torch.int64, x.device)
            sampled = self._sample(x.index_select(0, idx), [rows[i] for i in random_rows])
            # argmax over all N rows is cheaper than gathering the greedy ones first.
            tokens = ops.argmax(x).index_copy(0, idx, sampled)
        return PendingSample(logits, tokens, rows)

    def _sample(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """x: [M, V] penalized logits of non-greedy rows (any float dtype) -> [M] int64 token ids."""
        x = x.float()
        vocab = x.shape[1]
        device = x.device

        temperatures = [row.params.temperature for row in rows]
        if any(t != 1.0 for t in temperatures):
            x = x / _column(temperatures, device)

        top_k = [row.params.top_k if 0 < row.params.top_k < vocab else vocab for row in rows]
        top_p = [row.params.top_p for row in rows]
        need_k = any(k < vocab for k in top_k)
        need_p = any(p < 1.0 for p in top_p)
        if need_k or need_p:
            x = _apply_top_k_top_p(
                x,
                device_tensor(top_k, torch.int64, device) if need_k else None,
                device_tensor(top_p, torch.float32, device) if need_p else None,
            )

        probs = torch.softmax(x, dim=-1)
        min_p = [row.params.min_p for row in rows]
        if any(p > 0.0 for p in min_p):
            # The max-prob token always survives; no renormalization needed, since the
            # exponential race below is invariant to scaling a row.
            threshold = _column(min_p, device) * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)

        return ops.argmax(probs / self._exponential_noise(rows, vocab, device))

    def _exponential_noise(
        self, rows: Sequence[SamplingRow], vocab: int, device: torch.device
    ) -> torch.Tensor:
        """Exp(1) noise, [len(rows), V] float32 on `device`, as -log(U) with U ~ Uniform(0, 1)."""
        # Uniform draws, not exponential_: on CPU exponential_ is several times slower, and the
        # seeded rows below draw on CPU.
        u = torch.empty(len(rows), vocab, device=device)
        seeded = [(i, g) for i, row in enumerate(rows) if (g := row.generator) is not None]
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if not seeded:
            u.uniform_(generator=self._shared_generator(device))
        else:
            own = self._draw_seeded([g for _, g in seeded], vocab)
            u.index_copy_(0, device_tensor([i for i, _ in seeded], torch.int64, device), to_device(own, device))
            if shared:
                draw = torch.empty(len(shared), vocab, device=device)
                draw.uniform_(generator=self._shared_generator(device))
                u.index_copy_(0, device_tensor(shared, torch.int64, device), draw)
        # U = 0 would give infinite noise: probs / noise = 0 for that token, which a row with a
        # single surviving token (top_k = 1, say) would then lose to a masked one.
        return u.clamp_min_(_TINY).log_().neg_()

    def _draw_seeded(self, generators: Sequence[torch.Generator], vocab: int) -> torch.Tensor:
        """Uniform(0, 1) draws, [len(generators), V] float32 on CPU, row j from generators[j].

        Each seeded row draws V values from its own (CPU) generator whatever else is batched:
        same seed and step -> same noise -> same token, on any device. CPU RNG is the slow part
        (~1 ms per 128k-vocab row), so rows are drawn on a thread pool: uniform_ releases the GIL
        and each generator is used by one thread only, which keeps every row's draw deterministic.
        """
        out = torch.empty(len(generators), vocab)

        def draw(j: int) -> None:
            out[j].uniform_(generator=generators[j])

        # Small draws are not worth a thread handoff, and a generator shared by two rows would be
        # advanced in a racy order: both are drawn in row order.
        distinct = len({id(g) for g in generators}) == len(generators)
        if len(generators) * vocab < _POOL_MIN_DRAWS or not distinct:
            for j in range(len(generators)):
                draw(j)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="sampler-rng"
                )
            list(self._pool.map(draw, range(len(generators))))
        return out

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-row scalars as a [len(values), 1] float32 column, to broadcast over [N, V]."""
    return device_tensor(values, torch.float32, device).unsqueeze(1)


def _keep_allowed_tokens(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """-inf for every token outside a row's allowed_token_ids (rows without: untouched).
    x: [N, V], not modified; the result is float32 unless x is returned as it is."""
    limited = [i for i, row in enumerate(rows) if row.params.allowed_token_ids]
    if not limited:
        return x
    x = x.float()
    keep = torch.ones_like(x, dtype=torch.bool)
    rows_idx = device_tensor(limited, torch.int64, x.device)
    keep.index_fill_(0, rows_idx, False)
    row_idx = [i for i in limited for _ in rows[i].params.allowed_token_ids]
    col_idx = [t for i in limited for t in rows[i].params.allowed_token_ids]
    index = (device_tensor(row_idx, torch.int64, x.device), device_tensor(col_idx, torch.int64, x.device))
    keep.index_put_(index, torch.ones((), dtype=torch.bool, device=x.device))
    return x.masked_fill(~keep, float("-inf"))


def _apply_logit_bias(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Add each row's logit_bias to its tokens' logits. x: [N, V], not modified; the result is
    float32 unless x is returned as it is."""
    row_idx: list[int] = []
    col_idx: list[int] = []
    bias: list[float] = []
    for i, row in enumerate(rows):
        for token, b in row.params.logit_bias.items():
            row_idx.append(i)
            col_idx.append(token)
            bias.append(b)
    if not row_idx:
        return x
    index = (device_tensor(row_idx, torch.int64, x.device), device_tensor(col_idx, torch.int64, x.device))
    return x.float().index_put(index, device_tensor(bias, torch.float32, x.device), accumulate=True)


def _mask_until_min_tokens(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Set EOS and stop token ids to -inf in rows below min_tokens. x: [N, V], not modified; the
    result is float32 unless x is returned as it is.

    ignore_eos does not lift this (it only means "do not stop on EOS"), as in vLLM.
    """
    vocab = x.shape[1]
    row_idx: list[int] = []
    col_idx: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens:
            # Ids outside the logits cannot be sampled anyway; indexing with them would fail.
            banned = {
                t
                for t in itertools.chain(row.eos_token_ids, row.params.stop_token_ids)
                if 0 <= t < vocab
            }
            row_idx.extend([i] * len(banned))
            col_idx.extend(banned)
    if not row_idx:
        return x
    index = (device_tensor(row_idx, torch.int64, x.device), device_tensor(col_idx, torch.int64, x.device))
    return x.float().index_put(index, torch.full((), float("-inf"), device=x.device))


def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, then frequency and presence penalties. x: [N, V], not modified -> [N, V]
    float32 (x itself where no row is penalized)."""
    repetition = [row.params.repetition_penalty for row in rows]
    frequency = [row.params.frequency_penalty for row in rows]
    presence = [row.params.presence_penalty for row in rows]
    penalized = [
        r != 1.0 or f != 0.0 or p != 0.0
        for r, f, p in zip(repetition, frequency, presence, strict=True)
    ]
    if not any(penalized):
        return x
    x = x.float()
    vocab = x.shape[1]
    device = x.device

    # Rows without penalties contribute no tokens: less to copy and scatter.
    output_counts = _token_counts(
        [row.output_token_ids if pen else () for row, pen in zip(rows, penalized, strict=True)],
        vocab,
        device,
    )
    if any(r != 1.0 for r in repetition):
        prompt_counts = _token_counts(
            [
                row.prompt_token_ids if r != 1.0 else ()
                for row, r in zip(rows, repetition, strict=True)
            ],
            vocab,
            device,
        )
        seen = (prompt_counts + output_counts) > 0
        penalty = _column(repetition, device)
        # CTRL: push a seen token's logit toward "less likely" whatever its sign.
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    if any(f != 0.0 or p != 0.0 for f, p in zip(frequency, presence, strict=True)):
        x = (
            x
            - _column(frequency, device) * output_counts
            - _column(presence, device) * (output_counts > 0)
        )
    return x


def _token_counts(
    token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """Occurrences of each token id per row: [len(token_lists), V] float32 on `device`."""
    n = len(token_lists)
    counts = torch.zeros(n, vocab, dtype=torch.float32, device=device)
    lengths = [len(tokens) for tokens in token_lists]
    total = sum(lengths)
    if total == 0:
        return counts
    # One flat list and one scatter_add for the whole ragged batch: (row, id) -> row * V + id.
    # np.fromiter: ~4x faster than torch.tensor(list) on the Python ints of long prompts.
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)
    ids = torch.from_numpy(flat)
    # output_size: without it repeat_interleave first computes the size itself, ~1000x slower.
    row_of = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths), output_size=total)
    valid = (ids >= 0) & (ids < vocab)  # an id outside the logits has no logit to penalize
    flat_index = to_device((row_of * vocab + ids)[valid], device)
    counts.view(-1).scatter_add_(0, flat_index, torch.ones(flat_index.shape, device=device))
    return counts


def _apply_top_k_top_p(
    x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus; one sort.

    x: [M, V] float32; top_k: [M] int64 in [1, V] (V = off); top_p: [M] float32 in (0, 1]
    (1 = off). Ties with the k-th logit are all kept. The nucleus is the smallest set of most
    likely tokens (after top-k) whose probability reaches top_p.
    """
    vocab = x.shape[1]
    # Ascending, so that "top_p = 1" masks nothing but zero-probability tokens even with
    # rounding in the cumulative sum, and rows with k = V index column 0 (the minimum).
    x_sorted, order = x.sort(dim=-1, descending=False)
    if top_k is not None:
        kth_largest = x_sorted.gather(1, (vocab - top_k).unsqueeze(1))
        x_sorted = x_sorted.masked_fill(x_sorted < kth_largest, float("-inf"))
    if top_p is not None:
        # Token j is outside the nucleus iff the tokens above it already carry >= top_p,
        # i.e. the mass up to and including it is <= 1 - top_p.
        cumulative = torch.softmax(x_sorted, dim=-1).cumsum(dim=-1)
        outside = cumulative <= (1.0 - top_p).unsqueeze(1)
        outside[:, -1] = False  # the most likely token always stays
        x_sorted = x_sorted.masked_fill(outside, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, x_sorted)


def logprob_fields(raw: torch.Tensor, chosen: torch.Tensor, k_max: int) -> list[torch.Tensor]:
    """For raw logits [M, V] and one chosen token per row [M]: the chosen token's logprob [M],
    its rank [M] (1 = most likely; tokens tied with it do not count) and, if k_max > 0, the
    k_max most likely tokens' ids and logprobs [M, k_max], most likely first. All float64: it
    holds int64 ids / ranks (< 2**53) and float32 logprobs exactly, so `pack_fields` makes one
    tensor for one device->host copy."""
    logprobs = torch.log_softmax(raw.float(), dim=-1)  # [M, V]
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))  # [M, 1]
    rank = (logprobs > chosen_lp).sum(dim=-1) + 1
    fields = [chosen_lp.squeeze(1).double(), rank.double()]
    if k_max > 0:
        top_lp, top_ids = logprobs.topk(k_max, dim=-1)
        fields += [top_ids.double(), top_lp.double()]
    return fields


def pack_fields(slices: Sequence[list[torch.Tensor]]) -> torch.Tensor:
    """`logprob_fields` of consecutive row slices, as one flat tensor, field by field."""
    return torch.cat([torch.cat([s[f] for s in slices]).flatten() for f in range(len(slices[0]))])


def unpack_logprobs(
    flat: torch.Tensor, token_ids: Sequence[int], ks: Sequence[int], k_max: int
) -> list[TokenLogprobs]:
    """`pack_fields`' tensor (on the host) of M rows back into TokenLogprobs: row j scored
    `token_ids[j]` and keeps its top `ks[j]` (<= k_max) alternatives. Each field is converted
    by torch in one call (prompt logprobs unpack ~100k rows a step)."""
    m = len(token_ids)
    chosen_lps = flat[:m].tolist()
    ranks = flat[m : 2 * m].long().tolist()
    top_ids = flat[2 * m : 2 * m + m * k_max].long().view(m, k_max).tolist()
    top_lps = flat[2 * m + m * k_max :].view(m, k_max).tolist()
    if any(k != k_max for k in ks):
        top_ids = [row[:k] for row, k in zip(top_ids, ks, strict=True)]
        top_lps = [row[:k] for row, k in zip(top_lps, ks, strict=True)]
    return list(map(TokenLogprobs, token_ids, chosen_lps, ranks, top_ids, top_lps))


def _payload(
    logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow]
) -> tuple[torch.Tensor, tuple[list[int], int]]:
    """Everything the host needs from a sampled batch as one tensor (so one device->host
    copy): tokens [N] int64 alone, or, when some row wants logprobs (from the raw logits
    [N, V]), float64 [tokens, `logprob_fields` of those rows]. Also returns (rows with
    logprobs, top-k width) for `_parse`."""
    lp_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not lp_rows:
        return tokens, (lp_rows, 0)
    if len(lp_rows) == len(rows):
        raw, chosen = logits, tokens
    else:
        idx = device_tensor(lp_rows, torch.int64, logits.device)
        raw, chosen = logits.index_select(0, idx), tokens.index_select(0, idx)
    k_max = min(max(rows[i].params.logprobs or 0 for i in lp_rows), logits.shape[1])
    return torch.cat([tokens.double(), pack_fields([logprob_fields(raw, chosen, k_max)])]), (lp_rows, k_max)


def _parse(flat: torch.Tensor, rows: Sequence[SamplingRow], layout: tuple[list[int], int]) -> SamplerOutput:
    """`_payload`'s tensor, on the host, back into token ids and logprobs."""
    n = len(rows)
    lp_rows, k_max = layout
    if not lp_rows:
        return SamplerOutput(flat.tolist(), [None] * n)
    token_ids = flat[:n].long().tolist()
    # k_max is capped at the vocabulary
    ks = [min(rows[i].params.logprobs or 0, k_max) for i in lp_rows]
    lps = unpack_logprobs(flat[n:], [token_ids[i] for i in lp_rows], ks, k_max)
    out: list[TokenLogprobs | None] = [None] * n
    for i, lp in zip(lp_rows, lps, strict=True):
        out[i] = lp
    return SamplerOutput(token_ids, out)
