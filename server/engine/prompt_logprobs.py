"""Prompt logprobs (`SamplingParams.prompt_logprobs`): the log-probability of each prompt token
given the tokens before it. These are the teacher-forced scores an evaluation harness reads
(`echo` + `logprobs` on /v1/completions, vLLM's `prompt_logprobs`).

A step's forward pass already computes the hidden state of every prompt position it prefills.
For the requests that asked, this module takes those rows' logits in slices of at most
`max_rows` rows (`logit_slice_rows`: what fits in the memory the step's own activations took).
Per row it computes the log-softmax, the logprob and rank of the prompt token that follows, and
the top k. All of that stays on the device; one device->host copy follows, behind an event.
The row at position p scores prompt token p + 1. The prompt's last position scores nothing
here: it samples the first output token (the sampler's job).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from server.engine.host_copy import HostCopy, device_tensor
from server.engine.outputs import TokenLogprobs
from server.engine.request import Request
from server.engine.sampler import logprob_fields, pack_fields, unpack_logprobs
from server.engine.scheduler import ScheduledRequest

# Bytes a row of logits takes while it is scored, per vocabulary entry: the lm_head's output
# in the model dtype (<= 2), its float32 copy, the float32 log-softmax, the rank's comparison.
_LOGIT_ROW_BYTES_PER_ENTRY = 2 + 4 + 4 + 1


def logit_slice_rows(max_num_seqs: int, max_num_batched_tokens: int, intermediate_size: int,
                     vocab_size: int) -> int:  # fmt: skip
    """Rows of logits scored at a time. The KV cache was sized after a full step's peak: its
    MLP alone held >= 3 x intermediate_size values (gate|up out, SiLU·mul out) a token in the
    model dtype, and the sampler's max_num_seqs rows of logits. A slice of that size fits in
    the same memory. A larger slice re-reads the lm_head weight fewer times: at 64 rows the
    lm_head's GEMM is bound by that read (1 GB on Llama-3-8B), at a few hundred by its FLOPs."""
    mlp_bytes = max_num_batched_tokens * 3 * intermediate_size * 2
    return max(max_num_seqs, 1, mlp_bytes // (_LOGIT_ROW_BYTES_PER_ENTRY * vocab_size))


class PromptRows(NamedTuple):
    """Rows [first_row, first_row + count) of a step's packed batch hold the request's prompt
    positions first_position, first_position + 1, ...: each scores the prompt token after it."""

    request: Request
    first_row: int
    first_position: int
    count: int


def prompt_rows(scheduled: Sequence[ScheduledRequest], starts: Sequence[int]) -> list[PromptRows]:
    """The rows of this step that score prompt tokens. `starts[i]` is the first packed row
    of `scheduled[i]`."""
    jobs = []
    for i, (req, n) in enumerate(scheduled):
        if req.prompt_logprobs is None:
            continue
        first = req.num_computed_tokens
        end = min(first + n, req.num_prompt_tokens - 1)
        if end > first:
            jobs.append(PromptRows(req, starts[i], first, end - first))
    return jobs


class PendingPromptLogprobs:
    """Prompt logprobs computed on the device, not yet on the host."""

    def __init__(self, jobs: list[PromptRows], flat: torch.Tensor, targets: list[int], k_max: int) -> None:
        self._jobs = jobs
        self._targets = targets
        self._k_max = k_max
        self._host = HostCopy(flat)

    def result(self) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        """request id -> (index of the first prompt token scored, its logprobs and the next
        ones'); waits for the device."""
        flat = self._host.get()
        ks = [min(j.request.sampling_params.prompt_logprobs or 0, self._k_max)
              for j in self._jobs for _ in range(j.count)]  # fmt: skip
        lps = unpack_logprobs(flat, self._targets, ks, self._k_max)
        out, at = {}, 0
        for j in self._jobs:
            out[j.request.request_id] = (j.first_position + 1, lps[at : at + j.count])
            at += j.count
        return out


def launch_prompt_logprobs(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    jobs: list[PromptRows],
    device: torch.device,
    max_rows: int,
) -> PendingPromptLogprobs:
    """Queue the logprobs of `jobs`' rows. `logits_of(rows)` -> float logits [len(rows), V] of
    those packed rows (the lm_head over their hidden states)."""
    rows: list[int] = []
    targets: list[int] = []
    for j in jobs:
        rows.extend(range(j.first_row, j.first_row + j.count))
        prompt = j.request.prompt_token_ids
        targets.extend(prompt[j.first_position + 1 : j.first_position + 1 + j.count])
    rows_t = device_tensor(rows, torch.int64, device)
    targets_t = device_tensor(targets, torch.int64, device)
    k_max = max(j.request.sampling_params.prompt_logprobs or 0 for j in jobs)
    slices, k = [], 0
    for at in range(0, len(rows), max(max_rows, 1)):
        logits = logits_of(rows_t[at : at + max_rows])
        k = min(k_max, logits.shape[1])  # capped at the vocabulary, as the sampler's
        slices.append(logprob_fields(logits, targets_t[at : at + max_rows], k))
    return PendingPromptLogprobs(jobs, pack_fields(slices), targets, k)
