"""The engine's view of one request.

Token-centric state: `all_token_ids` (prompt + generated) and `num_computed_tokens`, the number
of leading tokens whose KV is in the cache. Scheduling a request means letting
`num_computed_tokens` catch up with `len(all_token_ids)`: prefill, chunked prefill, prefix-cache
hits, KV received from another worker and decode are all that one movement.
"""

from __future__ import annotations

import enum
import time

import torch

from server.engine.outputs import TokenLogprobs
from server.engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0  # not yet (or no longer: preempted) holding KV blocks
    RUNNING = 1
    FINISHED_STOPPED = 2  # EOS, stop token id or stop string
    FINISHED_LENGTH = 3  # max_tokens or the context limit
    FINISHED_ABORTED = 4

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 = not scheduled yet
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        # Disaggregation. Decode side: the prompt's KV comes from a prefill worker before
        # `remote_deadline` (time.monotonic()); until then the request holds reserved blocks and
        # is not scheduled. Prefill side: `keep_kv_on_finish` keeps the blocks after the first
        # token so they can be sent; the worker releases them when the transfer is done.
        self.remote_deadline: float | None = None
        self.keep_kv_on_finish = False
        # A remote prefill may still write into this request's blocks until this time
        # (lease + grace): its blocks are not returned to the pool before then.
        self.quarantine_until = 0.0
        self.remote_retried = False  # a second prefill worker was asked (see Scheduler.remote_retry)
        # Per-request generator: seeded requests draw their own noise, so their output does not
        # depend on which other requests share the batch.
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling_params.seed)
        # SamplingParams.prompt_logprobs: filled position by position as the prompt is computed
        # (recomputed after a preemption), handed out with the first token, then None.
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        if sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
