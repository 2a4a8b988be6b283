"""JSON responses encoded with msgspec (several times faster than the stdlib on big bodies)."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

_encode = msgspec.json.Encoder().encode


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        _encode(body), status_code=status_code, media_type="application/json", headers=headers
    )
