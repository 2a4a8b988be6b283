"""The fallback transport when NIXL is absent: KV bytes as ZMQ multipart frames.

Same interface and guarantees as NIXL: frames go out zero-copy from the source tensor (CPU)
or through one staging copy (GPU); the receiver copies them into the reserved blocks and only
then reports the arrival. A send counts as finished when ZMQ no longer needs the source memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import torch
import zmq

from kvcache.transfer.base import (
    CONNECTOR_VERSION,
    NOTICE,
    NOTICE_DECODER,
    Arrival,
    KVConnector,
    KVEndpoint,
    KVLayout,
    SendResult,
    _Notice,
    now,
)

log = logging.getLogger(__name__)

_REGIONS = msgspec.msgpack.Decoder(list[tuple[int, int]])


@dataclass
class _Pending:
    request_id: str
    peer_id: str
    tracker: zmq.MessageTracker | None
    nbytes: int
    ndesc: int
    t0: float
    staging: torch.Tensor | None = None  # keeps GPU->host copies alive until sent
    error: str | None = None


class ZmqConnector(KVConnector):
    transport = "zmq"

    def __init__(
        self, worker_id: str, kv_cache: torch.Tensor, layout: KVLayout, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(worker_id, kv_cache, layout)
        self.ctx: zmq.Context = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        port = self.pull.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._bytes = kv_cache.view(-1).view(torch.uint8)
        self._host = None if kv_cache.is_cuda else self._bytes.numpy()
        self.push: dict[str, zmq.Socket] = {}
        self._pending: list[_Pending] = []
        self.wakeup_socket = self.pull

    def endpoint(self) -> KVEndpoint:
        return self._endpoint(base_addr=0, zmq_address=self.address)

    def _connect(self, ep: KVEndpoint) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep.zmq_address)
        old = self.push.pop(ep.worker_id, None)
        if old is not None:
            old.close()
        self.push[ep.worker_id] = sock

    def _disconnect(self, worker_id: str) -> None:
        sock = self.push.pop(worker_id, None)
        if sock is not None:
            sock.close()  # linger 0: queued frames are dropped, never delivered
        for p in self._pending:
            # Still reported only once ZMQ lets go of the source memory (the tracker).
            if p.peer_id == worker_id and p.error is None:
                p.error = f"KV peer {worker_id!r} was removed before the send completed"

    def send(
        self,
        request_id: str,
        src_blocks: Sequence[int],
        peer_id: str,
        dst_blocks: Sequence[int],
        payload: bytes,
    ) -> None:
        self._check_blocks(peer_id, src_blocks, dst_blocks)
        regions = self.regions(src_blocks, dst_blocks)
        t0 = now()
        staging = None
        if self.kv_cache.is_cuda and regions:
            staging = torch.cat(
                [self._bytes[r.src_offset : r.src_offset + r.nbytes] for r in regions]
            ).cpu()
            frames, off = [], 0
            for r in regions:
                frames.append(staging[off : off + r.nbytes].numpy().data)
                off += r.nbytes
        else:
            frames = [self._bytes[r.src_offset : r.src_offset + r.nbytes].numpy().data for r in regions]
        header = msgspec.msgpack.encode([(r.dst_offset, r.nbytes) for r in regions])
        notice = NOTICE.encode(_Notice(CONNECTOR_VERSION, request_id, self.worker_id, payload))
        try:
            tracker = self.push[peer_id].send_multipart(
                [notice, header, *frames], copy=False, track=True
            )
        except zmq.ZMQError as e:
            self._pending.append(
                _Pending(request_id, peer_id, None, 0, len(regions), t0, error=str(e))
            )
            return
        self._pending.append(
            _Pending(
                request_id,
                peer_id,
                tracker,
                sum(r.nbytes for r in regions),
                len(regions),
                t0,
                staging,
            )
        )

    def poll_sent(self) -> list[SendResult]:
        done, still = [], []
        for p in self._pending:
            if p.error is not None and (p.tracker is None or p.tracker.done):
                done.append(
                    SendResult(p.request_id, p.peer_id, False, 0, p.ndesc, now() - p.t0, p.error)
                )
            elif p.tracker is None or p.tracker.done:
                done.append(
                    SendResult(p.request_id, p.peer_id, True, p.nbytes, p.ndesc, now() - p.t0)
                )
            else:
                still.append(p)
        self._pending = still
        return done

    def poll_received(self, accept: Callable[[str], bool] | None = None) -> list[Arrival]:
        arrivals: list[Arrival] = []
        while True:
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return arrivals
            try:
                notice = NOTICE_DECODER.decode(frames[0].bytes)
                regions = _REGIONS.decode(frames[1].bytes)
                if len(regions) != len(frames) - 2 or any(
                    off < 0 or n <= 0 or off + n > self._bytes.numel() or len(f) != n
                    for (off, n), f in zip(regions, frames[2:], strict=False)
                ):
                    raise ValueError("regions do not match the frames or the KV cache")
            except (ValueError, IndexError) as exc:  # msgspec.DecodeError is a ValueError
                # Nothing was written; the request's lease covers the lost arrival.
                log.error("dropped a malformed KV message (%d frames): %s", len(frames), exc)
                continue
            if accept is not None and not accept(notice.request_id):
                regions = []  # nobody wants it any more: write nothing (see KVConnector)
            for (off, n), frame in zip(regions, frames[2:], strict=False):
                src = np.frombuffer(frame.buffer, dtype=np.uint8)
                if self._host is not None:
                    # A plain memcpy: torch's copy_ would fork its intra-op threads for every
                    # frame, which stalls whenever another thread (ZMQ's) holds a core.
                    self._host[off : off + n] = src
                else:
                    self._bytes[off : off + n].copy_(torch.from_numpy(src))
            if notice.version == CONNECTOR_VERSION:
                arrivals.append(Arrival(notice.request_id, notice.sender_id, notice.payload))

    def close(self) -> None:
        for sock in self.push.values():
            sock.close()
        self.push.clear()
        self.pull.close()
