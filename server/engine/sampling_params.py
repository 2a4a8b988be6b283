"""Per-request sampling parameters.

A msgspec Struct so it crosses process boundaries (router -> worker) as msgpack, never pickle.
Validation lives here, once: the API layer turns a `ValueError` from `validate()` into a 400.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

# Seeds torch's generators take (and msgpack carries): [-2**63, 2**64).
SEED_MIN, SEED_END = -(2**63), 2**64


def copy_seed(seed: int, i: int) -> int:
    """The seed of copy `i` of an n > 1 request (vLLM's seed + i), wrapped into the seed range."""
    s = seed + i
    return s - SEED_END if s >= SEED_END else s


def check_token_ids(what: str, ids: Iterable[int], vocab_size: int) -> None:
    """ValueError naming up to five of `ids` outside [0, vocab_size): the one vocabulary check
    of the API, the engine and these parameters."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} {bad[:5]} are outside the vocabulary [0, {vocab_size}).")


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # 1 disables
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0  # 0 disables
    seed: int | None = None  # per-request generator: same output whatever else is batched
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 disables (HF / CTRL semantics)
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k >= 0: sampled token's logprob + top-k alternatives
    # None: none; k >= 0: each prompt token's logprob given the tokens before it, + top-k
    # alternatives (the first prompt token has none). The prompt is then computed in full,
    # never served from the prefix cache: cached positions have no logits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # token id -> added to its logit before sampling (OpenAI's logit_bias: -100 bans, +100
    # forces). The returned logprobs stay those of the raw logits, as every other adjustment.
    logit_bias: dict[int, float] = {}
    # vLLM's: only these token ids may be sampled (empty: any). Logprobs stay the raw logits'.
    allowed_token_ids: list[int] = []

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError with a user-facing message if any field is out of range."""
        if self.seed is not None and not SEED_MIN <= self.seed < SEED_END:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})."
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or at least 0, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}."
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}.")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}.")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty.")
        for s in self.stop:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"stop string {s!r} is not valid Unicode: {e.reason}.") from None
        bad_bias = [b for b in self.logit_bias.values() if not -100.0 <= b <= 100.0]
        if bad_bias:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bad_bias[:5]}.")
        if vocab_size is not None:
            check_token_ids("stop_token_ids", self.stop_token_ids, vocab_size)
            check_token_ids("allowed_token_ids", self.allowed_token_ids, vocab_size)
            check_token_ids("logit_bias token ids", self.logit_bias, vocab_size)
