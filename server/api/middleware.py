"""Pure-ASGI middleware (no per-chunk overhead on streams, unlike BaseHTTPMiddleware).

`HTTPMetricsMiddleware` counts every response by method, route and status;
`APIKeyMiddleware` answers 401 before the body is read when the key is missing or wrong.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError, error_response


class HTTPMetricsMiddleware:
    """Counts responses in `counter{method, handler, status}`.

    `handler` is the request path when it is one of `known_paths`, else "other" (bounded
    label cardinality). A client that leaves before the response starts counts as 499."""

    def __init__(
        self, app: ASGIApp, counter: Counter, known_paths: Callable[[], Iterable[str]]
    ) -> None:
        self.app = app
        self.counter = counter
        self._known_paths = known_paths
        self._known: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 499}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            status["code"] = 500
            raise
        finally:
            if self._known is None:
                self._known = frozenset(self._known_paths())
            path = scope["path"]
            handler = path if path in self._known else "other"
            self.counter.labels(scope["method"], handler, str(status["code"])).inc()


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on paths under `protected_prefixes`.

    The comparison is constant-time (hmac.compare_digest over bytes)."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        protected_prefixes: tuple[str, ...] = ("/v1", "/tokenize", "/tokenizer_info", "/detokenize"),
    ) -> None:
        self.app = app
        self._key = api_key.encode()
        self._prefixes = protected_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] == "OPTIONS"
            or not scope["path"].startswith(self._prefixes)
        ):
            await self.app(scope, receive, send)
            return
        provided = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    provided = token.strip()
                break
        if not hmac.compare_digest(provided, self._key):
            msg = (
                "Invalid API key."
                if provided
                else "Missing API key: send 'Authorization: Bearer <key>'."
            )
            response = error_response(APIError(401, msg, code="invalid_api_key"))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
