"""What the engine hands back after each step: token deltas, never text.

Detokenization and stop strings live in the front end (`server/engine/output_processor.py`),
so a worker emits only integers and these structs travel as msgpack.
"""

from __future__ import annotations

import msgspec


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities for one position: of the generated token (raw model distribution,
    before penalties and temperature: vLLM v1's default) or of a prompt token given the tokens
    before it. `top_token_ids` / `top_logprobs` hold the k most likely tokens, most likely first
    (k = SamplingParams.logprobs / prompt_logprobs)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top_token_ids: list[int]
    top_logprobs: list[float]


class RequestOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's progress in one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id (a stop string is found later)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    timings: RequestTimings | None = None  # set on the final output only
    # SamplingParams.prompt_logprobs: one entry per prompt token (None for the first), on the
    # output that carries the first generated token only
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestTimings(msgspec.Struct, array_like=True):
    """Worker-side timestamps (time.monotonic() of the worker process) of a finished request;
    only differences are meaningful across processes."""

    arrival: float
    first_scheduled: float
    first_token: float
    finished: float
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float:
        return self.first_scheduled - self.arrival

    @property
    def prefill_time(self) -> float:
        return self.first_token - self.first_scheduled

    @property
    def decode_time(self) -> float:
        return self.finished - self.first_token


class EngineStats(msgspec.Struct):
    """A snapshot of one engine for gauges and counters (cumulative counters never reset)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks referenced by requests, 0..1
    num_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # tokens looked up (cumulative)
    prefix_cache_hits: int  # tokens found (cumulative)
    num_preemptions: int  # cumulative
    prompt_tokens: int  # cumulative prompt tokens of admitted requests
    generation_tokens: int  # cumulative generated tokens
    num_remote_waiting: int = 0  # requests whose prompt KV is on its way from a prefill worker
    remote_reserved_blocks: int = 0  # blocks those requests hold
    num_lease_expiries: int = 0  # cumulative: remote KV that never came (prefilled locally)
