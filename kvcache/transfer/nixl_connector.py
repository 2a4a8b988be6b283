"""KV transfer over NIXL (UCX underneath: RDMA, CUDA IPC, shared memory or TCP, as UCX picks).

The whole KV tensor is registered once; each send is one NIXL WRITE of the collated regions
with the notice as its notification, which NIXL delivers only after the data has landed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

import msgspec
import torch
from nixl._api import nixl_agent, nixl_agent_config

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


def progress_thread(kv_cache: torch.Tensor) -> bool:
    """Whether the NIXL agent runs its progress thread: for a KV cache on a GPU, not on the CPU;
    env PDSERVE_NIXL_PROGRESS_THREAD=0 / 1 decides instead.

    nixl_agent runs that thread with a zero delay between progress calls: a core busy-polling
    for the worker's whole life, idle or not (measured: one full core, mostly system time).
    A GPU host has cores to spare and the GPU handoff numbers were measured with it
    (benchmarks/results/2026-11-22-gpu-nixl-handoff.md); a CPU worker's cores are its
    compute: on a 2-core host the spinning thread made the server's CPU decode 3.2x slower
    (TPOT 247 -> 77 ms, SmolLM2 float32). Without it, transfers progress when the worker
    polls them (`poll_sent` / `poll_received`: every loop iteration while busy, every
    REMOTE_POLL_MS while a send or an expected arrival is pending)."""
    env = os.environ.get("PDSERVE_NIXL_PROGRESS_THREAD")
    if env in ("0", "1"):
        return env == "1"
    return kv_cache.is_cuda


@dataclass
class _Pending:
    request_id: str
    peer_id: str
    handle: object | None  # None: notification only (nothing to move)
    nbytes: int
    ndesc: int
    t0: float


class NixlConnector(KVConnector):
    transport = "nixl"

    def __init__(self, worker_id: str, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        super().__init__(worker_id, kv_cache, layout)
        self.agent = nixl_agent(
            worker_id, nixl_agent_config(enable_prog_thread=progress_thread(kv_cache), backends=["UCX"])
        )
        self._reg = self.agent.register_memory(kv_cache)
        self._base = kv_cache.data_ptr()
        self._pending: list[_Pending] = []
        self._immediate: list[SendResult] = []

    def endpoint(self) -> KVEndpoint:
        return self._endpoint(base_addr=self._base, nixl_metadata=self.agent.get_agent_metadata())

    def _connect(self, ep: KVEndpoint) -> None:
        self.agent.add_remote_agent(ep.nixl_metadata)

    def _disconnect(self, worker_id: str) -> None:
        with suppress(Exception):  # already gone is fine
            self.agent.remove_remote_agent(worker_id)

    def send(
        self,
        request_id: str,
        src_blocks: Sequence[int],
        peer_id: str,
        dst_blocks: Sequence[int],
        payload: bytes,
    ) -> None:
        peer = self._check_blocks(peer_id, src_blocks, dst_blocks)
        notice = NOTICE.encode(_Notice(CONNECTOR_VERSION, request_id, self.worker_id, payload))
        regions = self.regions(src_blocks, dst_blocks)
        t0 = now()
        try:
            if not regions:
                self.agent.send_notif(peer_id, notice)
                self._pending.append(_Pending(request_id, peer_id, None, 0, 0, t0))
                return
            local = self.agent.get_xfer_descs(
                [(self._base + r.src_offset, r.nbytes, self.device_id) for r in regions],
                self.mem_type,
            )
            remote = self.agent.get_xfer_descs(
                [(peer.base_addr + r.dst_offset, r.nbytes, peer.device_id) for r in regions],
                peer.mem_type,
            )
            handle = self.agent.initialize_xfer("WRITE", local, remote, peer_id, notice)
            state = self.agent.transfer(handle)
            if state == "ERR":
                raise RuntimeError("NIXL refused the transfer")
        except Exception as e:  # noqa: BLE001 (any failure becomes a failed send, never a hang)
            self._immediate.append(
                SendResult(request_id, peer_id, False, 0, len(regions), now() - t0, str(e))
            )
            return
        self._pending.append(
            _Pending(request_id, peer_id, handle, sum(r.nbytes for r in regions), len(regions), t0)
        )

    def poll_sent(self) -> list[SendResult]:
        done, self._immediate = self._immediate, []
        still = []
        for p in self._pending:
            if p.handle is None:
                done.append(SendResult(p.request_id, p.peer_id, True, 0, 0, now() - p.t0))
                continue
            err: str | None
            try:
                state = self.agent.check_xfer_state(p.handle)
            except Exception as e:  # noqa: BLE001
                state, err = "ERR", str(e)
            else:
                err = "NIXL transfer failed" if state == "ERR" else None
            if state == "DONE" or state == "ERR":
                self.agent.release_xfer_handle(p.handle)
                done.append(
                    SendResult(
                        p.request_id,
                        p.peer_id,
                        state == "DONE",
                        p.nbytes if state == "DONE" else 0,
                        p.ndesc,
                        now() - p.t0,
                        err,
                    )
                )
            else:
                still.append(p)
        self._pending = still
        return done

    def poll_received(self, accept: Callable[[str], bool] | None = None) -> list[Arrival]:
        arrivals = []
        for _agent, msgs in self.agent.get_new_notifs().items():
            for raw in msgs:
                try:
                    n = NOTICE_DECODER.decode(raw)
                except msgspec.DecodeError as exc:
                    log.error("dropped a malformed KV notification from %s: %s", _agent, exc)
                    continue
                if n.version == CONNECTOR_VERSION:
                    arrivals.append(Arrival(n.request_id, n.sender_id, n.payload))
        return arrivals

    def close(self) -> None:
        for p in self._pending:
            if p.handle is not None:
                with suppress(Exception):
                    self.agent.release_xfer_handle(p.handle)
        self._pending = []
        with suppress(Exception):
            self.agent.deregister_memory(self._reg)
