"""The FastAPI application: routes, middleware and error handlers, nothing else.

Routes are thin: they hand the parsed body to `completions` / `chat`, which do the work.
`create_app` takes a ready `ServerContext` and an optional lifespan (the launcher's, which
binds the control plane and starts the workers); it starts no processes itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import msgspec
from fastapi import FastAPI, Request
from starlette.responses import Response

from router.registry import WorkerState
from server.api.chat import create_chat_completion
from server.api.completions import create_completion
from server.api.context import ServerContext
from server.api.errors import APIError, install_error_handlers
from server.api.middleware import APIKeyMiddleware, HTTPMetricsMiddleware
from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from server.api.responses import json_response
from server.engine.sampling_params import check_token_ids
from server.frontend.prompts import chat_prompt
from server.metrics import WorkerSample

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(ctx: ServerContext, lifespan: Lifespan | None = None) -> FastAPI:
    app = FastAPI(title="pdserve", lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    ctx.metrics.attach_workers(lambda: _worker_samples(ctx))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request.receive)

    def model_card(name: str) -> dict:
        model = ctx.cluster.registry.model
        return {
            "id": name,
            "object": "model",
            "created": ctx.created,
            "owned_by": "pdserve",
            "root": model.model_name if model else name,
            "max_model_len": ctx.max_model_len if model else None,
        }

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [model_card(n) for n in ctx.model_names]})

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        """OpenAI's retrieve-model route (`client.models.retrieve`); 404 for other names."""
        ctx.check_model(model)
        return json_response(model_card(model))

    @app.get("/health")
    async def health() -> Response:
        reg = ctx.cluster.registry
        if reg.all_ready():
            return json_response({"status": "ok", "workers": len(reg.workers)})
        states = {w.worker_id: w.state.value for w in reg.workers.values()}
        raise APIError(503, f"not ready: workers {states}", retry_after=5)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if ctx.config.debug_endpoints:

        @app.get("/debug/integrity")
        async def debug_integrity() -> Response:
            """Every ready worker checks its KV cache (`check_integrity`) and reports its free
            blocks and what still holds any: for fault tests and operators."""
            reports = await ctx.cluster.check_integrity()
            body = {wid: msgspec.structs.asdict(r) for wid, r in sorted(reports.items())}
            for r in body.values():
                del r["version"]
            return json_response({"workers": body})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        ctx.check_model(body.model)
        try:
            body.check()
            if body.messages is not None:
                prompt = chat_prompt(
                    ctx.tokenizer,
                    [m.model_dump(exclude_none=True) for m in body.messages],
                    add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=body.continue_final_message,
                    template_kwargs=body.chat_template_kwargs,
                )
                ids = prompt.token_ids
            else:
                ids = ctx.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        """vLLM's tokenizer description. Evaluation harnesses (lm-eval's remote tokenizer)
        read it, then tokenize through /tokenize and /detokenize: the served model's own
        tokenizer, no copy of it on the client."""
        tok = ctx.tokenizer
        return json_response({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.eos_token,
            "add_bos_token": tok.add_bos_token, "chat_template": tok.chat_template,
            "model_max_length": ctx.max_model_len, "vocab_size": tok.vocab_size,
        })  # fmt: skip

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        ctx.check_model(body.model)
        try:
            check_token_ids("token ids", body.tokens, ctx.vocab_size or ctx.tokenizer.vocab_size)
        except ValueError as exc:
            raise APIError(400, str(exc), param="tokens") from None
        # Special tokens stay (vLLM's, HF's decode default): /tokenize's ids round-trip.
        return json_response({"prompt": ctx.tokenizer.decode(body.tokens, skip_special_tokens=False)})

    # Outermost first: count every response, including 401s.
    if ctx.config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=ctx.config.api_key)
    app.add_middleware(
        HTTPMetricsMiddleware,
        counter=ctx.metrics.http_requests,
        known_paths=lambda: [getattr(r, "path", "") for r in app.routes],
    )
    return app


def _worker_samples(ctx: ServerContext) -> list[WorkerSample]:
    return [
        WorkerSample(
            w.worker_id,
            w.role,
            w.state is WorkerState.READY,
            w.stats,
            w.prefill_inflight,
            w.draining,
        )
        for w in ctx.cluster.registry.workers.values()
    ]
