"""Server-sent events framing, and responses that notice a client leaving.

Framing (what OpenAI sends and its clients parse): each event is `data: <json>\\n\\n`; the
stream ends with `data: [DONE]\\n\\n`. A failure mid-stream sends one event whose JSON is an
OpenAI error object, then `[DONE]`.

`StreamingBody` and `run_until_disconnect` watch the ASGI receive channel for
`http.disconnect` *while* generating, so a client that leaves is noticed at once, not at the
next write; cancelling the generator runs its `finally`, which aborts the engine requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


def sse_event(payload: Any) -> bytes:
    """One `data:` event from a JSON-serialisable object (dict, msgspec Struct, ...)."""
    return b"data: " + _encode(payload) + b"\n\n"


class ClientDisconnected(Exception):
    pass


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone (the request body must already have been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()


class StreamingBody(Response):
    """An SSE response whose body generator is cancelled as soon as the client disconnects.

    The generator is always closed (`aclose`) before the response returns, whatever ended it,
    so its cleanup runs exactly once and promptly."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.body_iterator

        async def stream() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await run_until_disconnect(receive, stream())
        except (ClientDisconnected, OSError):
            pass
        finally:
            await body.aclose()  # type: ignore[attr-defined]
