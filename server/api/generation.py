"""One API request's generation, from admission to release: the part completions and chat share.

`Generation` fans the request out into engine requests (one per prompt x `n`, all on one
worker so copies of a prompt share its prefix blocks), turns their token outputs into text
deltas (`server.engine.output_processor.RequestState`: detokenization and stop strings),
aborts a choice in its worker the moment a stop string ends it, feeds the request metrics,
and logs one line per finished choice.

Contract: call `start()` (raises `APIError` 429/503 when not admitted), then iterate
`updates()` once; its `finally` releases every engine request still open, so cancelling the
consumer (client disconnect) or breaking out of it frees the worker's blocks within one step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import msgspec

from router.cluster import Cluster, NoWorkerAvailable, RequestStream, StreamError
from server.api.context import ServerContext
from server.api.errors import APIError
from server.engine.output_processor import RequestState, TextDelta
from server.engine.outputs import RequestOutput, RequestTimings
from server.engine.sampling_params import SamplingParams, copy_seed
from server.frontend.prompts import Prompt
from server.metrics import RequestTracker

logger = logging.getLogger("server.api.requests")


class GenerationError(Exception):
    """The generation could not finish (engine refused a request, worker died)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Choice:
    """One engine request: one output `choices[index]` of the response."""

    __slots__ = (
        "index",
        "request_id",
        "prompt",
        "params",
        "state",
        "tracker",
        "done",
    )

    def __init__(
        self,
        index: int,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        state: RequestState,
    ) -> None:
        self.index = index
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.state = state
        self.tracker: RequestTracker | None = None
        self.done = False


class Update(NamedTuple):
    choice: Choice
    delta: TextDelta


class Generation:
    def __init__(
        self,
        ctx: ServerContext,
        request_id: str,
        prompts: list[Prompt],
        params: list[SamplingParams],
        n: int,
        arrival: float | None = None,
    ) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self.prompts = prompts
        self.n = n
        self.arrival = time.monotonic() if arrival is None else arrival
        self.choices: list[Choice] = []
        for p_index, (prompt, base) in enumerate(zip(prompts, params, strict=True)):
            for i in range(n):
                index = p_index * n + i
                # Seeded fan-out: each copy draws its own reproducible noise (vLLM: seed + i).
                p = base
                if base.seed is not None and i > 0:
                    p = msgspec.structs.replace(base, seed=copy_seed(base.seed, i))
                state = RequestState(ctx.tokenizer, prompt.token_ids, p)
                self.choices.append(Choice(index, f"{request_id}-{index}", prompt, p, state))
        self._by_id = {c.request_id: c for c in self.choices}
        self._open = len(self.choices)
        self.stream: RequestStream | None = None

    @property
    def cluster(self) -> Cluster:
        return self.ctx.cluster

    def start(self) -> None:
        """Admit and submit; raises APIError(429 | 503) with Retry-After when refused."""
        verdict = self.cluster.admission(len(self.choices), self.ctx.config.max_pending_requests)
        if not verdict.admitted:
            raise APIError(verdict.status, verdict.message, retry_after=verdict.retry_after)
        try:
            self.stream = self.cluster.submit(
                [(c.request_id, c.prompt.token_ids, c.params) for c in self.choices],
                arrival=self.arrival,
            )
        except NoWorkerAvailable as exc:
            raise APIError(503, f"{exc}; try again shortly.", retry_after=5) from None
        info = self.cluster.registry.workers.get(self.stream.worker_id)
        role = self.ctx.metrics.for_role(info.role if info else "both")
        for c in self.choices:
            c.tracker = RequestTracker(role, self.arrival)

    async def updates(self) -> AsyncIterator[list[Update]]:
        """Yield the text deltas of each batch of outputs until every choice has finished.

        Raises GenerationError when a choice fails; releases everything on exit."""
        assert self.stream is not None, "start() first"
        try:
            while self._open:
                items = await self.stream.get()
                now = time.monotonic()
                batch = []
                for item in items:
                    choice = self._by_id.get(item.request_id)
                    if choice is None or choice.done:
                        continue
                    if isinstance(item, StreamError):
                        self._finish(choice, "error", None, now)
                        raise GenerationError(item.status, item.message)
                    batch.append(Update(choice, self._apply(choice, item, now)))
                if batch:
                    yield coalesce(batch) if len(batch) > 1 else batch
        finally:
            self.close()

    async def run_to_end(self) -> None:
        """Consume every update (non-streaming responses read the final states)."""
        async for _ in self.updates():
            pass

    def close(self) -> None:
        """Abort whatever is still running; idempotent."""
        if self.stream is not None:
            self.cluster.release(self.stream)
        now = time.monotonic()
        for c in self.choices:
            if not c.done:
                self._finish(c, "abort", None, now)

    def _apply(self, choice: Choice, out: RequestOutput, now: float) -> TextDelta:
        delta = choice.state.step(out)
        assert choice.tracker is not None
        choice.tracker.on_tokens(
            len(out.new_token_ids), out.num_prompt_tokens, out.num_cached_tokens, now
        )
        if delta.stopped_by_string and self.stream is not None:
            self.cluster.abort(self.stream, [choice.request_id])
        if delta.finish_reason is not None:
            self._finish(choice, delta.finish_reason, out.timings, now)
        return delta

    def _finish(
        self, choice: Choice, reason: str, timings: RequestTimings | None, now: float
    ) -> None:
        choice.done = True
        self._open -= 1
        t = choice.tracker
        if t is None:
            return
        t.on_finished(reason, timings, now)
        logger.info(
            "request %s finished: prompt_tokens=%d generated_tokens=%d cached_tokens=%d "
            "ttft=%.3fs tpot=%.4fs e2e=%.3fs finish_reason=%s",
            choice.request_id,
            len(choice.prompt.token_ids),
            len(choice.state.token_ids),
            choice.state.num_cached_tokens,
            t.ttft,
            t.tpot,
            now - self.arrival,
            reason,
        )

    # ------------------------------------------------------------------ results

    @staticmethod
    def choice_usage(c: Choice, completions: bool = True) -> dict[str, int]:
        """One choice's usage so far: its prompt and the tokens it has generated (vLLM's
        continuous_usage_stats, per chunk)."""
        prompt = len(c.prompt.token_ids)
        completion = len(c.state.token_ids) if completions else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage(self, completions: bool = True) -> dict[str, Any]:
        """The usage object; `completions=False` when the generated tokens are not returned
        (echo with max_tokens 0)."""
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(len(c.state.token_ids) for c in self.choices) if completions else 0
        cached = sum(c.state.num_cached_tokens for c in self.choices if c.index % self.n == 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


def coalesce(batch: list[Update]) -> list[Update]:
    """One update per choice: when the consumer fell behind and several steps' outputs of a
    choice queued up, send them as one delta (one SSE event) instead of many (vLLM's output
    collector does the same). Order of first appearance is kept."""
    merged: dict[int, Update] = {}
    for u in batch:
        prev = merged.get(u.choice.index)
        if prev is None:
            merged[u.choice.index] = u
            continue
        a, b = prev.delta, u.delta
        logprobs = (a.logprobs or []) + (b.logprobs or []) if a.logprobs or b.logprobs else None
        merged[u.choice.index] = Update(
            u.choice,
            TextDelta(
                a.text + b.text,
                a.token_ids + b.token_ids,
                logprobs,
                b.finish_reason,
                b.stop_reason,
                a.stopped_by_string or b.stopped_by_string,
            ),
        )
    return list(merged.values())
