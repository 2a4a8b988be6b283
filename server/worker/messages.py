"""The control-plane wire format between the router process and its workers.

Every frame on the socket is one msgpack-encoded message from the tagged unions below, never
pickle. Each message carries `version`; a receiver that sees any other version (or a frame it
cannot decode) raises `ProtocolError` instead of guessing. Bump `PROTOCOL_VERSION` whenever a
message changes shape.

Transport (see `router/cluster.py` and `server/worker/loop.py`): the router binds one ZMQ
ROUTER socket; each worker connects a DEALER socket whose identity is its worker id, so one
socket carries both directions for all workers and every frame is addressed.

Worker -> router:
    Hello        once, after the model has loaded (handshake: model, limits, role, pid, and
                 the worker's KV endpoint, which the router hands to its peers)
    StepOutputs  all `RequestOutput`s of one engine step, batched
    RequestError an `add` the engine refused (`ValueError`), so its stream can end with a 400
    Heartbeat    periodic `EngineStats` snapshot; its arrival proves the loop is alive
    Goodbye      the worker is exiting cleanly
    Draining     the worker is draining (SIGTERM): route nothing new to it; it finishes what it
                 holds within `timeout_s`, then says Goodbye
    Reserved     decode side: blocks reserved for a remote prefill (or why not)
    PrefillDone  prefill side: the outcome of one remote prefill (KV sent or not)
    KVEvents     the prefix-cache events of one loop iteration (for the router's prefix index)
    KVSnapshot   every cached block hash, answering ResyncKV after a gap in KVEvents
    PeerRefused  a peer's KV endpoint failed this worker's compatibility check
    IntegrityReport  the answer to CheckIntegrity
Router -> worker:
    AddRequest, AbortRequests, Shutdown
    DrainAck         answers Draining: nothing new will be routed to the worker (so every
                     request sent to it before this frame has already arrived)
    ReserveRemote    decode side: reserve blocks for a prompt another worker will prefill
    RemotePrefill    prefill side: compute a prompt, write its KV into a decode worker's blocks
    RetryPrefill     decode side: the prefill worker died; re-offer the reservation if the KV
                     has not arrived (answered with Reserved(retry=True))
    CancelRemoteKV   decode side: no prefill worker will deliver: prefill locally what still
                     waits; with writer_gone, no write is in flight either (free parked blocks)
    AddPeers, RemovePeer  KV endpoints of workers that joined / left
    ResyncKV, CheckIntegrity

Remote prefill, in order: router -> D ReserveRemote; D -> router Reserved; router -> P
RemotePrefill; P -> D the KV and first token over the KV connector; P -> router PrefillDone;
D streams StepOutputs as for any request.
"""

from __future__ import annotations

from typing import Union, cast

import msgspec

from kvcache.events import KVEventBatch
from kvcache.transfer.base import KVEndpoint
from server.engine.outputs import EngineStats, RequestOutput
from server.engine.sampling_params import SamplingParams

PROTOCOL_VERSION = 5  # 4: SamplingParams.logit_bias; 5: .allowed_token_ids


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
    max_num_seqs: int = 0
    kv_endpoint: KVEndpoint | None = None  # None: this worker takes no part in KV handoff


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


class Draining(_Message, tag="draining"):
    worker_id: str
    timeout_s: float  # what it still holds ends (with an error) after this many seconds


class Reserved(_Message, tag="reserved"):
    worker_id: str
    request_id: str
    ok: bool  # False: no room now (the router prefills it locally instead)
    first_block: int = 0  # index in the prompt of the first block the prefill must write
    block_ids: list[int] = []  # the decode worker's blocks from `first_block` on
    lease_s: float = 0.0  # time left before the decode worker prefills it itself
    deadline: float = 0.0  # the decode worker's time.time() when the lease ends
    retry: bool = False  # an answer to RetryPrefill
    reason: str = ""


class PrefillOutcome(msgspec.Struct, array_like=True):
    """What the router hears about one remote prefill. ok=False also promises that no write
    into the decode worker's blocks is in flight or will start."""

    request_id: str
    ok: bool
    nbytes: int = 0
    num_descriptors: int = 0
    transfer_seconds: float = 0.0  # send started -> connector reported it done
    queue_seconds: float = 0.0  # waiting in the prefill worker's engine
    prefill_seconds: float = 0.0  # first scheduled -> first token
    cached_tokens: int = 0  # prompt tokens the prefill worker found in its own prefix cache
    error: str | None = None
    started: bool = False  # the KV send started (a failure then is a transfer failure)


class PrefillDone(_Message, tag="prefill_done"):
    worker_id: str
    outcomes: list[PrefillOutcome]


class KVEvents(_Message, tag="kv_events"):
    batch: KVEventBatch


class KVSnapshot(_Message, tag="kv_snapshot"):
    worker_id: str
    block_hashes: list[int]
    next_seq: int


class PeerRefused(_Message, tag="peer_refused"):
    worker_id: str
    peer_id: str
    message: str


class IntegrityReport(_Message, tag="integrity"):
    worker_id: str
    ok: bool
    error: str = ""
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_requests: int = 0  # requests holding KV blocks (incl. reserved, held, parked)
    num_remote_waiting: int = 0
    num_held: int = 0  # prefill side: KV kept for a send
    num_parked: int = 0  # decode side: quarantined blocks of ended requests
    num_prefill_jobs: int = 0


# ---------------------------------------------------------------- router -> worker


class AddRequest(_Message, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequests(_Message, tag="abort"):
    request_ids: list[str]


class Shutdown(_Message, tag="shutdown"):
    pass


class DrainAck(_Message, tag="drain_ack"):
    pass


class ReserveRemote(_Message, tag="reserve"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lease_s: float
    grace_s: float = 5.0


class RemotePrefill(_Message, tag="remote_prefill"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    decode_worker: str
    first_block: int
    block_ids: list[int]
    lease_s: float  # the lease's length (at the reservation, or what was left at a retry)
    # The decode worker's time.time() at the lease's end. Anchored there, not at this message's
    # receipt, which a busy or frozen prefill worker may see late: no send may start after
    # deadline - (1 - LEASE_MARGIN) * lease_s by this host's clock (clocks must agree within
    # the grace period).
    deadline: float


class RetryPrefill(_Message, tag="retry_prefill"):
    request_ids: list[str]


class CancelRemoteKV(_Message, tag="cancel_remote_kv"):
    request_ids: list[str]
    writer_gone: bool = False


class AddPeers(_Message, tag="add_peers"):
    endpoints: list[KVEndpoint]


class RemovePeer(_Message, tag="remove_peer"):
    worker_id: str


class ResyncKV(_Message, tag="resync_kv"):
    pass


class CheckIntegrity(_Message, tag="check_integrity"):
    pass


WorkerMessage = Union[
    Hello, StepOutputs, RequestError, Heartbeat, Goodbye, Reserved, PrefillDone, KVEvents,
    KVSnapshot, PeerRefused, IntegrityReport, Draining,
]  # fmt: skip
RouterMessage = Union[
    AddRequest, AbortRequests, Shutdown, ReserveRemote, RemotePrefill, RetryPrefill,
    CancelRemoteKV, AddPeers, RemovePeer, ResyncKV, CheckIntegrity, DrainAck,
]  # fmt: skip

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


_decode_worker = _Decoder(WorkerMessage)
_decode_router = _Decoder(RouterMessage)


def decode_worker_message(frame: bytes) -> WorkerMessage:
    """A worker -> router frame; ProtocolError for another version or a malformed frame."""
    return cast(WorkerMessage, _decode_worker(frame))


def decode_router_message(frame: bytes) -> RouterMessage:
    """A router -> worker frame; ProtocolError for another version or a malformed frame."""
    return cast(RouterMessage, _decode_router(frame))
