"""Front-end side of a request: token deltas in, text deltas out.

Shared by the offline `LLM` and the API/router process. The engine stops on EOS, stop token
ids and lengths; stop *strings* are found here, after detokenization, and the caller then
aborts the request in its engine (`RequestState.step` reports it via `TextDelta.finish_reason`).
"""

from __future__ import annotations

from typing import NamedTuple

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.outputs import RequestOutput, TokenLogprobs
from server.engine.sampling_params import SamplingParams
from server.models.tokenizer import Tokenizer


class TextDelta(NamedTuple):
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None
    stop_reason: int | str | None
    stopped_by_string: bool  # the front end finished it: the engine must be told to abort


class RequestState:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.detok = IncrementalDetokenizer(
            tokenizer,
            prompt_token_ids,
            stop=list(params.stop),
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
        )
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        # SamplingParams.prompt_logprobs: one per prompt token (None for the first), once known
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self, out: RequestOutput) -> TextDelta:
        """Apply one engine output. Tokens after a stop string are dropped."""
        if self.finished:
            return TextDelta("", [], None, self.finish_reason, self.stop_reason, False)
        self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        n_before = len(self.token_ids)
        self.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            self.logprobs.extend(out.new_logprobs)
        check_stop = len(self.token_ids) > self.params.min_tokens - 1 and bool(self.params.stop)
        text, stop_str = self.detok.step(out.new_token_ids, check_stop=check_stop)
        by_string = False
        if stop_str is not None:
            self.finish_reason, self.stop_reason, by_string = "stop", stop_str, True
        elif out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            text += self.detok.flush()
        self.text += text
        new_ids = self.token_ids[n_before:]
        new_lps = out.new_logprobs if out.new_logprobs else None
        return TextDelta(text, new_ids, new_lps, self.finish_reason, self.stop_reason, by_string)
