"""The control-plane wire format between the router process and its workers.

Every frame on the socket is one msgpack-encoded message from the tagged unions below, never
pickle. Each message carries `version`; a receiver that sees any other version (or a frame it
cannot decode) raises `ProtocolError` instead of guessing. Bump `PROTOCOL_VERSION` whenever a
message changes shape.

Transport (see `router/cluster.py` and `server/worker/loop.py`): the router binds one ZMQ
ROUTER socket; each worker connects a DEALER socket whose identity is its worker id, so one
socket carries both directions for all workers and every frame is addressed.

Worker -> router:
    Hello        once, after the model has loaded (handshake: model, limits, role, pid)
    StepOutputs  all `RequestOutput`s of one engine step, batched
    RequestError an `add` the engine refused (`ValueError`), so its stream can end with a 400
    Heartbeat    periodic `EngineStats` snapshot; its arrival proves the loop is alive
    Goodbye      the worker is exiting cleanly
Router -> worker:
    AddRequest, AbortRequests, Shutdown
"""

from __future__ import annotations

from typing import Union

import msgspec

from server.engine.outputs import EngineStats, RequestOutput
from server.engine.sampling_params import SamplingParams

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A frame that is not a message of this protocol version."""


class _Message(msgspec.Struct, tag_field="type", kw_only=True):
    version: int = PROTOCOL_VERSION


# ---------------------------------------------------------------- worker -> router


class Hello(_Message, tag="hello"):
    worker_id: str
    role: str  # "both" | "prefill" | "decode"
    model_name: str
    max_model_len: int
    vocab_size: int
    pid: int
    num_blocks: int = 0
    block_size: int = 0


class StepOutputs(_Message, tag="outputs"):
    worker_id: str
    outputs: list[RequestOutput]


class RequestError(_Message, tag="request_error"):
    worker_id: str
    request_id: str
    message: str


class Heartbeat(_Message, tag="heartbeat"):
    worker_id: str
    stats: EngineStats


class Goodbye(_Message, tag="goodbye"):
    worker_id: str
    reason: str = ""


# ---------------------------------------------------------------- router -> worker


class AddRequest(_Message, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequests(_Message, tag="abort"):
    request_ids: list[str]


class Shutdown(_Message, tag="shutdown"):
    pass


WorkerMessage = Union[Hello, StepOutputs, RequestError, Heartbeat, Goodbye]
RouterMessage = Union[AddRequest, AbortRequests, Shutdown]

_encoder = msgspec.msgpack.Encoder()


class _VersionOnly(msgspec.Struct):
    version: int = -1
    type: str = "?"


def encode(msg: _Message) -> bytes:
    return _encoder.encode(msg)


class _Decoder:
    """Decodes one frame into a message of the given union, checking `version` first."""

    def __init__(self, union: object) -> None:
        self._typed = msgspec.msgpack.Decoder(union)
        self._loose = msgspec.msgpack.Decoder(_VersionOnly)

    def __call__(self, frame: bytes) -> _Message:
        try:
            msg = self._typed.decode(frame)
        except msgspec.DecodeError as exc:
            try:
                head = self._loose.decode(frame)
            except msgspec.DecodeError:
                raise ProtocolError(f"undecodable control-plane frame: {exc}") from None
            if head.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version {head.version} (message {head.type!r}) received, "
                    f"this process speaks version {PROTOCOL_VERSION}"
                ) from None
            raise ProtocolError(f"malformed {head.type!r} message: {exc}") from None
        if msg.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {msg.version} received, this process speaks "
                f"version {PROTOCOL_VERSION}"
            )
        return msg


decode_worker_message = _Decoder(WorkerMessage)
decode_router_message = _Decoder(RouterMessage)
