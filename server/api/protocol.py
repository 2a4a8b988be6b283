"""OpenAI request bodies (pydantic), and their translation into `SamplingParams`.

Field names, defaults and ranges follow the OpenAI API plus vLLM's extras (top_k, min_p,
repetition_penalty, stop_token_ids, ignore_eos, min_tokens, ...). Unknown fields are accepted
and ignored, as vLLM does (`unknown_fields()` lists them so the handler can log them at debug
level), except those that would constrain the output in ways this server does not implement
(guided decoding, tool calls: `UNSUPPORTED`, `response_format`, `tools`): those are a 400.
Type errors are pydantic's (HTTP 400 via `server/api/errors.py`); range errors are
`SamplingParams.validate`'s, in one place.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from server.engine.sampling_params import SamplingParams

# Upper bound on fan-out per API request; more would only queue behind itself.
MAX_N = 128
# Fields (OpenAI's or vLLM's) that constrain the output in ways this server does not implement:
# a 400, not silence. `response_format` and `tools` have allowed values, checked in `check`.
UNSUPPORTED = ("functions", "function_call", "guided_json", "guided_regex", "guided_choice",
               "guided_grammar", "structured_outputs", "bad_words")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False
    # vLLM's: with include_usage, every chunk also carries its choice's usage so far
    continuous_usage_stats: bool | None = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    best_of: int | None = None
    # vLLM's extension: each prompt token's logprob (+ the top k) given the tokens before it
    prompt_logprobs: int | None = None
    # OpenAI: token id (as a JSON object key, a string) -> bias in [-100, 100]
    logit_bias: dict[str, float] | None = None
    # vLLM's: sample only from these token ids
    allowed_token_ids: list[StrictInt] | None = None
    # vLLM's: keep only the prompt's last k tokens (after the chat template)
    truncate_prompt_tokens: int | None = Field(None, ge=1)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        """Each streamed chunk carries its choice's usage so far (vLLM's continuous_usage_stats,
        which takes effect with include_usage, as there)."""
        return self.include_usage() and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def check(self) -> None:
        """Cross-field rules pydantic's types cannot say; ValueError is a 400."""
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n).")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options may only be set when stream is true.")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not available when stream is true.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty (leave it out to allow every token).")
        extra = self.model_extra or {}
        unsupported = [f for f in UNSUPPORTED if extra.get(f) is not None]
        if unsupported:
            raise ValueError(f"{unsupported[0]} is not supported: this server has no guided "
                             "decoding, bad-words filter or tool-call parsing, and ignoring it "
                             "would return output that does not follow it.")
        fmt = extra.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise ValueError("response_format is not supported (only {\"type\": \"text\"}): this "
                             "server has no guided decoding.")
        if extra.get("tools") and extra.get("tool_choice") != "none":
            raise ValueError("tools are not supported (only with tool_choice \"none\"): this server "
                             "does not parse tool calls.")

    def logit_bias_ids(self) -> dict[int, float]:
        """logit_bias with integer token ids; ValueError for a key that is not one."""
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                out[int(key)] = bias
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}.") from None
        return out

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        vocab_size: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """`max_tokens` is already resolved against the context; `prompt_logprobs` is what the
        engine computes (the request's own, or what echo needs); raises ValueError when a value
        is out of range."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        p = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=_or(self.temperature, 1.0),
            top_p=_or(self.top_p, 1.0),
            top_k=_top_k(self.top_k, vocab_size),
            min_p=_or(self.min_p, 0.0),
            seed=self.seed,
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, 1.0),
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.logit_bias_ids(),
            allowed_token_ids=list(self.allowed_token_ids or []),
        )
        p.validate(vocab_size)
        return p


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _top_k(top_k: int | None, vocab_size: int | None) -> int:
    """top_k as the engine takes it: a k at least the vocabulary keeps every token, as 0
    does, so it becomes 0 (a k past 2**64 cannot even cross to the worker as msgpack)."""
    if top_k is None or top_k >= (vocab_size or 2**31):
        return 0
    return top_k


class CompletionRequest(_SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of token-id lists (ids are
    # strict: true / false are not token ids).
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise ValueError("suffix is not supported.")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo: scores the prompt).")

    @property
    def scores_only(self) -> bool:
        """echo with max_tokens 0 (OpenAI's legacy way to score a prompt): the prompt and its
        logprobs come back, no completion (the engine samples one token; it is dropped)."""
        return self.echo and self.max_tokens == 0

    def engine_prompt_logprobs(self) -> int | None:
        """The prompt logprobs the engine must compute: `prompt_logprobs`, and with `echo` +
        `logprobs` the echoed prompt's own (the top `logprobs`), as OpenAI's legacy API did."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true.")

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    # with messages: the prompt chat would build from the same fields (vLLM's tokenize)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        if self.messages is not None and self.prompt is not None:
            raise ValueError("send either prompt or messages, not both.")
        if self.messages is None and self.prompt is None:
            raise ValueError("send either prompt or messages.")


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]
