"""POST /v1/completions: prompts -> `Generation` -> a text_completion object or its SSE stream."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive

from server.api.context import ServerContext
from server.api.errors import APIError, error_body
from server.api.generation import Choice, Generation, GenerationError
from server.api.logprobs import CompletionLogprobs, merge_completion_logprobs, vllm_prompt_logprobs
from server.api.protocol import CompletionRequest
from server.api.responses import json_response
from server.api.sse import DONE, ClientDisconnected, StreamingBody, run_until_disconnect, sse_event
from server.frontend.prompts import completion_prompts, resolve_max_tokens, truncate_prompt

logger = logging.getLogger(__name__)


def build_generation(
    ctx: ServerContext, req: CompletionRequest, request_id: str, arrival: float
) -> Generation:
    """Validate and tokenize; every client mistake becomes APIError(400) (404: unknown model)."""
    if req.unknown_fields():
        logger.debug("%s: ignoring unknown fields %s", request_id, req.unknown_fields())
    ctx.check_model(req.model)
    try:
        req.check()
        prompts = [truncate_prompt(p, req.truncate_prompt_tokens)
                   for p in completion_prompts(ctx.tokenizer, req.prompt, ctx.vocab_size)]
        max_len = ctx.max_model_len
        params = [
            req.sampling_params(
                resolve_max_tokens(1 if req.scores_only else req.max_tokens, len(p.token_ids), max_len),
                req.logprobs,
                ctx.vocab_size,
                req.engine_prompt_logprobs(),
            )
            for p in prompts
        ]
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return Generation(ctx, request_id, prompts, params, req.n, arrival)


async def create_completion(
    ctx: ServerContext, req: CompletionRequest, receive: Receive
) -> Response:
    arrival = time.monotonic()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    gen = build_generation(ctx, req, request_id, arrival)
    gen.start()
    head = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": ctx.model_name,
    }
    if req.stream:
        return StreamingBody(_stream(ctx, req, gen, head))
    try:
        await run_until_disconnect(receive, gen.run_to_end())
    except ClientDisconnected:
        return Response(status_code=499)
    except GenerationError as exc:
        raise APIError(exc.status, exc.message) from None
    return json_response(
        {
            **head,
            "choices": [_final_choice(ctx, req, c) for c in gen.choices],
            "usage": gen.usage(completions=not req.scores_only),
        }
    )


def _echo_text(ctx: ServerContext, c: Choice) -> str:
    p = c.prompt
    return (
        p.text
        if p.text is not None
        else ctx.tokenizer.decode(p.token_ids, skip_special_tokens=False)
    )


def _echo_logprobs(lp: CompletionLogprobs, req: CompletionRequest, c: Choice) -> dict[str, Any]:
    return lp.prompt(c.prompt.token_ids, c.state.prompt_logprobs, req.logprobs or 0)


def _final_choice(ctx: ServerContext, req: CompletionRequest, c: Choice) -> dict[str, Any]:
    st = c.state
    text = "" if req.scores_only else st.text
    logprobs = None
    if req.logprobs is not None:
        lp = CompletionLogprobs(ctx.token_text)
        parts = [_echo_logprobs(lp, req, c)] if req.echo else []
        if not req.scores_only:
            parts.append(lp.generated(st.logprobs[: len(st.token_ids)]))
        logprobs = merge_completion_logprobs(parts)
    if req.echo:
        text = _echo_text(ctx, c) + text
    choice = {
        "index": c.index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": "length" if req.scores_only else st.finish_reason,
        "stop_reason": None if req.scores_only else st.stop_reason,
    }
    if req.prompt_logprobs is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(ctx.token_text, st.prompt_logprobs, req.prompt_logprobs)
    return choice


async def _stream(
    ctx: ServerContext, req: CompletionRequest, gen: Generation, head: dict[str, Any]
) -> AsyncIterator[bytes]:
    want_logprobs = req.logprobs is not None
    lps = (
        {c.index: CompletionLogprobs(ctx.token_text) for c in gen.choices} if want_logprobs else {}
    )

    continuous = req.continuous_usage()

    def chunk(c: Choice, text: str, logprobs: Any, finish: str | None, stop: Any) -> bytes:
        choice = {
            "index": c.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop,
        }
        event = {**head, "choices": [choice]}
        if continuous:
            event["usage"] = gen.choice_usage(c, completions=not req.scores_only)
        return sse_event(event)

    try:
        # The echoed prompt comes first; with logprobs it waits for the prompt's scores, which
        # arrive with the choice's first token.
        echo_due = {c.index for c in gen.choices} if req.echo else set()
        if req.echo and not want_logprobs:
            yield b"".join(chunk(c, _echo_text(ctx, c), None, None, None) for c in gen.choices)
            echo_due.clear()
        async for batch in gen.updates():
            out = []
            for c, d in batch:
                if c.index in echo_due:
                    echo_due.discard(c.index)
                    echo_lp = _echo_logprobs(lps[c.index], req, c)
                    out.append(chunk(c, _echo_text(ctx, c), echo_lp, None, None))
                if req.scores_only:  # the one sampled token is not part of the answer
                    done = "length" if d.finish_reason is not None else None
                    d = d._replace(text="", token_ids=[], logprobs=None, finish_reason=done, stop_reason=None)
                logprobs = lps[c.index].generated(d.logprobs or []) if want_logprobs else None
                if d.text or d.finish_reason is not None or (want_logprobs and d.token_ids):
                    out.append(chunk(c, d.text, logprobs, d.finish_reason, d.stop_reason))
            if out:
                yield b"".join(out)
        if req.include_usage():
            yield sse_event({**head, "choices": [], "usage": gen.usage(completions=not req.scores_only)})
    except GenerationError as exc:
        yield sse_event(error_body(exc.status, exc.message))
    yield DONE
