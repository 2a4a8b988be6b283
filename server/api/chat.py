"""POST /v1/chat/completions: messages -> the model's own chat template -> `Generation` ->
a chat.completion object or its SSE stream of chat.completion.chunk objects."""

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
from server.api.logprobs import chat_logprobs, vllm_prompt_logprobs
from server.api.protocol import ChatCompletionRequest
from server.api.responses import json_response
from server.api.sse import DONE, ClientDisconnected, StreamingBody, run_until_disconnect, sse_event
from server.frontend.prompts import chat_prompt, resolve_max_tokens, truncate_prompt

logger = logging.getLogger(__name__)


def build_generation(
    ctx: ServerContext, req: ChatCompletionRequest, request_id: str, arrival: float
) -> Generation:
    """Validate, render and tokenize; client mistakes become APIError(400) (404: unknown model)."""
    if req.unknown_fields():
        logger.debug("%s: ignoring unknown fields %s", request_id, req.unknown_fields())
    ctx.check_model(req.model)
    try:
        req.check()
        prompt = chat_prompt(
            ctx.tokenizer,
            [msg.model_dump(exclude_none=True) for msg in req.messages],
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            template_kwargs=req.chat_template_kwargs,
        )
        prompt = truncate_prompt(prompt, req.truncate_prompt_tokens)
        max_tokens = resolve_max_tokens(
            req.requested_max_tokens(), len(prompt.token_ids), ctx.max_model_len,
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
        )
        params = req.sampling_params(
            max_tokens, req.requested_logprobs(), ctx.vocab_size, req.prompt_logprobs
        )
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return Generation(ctx, request_id, [prompt], [params], req.n, arrival)


async def create_chat_completion(
    ctx: ServerContext, req: ChatCompletionRequest, receive: Receive
) -> Response:
    arrival = time.monotonic()
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    gen = build_generation(ctx, req, request_id, arrival)
    gen.start()
    created = int(time.time())
    if req.stream:
        head = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ctx.model_name,
        }
        return StreamingBody(_stream(ctx, req, gen, head))
    try:
        await run_until_disconnect(receive, gen.run_to_end())
    except ClientDisconnected:
        return Response(status_code=499)
    except GenerationError as exc:
        raise APIError(exc.status, exc.message) from None
    body = {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": ctx.model_name,
        "choices": [_final_choice(ctx, req, c) for c in gen.choices],
        "usage": gen.usage(),
    }
    if req.prompt_logprobs is not None:  # vLLM: one list for the one prompt, at the top
        body["prompt_logprobs"] = vllm_prompt_logprobs(
            ctx.token_text, gen.choices[0].state.prompt_logprobs, req.prompt_logprobs
        )
    return json_response(body)


def _final_choice(ctx: ServerContext, req: ChatCompletionRequest, c: Choice) -> dict[str, Any]:
    st = c.state
    logprobs = None
    if req.logprobs:
        logprobs = {"content": chat_logprobs(ctx.token_text, st.logprobs[: len(st.token_ids)])}
    return {
        "index": c.index,
        "message": {"role": "assistant", "content": st.text},
        "logprobs": logprobs,
        "finish_reason": st.finish_reason,
        "stop_reason": st.stop_reason,
    }


async def _stream(
    ctx: ServerContext, req: ChatCompletionRequest, gen: Generation, head: dict[str, Any]
) -> AsyncIterator[bytes]:
    continuous = req.continuous_usage()

    def chunk(c: Choice, delta: dict[str, Any], logprobs: Any, finish: str | None, stop: Any) -> bytes:
        choice = {
            "index": c.index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop,
        }
        event = {**head, "choices": [choice]}
        if continuous:
            event["usage"] = gen.choice_usage(c)
        return sse_event(event)

    try:
        # The role comes first, alone, as OpenAI sends it.
        yield b"".join(
            chunk(c, {"role": "assistant", "content": ""}, None, None, None)
            for c in gen.choices
        )
        async for batch in gen.updates():
            out = []
            for c, d in batch:
                logprobs = (
                    {"content": chat_logprobs(ctx.token_text, d.logprobs or [])}
                    if req.logprobs
                    else None
                )
                if d.text or d.finish_reason is not None or (logprobs and d.token_ids):
                    delta = {"content": d.text} if d.text else {}
                    out.append(chunk(c, delta, logprobs, d.finish_reason, d.stop_reason))
            if out:
                yield b"".join(out)
        if req.include_usage():
            yield sse_event({**head, "choices": [], "usage": gen.usage()})
    except GenerationError as exc:
        yield sse_event(error_body(exc.status, exc.message))
    yield DONE
