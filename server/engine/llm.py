"""Offline inference: `LLM(...).generate(prompts, params)` runs the engine to completion in
this process. Used by `pdserve generate`, the tests and the benchmarks."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from server.engine.engine import EngineConfig, EngineCore
from server.engine.output_processor import RequestState, TextDelta
from server.engine.outputs import TokenLogprobs
from server.engine.sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # SamplingParams.prompt_logprobs: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class LLM:
    def __init__(self, config: EngineConfig | None = None, **overrides) -> None:
        config = config or EngineConfig()
        for k, v in overrides.items():
            setattr(config, k, v)
        self.engine = EngineCore(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        return list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _submit(self, prompt: Prompt, params: SamplingParams) -> tuple[str, RequestState]:
        rid = f"offline-{next(self._ids)}"
        ids = self.encode(prompt)
        self.engine.add_request(rid, ids, params)
        return rid, RequestState(self.tokenizer, ids, params)

    def _drive(self, states: dict[str, RequestState]) -> Iterator[tuple[str, TextDelta]]:
        live = set(states)
        while live:
            for out in self.engine.step():
                st = states.get(out.request_id)
                if st is None or out.request_id not in live:
                    continue
                delta = st.step(out)
                if delta.stopped_by_string:
                    self.engine.abort([out.request_id])
                if st.finished:
                    live.discard(out.request_id)
                yield out.request_id, delta

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run all prompts as one continuous batch; results in prompt order."""
        plist = params if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        states = dict(self._submit(p, sp) for p, sp in zip(prompts, plist, strict=True))
        for _ in self._drive(states):
            pass
        return [
            Completion(rid, st.prompt_token_ids, st.token_ids, st.text, st.finish_reason,
                       st.stop_reason, st.num_cached_tokens, st.logprobs, st.prompt_logprobs)
            for rid, st in states.items()
        ]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[TextDelta]:
        rid, st = self._submit(prompt, params or SamplingParams())
        for _, delta in self._drive({rid: st}):
            yield delta
