"""The KV connector interface and its wire structs.

Push model: the decode worker reserves blocks and publishes its `KVEndpoint`; the prefill worker
`send`s its blocks straight into them and attaches a payload (the first sampled token). The
receiver learns from `poll_received` that a request's KV has fully landed: a payload is only
ever delivered after all of its bytes are written.

Ownership: the connector never frees or allocates blocks. The caller keeps the source blocks
referenced until `poll_sent` reports the send finished (ok or not), and the destination blocks
reserved until the arrival (or its lease expiring).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from kvcache.transfer.collate import Region, collate, per_page

if TYPE_CHECKING:
    import torch

CONNECTOR_VERSION = 1


class IncompatiblePeerError(ValueError):
    pass


class KVLayout(msgspec.Struct, frozen=True):
    """Everything two workers must agree on for raw KV bytes to mean the same thing."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str = "block-major[blocks,layers,2,block_size,kv_heads,head_dim]"

    @property
    def bytes_per_block(self) -> int:
        import torch  # here, not at the top: the router imports this module and needs no torch

        itemsize = getattr(torch, self.dtype).itemsize
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def differences(self, other: KVLayout) -> list[str]:
        return [
            f"{f}: {getattr(self, f)!r} here vs {getattr(other, f)!r} there"
            for f in self.__struct_fields__
            if getattr(self, f) != getattr(other, f)
        ]


class KVEndpoint(msgspec.Struct):
    """What a peer needs to write into this worker's KV cache."""

    worker_id: str
    transport: str  # "nixl" | "zmq"
    version: int
    layout: KVLayout
    num_blocks: int
    mem_type: str  # "DRAM" | "VRAM"
    device_id: int
    base_addr: int
    nixl_metadata: bytes | None = None
    zmq_address: str | None = None


class SendResult(msgspec.Struct, array_like=True):
    request_id: str
    peer_id: str
    ok: bool
    nbytes: int
    num_descriptors: int
    seconds: float
    error: str | None = None


class Arrival(msgspec.Struct, array_like=True):
    request_id: str
    sender_id: str
    payload: bytes


class _Notice(msgspec.Struct, array_like=True):
    """Rides with the data (NIXL notification / ZMQ header): who sent what for which request."""

    version: int
    request_id: str
    sender_id: str
    payload: bytes


def endpoint_problems(mine: KVEndpoint, theirs: KVEndpoint) -> list[str]:
    """Every reason the two workers cannot exchange KV ([] when they can): connector
    version, transport, and each KV layout field (model, dtype, block size, shape, layout)."""
    problems = []
    if theirs.version != mine.version:
        problems.append(f"connector version: {mine.version} here vs {theirs.version} there")
    if theirs.transport != mine.transport:
        problems.append(f"transport: {mine.transport} here vs {theirs.transport} there")
    return problems + mine.layout.differences(theirs.layout)


NOTICE = msgspec.msgpack.Encoder()
NOTICE_DECODER = msgspec.msgpack.Decoder(_Notice)


class KVConnector(ABC):
    transport = "abstract"

    def __init__(self, worker_id: str, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        if not kv_cache.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor to be registered")
        self.worker_id = worker_id
        self.kv_cache = kv_cache
        self.layout = layout
        self.bytes_per_block = kv_cache[0].numel() * kv_cache.element_size()
        if self.bytes_per_block != layout.bytes_per_block:
            raise ValueError(
                f"KV tensor blocks are {self.bytes_per_block} bytes, layout says {layout.bytes_per_block}"
            )
        self.mem_type = "VRAM" if kv_cache.is_cuda else "DRAM"
        self.device_id = (kv_cache.device.index or 0) if kv_cache.is_cuda else 0
        self.peers: dict[str, KVEndpoint] = {}
        self.collated = True  # False only for the benchmark's per-page baseline
        # A ZMQ socket that becomes readable when something arrives, for the owner's poller
        # (None: the transport has none; poll `poll_received` periodically instead).
        self.wakeup_socket = None

    def _endpoint(self, **transport_fields) -> KVEndpoint:
        """The endpoint fields every transport shares, plus its own (address, metadata)."""
        return KVEndpoint(
            worker_id=self.worker_id,
            transport=self.transport,
            version=CONNECTOR_VERSION,
            layout=self.layout,
            num_blocks=self.kv_cache.shape[0],
            mem_type=self.mem_type,
            device_id=self.device_id,
            **transport_fields,
        )

    # -- peers --------------------------------------------------------------------------------

    def check_peer(self, ep: KVEndpoint) -> None:
        mine = KVEndpoint(
            self.worker_id, self.transport, CONNECTOR_VERSION, self.layout, 0, "", 0, 0
        )
        problems = endpoint_problems(mine, ep)
        if problems:
            raise IncompatiblePeerError(
                f"worker {ep.worker_id!r} cannot exchange KV with {self.worker_id!r}: "
                + "; ".join(problems)
            )

    def add_peer(self, ep: KVEndpoint) -> None:
        """Validate the peer (raises IncompatiblePeerError naming every mismatch) and connect."""
        self.check_peer(ep)
        self.peers[ep.worker_id] = ep
        self._connect(ep)

    def remove_peer(self, worker_id: str) -> None:
        if self.peers.pop(worker_id, None) is not None:
            self._disconnect(worker_id)

    def regions(self, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> list[Region]:
        if self.collated:
            return collate(src_blocks, dst_blocks, self.bytes_per_block)
        return per_page(src_blocks, dst_blocks, self.bytes_per_block, self.layout.num_layers)

    def _check_blocks(
        self, peer_id: str, src_blocks: Sequence[int], dst_blocks: Sequence[int]
    ) -> KVEndpoint:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise KeyError(f"unknown KV peer {peer_id!r}")
        n_local = self.kv_cache.shape[0]
        if any(not 0 <= b < n_local for b in src_blocks):
            raise ValueError(f"source block ids out of range [0, {n_local})")
        if any(not 0 <= b < peer.num_blocks for b in dst_blocks):
            raise ValueError(f"destination block ids out of range [0, {peer.num_blocks})")
        return peer

    # -- the transport --------------------------------------------------------------------------

    @abstractmethod
    def endpoint(self) -> KVEndpoint: ...

    @abstractmethod
    def _connect(self, ep: KVEndpoint) -> None: ...

    @abstractmethod
    def _disconnect(self, worker_id: str) -> None: ...

    @abstractmethod
    def send(
        self,
        request_id: str,
        src_blocks: Sequence[int],
        peer_id: str,
        dst_blocks: Sequence[int],
        payload: bytes,
    ) -> None:
        """Start writing local `src_blocks` into the peer's `dst_blocks` (same length, paired
        in order), then deliver `payload` to the peer. Returns at once; see `poll_sent`."""

    @abstractmethod
    def poll_sent(self) -> list[SendResult]:
        """Sends that finished (successfully or not) since the last call."""

    @abstractmethod
    def poll_received(self, accept: Callable[[str], bool] | None = None) -> list[Arrival]:
        """Requests whose KV fully landed in this worker since the last call.

        `accept(request_id)` False means the request no longer wants its KV (it ended, or is
        being computed here): a transport that writes on the receiving side (ZMQ) then drops
        the data instead of writing it, so even a very late sender cannot touch blocks that
        were reused. The arrival is reported either way. One-sided writes (NIXL) have landed
        before the notice arrives; for them the lease's grace is the protection."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass


def now() -> float:
    return time.perf_counter()
