"""Engine `TokenLogprobs` -> the two OpenAI logprobs shapes.

Completions (legacy): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; each
top_logprobs entry maps token text -> logprob for the k most likely tokens plus the sampled
one (so up to k + 1 entries, as OpenAI documents). Echoed prompt tokens carry the engine's
prompt logprobs (null for the first token).
vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob, rank,
decoded_token}} for the prompt token and the k most likely.
Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [k x {token, logprob, bytes}]}]}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from server.engine.outputs import TokenLogprobs

TokenText = Callable[[int], str]


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number. -9999.0 is what OpenAI itself sends.
    return x if x > -9999.0 else -9999.0


class CompletionLogprobs:
    """Accumulates the completions-API logprobs of one choice; `text_offset` runs on across
    calls so streamed chunks and the final response agree."""

    def __init__(self, token_text: TokenText, start_offset: int = 0) -> None:
        self.token_text = token_text
        self.offset = start_offset

    def prompt(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[TokenLogprobs | None] | None = None,
        k: int = 0,
    ) -> dict[str, Any]:
        """The echoed prompt: with the engine's prompt logprobs, each token's logprob and top
        `k` (the first token's are null: nothing precedes it); without them, all null."""
        tokens = [self.token_text(t) for t in token_ids]
        lps: list[float | None] = [None] * len(tokens)
        tops: list[dict[str, float] | None] = [None] * len(tokens)
        for i, lp in enumerate(logprobs or []):
            if lp is not None:
                lps[i] = _finite(lp.logprob)
                tops[i] = self._top(lp, k)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": self._offsets(tokens),
        }

    def _top(self, lp: TokenLogprobs, k: int) -> dict[str, float]:
        """The k most likely tokens' text -> logprob, plus the scored token itself."""
        top = {
            self.token_text(t): _finite(v)
            for t, v in zip(lp.top_token_ids[:k], lp.top_logprobs[:k], strict=True)
        }
        top.setdefault(self.token_text(lp.token_id), _finite(lp.logprob))
        return top

    def generated(self, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        tokens, lps, tops = [], [], []
        for lp in logprobs:
            tokens.append(self.token_text(lp.token_id))
            lps.append(_finite(lp.logprob))
            tops.append(self._top(lp, len(lp.top_token_ids)))
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": self._offsets(tokens),
        }

    def _offsets(self, tokens: list[str]) -> list[int]:
        out = []
        for t in tokens:
            out.append(self.offset)
            self.offset += len(t)
        return out


def merge_completion_logprobs(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for part in parts:
        for key, values in merged.items():
            values.extend(part[key])
    return merged


def chat_logprobs(token_text: TokenText, logprobs: Sequence[TokenLogprobs]) -> list[dict[str, Any]]:
    """The `logprobs.content` entries for the given generated tokens."""
    content = []
    for lp in logprobs:
        text = token_text(lp.token_id)
        content.append(
            {
                "token": text,
                "logprob": _finite(lp.logprob),
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": (tt := token_text(t)),
                        "logprob": _finite(v),
                        "bytes": list(tt.encode()),
                    }
                    for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)
                ],
            }
        )
    return content


def vllm_prompt_logprobs(
    token_text: TokenText, logprobs: Sequence[TokenLogprobs | None] | None, k: int
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs` list: the prompt token's entry (its rank) and the top k's."""
    if logprobs is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for lp in logprobs:
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(t): {"logprob": _finite(v), "rank": r, "decoded_token": token_text(t)}
            for r, (t, v) in enumerate(zip(lp.top_token_ids[:k], lp.top_logprobs[:k], strict=True), 1)
        }
        entry[str(lp.token_id)] = {
            "logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": token_text(lp.token_id),
        }  # fmt: skip
        out.append(entry)
    return out
