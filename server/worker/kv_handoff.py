"""The worker half of disaggregation: wires an `EngineCore` to a `KVConnector`.

Prefill side (`PrefillHandoff`): a remote-prefill request is computed with `add_prefill_only`
(reusing this worker's prefix cache); when its first token is sampled, its blocks from the
first block the decode worker lacks are written straight into the decode worker's reserved
blocks, with the first token (and its logprobs) as the payload. The blocks are released when
the connector reports the send finished — never before, since the transport reads them — and a
send that would start after the lease's cut-off (anchored at the decode worker's reservation,
in wall-clock time) is dropped, and so is a queued job past it. Every job ends in exactly one
`PrefillOutcome`; `ok=False` promises that nothing was, or will be, written.

Decode side (`DecodeHandoff`): reservations (and their re-offer when the prefill worker died),
and arrivals, which turn reserved requests into running ones.

Neither half owns the socket to the router: they return messages for the worker loop to send.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from kvcache.transfer import KVConnector, KVLayout
from server.engine.outputs import RequestOutput, TokenLogprobs
from server.worker.messages import PrefillOutcome, RemotePrefill, Reserved, ReserveRemote

log = logging.getLogger(__name__)

# No send starts in the last 20% of the lease: a send started before the cut-off has that long
# (plus the decode worker's grace) to land before the blocks could be reused.
LEASE_MARGIN = 0.8


class FirstToken(msgspec.Struct, array_like=True):
    """The payload that rides with the KV: the token the prefill worker sampled."""

    token_id: int
    logprobs: TokenLogprobs | None = None


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(FirstToken)


def kv_layout(engine) -> KVLayout:
    spec = engine.kv_spec
    return KVLayout(
        model=engine.model_name,
        dtype=str(spec.dtype).removeprefix("torch."),
        block_size=spec.block_size,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
    )


@dataclass
class _Job:
    request_id: str
    decode_worker: str
    first_block: int
    dst_blocks: list[int]
    cutoff: float  # no send may start after this (time.time())
    started: bool = False  # the connector is reading the blocks
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    cached_tokens: int = 0


class PrefillHandoff:
    def __init__(
        self, engine, connector: KVConnector, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.connector = connector
        self.wall_clock = wall_clock
        self.jobs: dict[str, _Job] = {}

    def start(self, msg: RemotePrefill) -> PrefillOutcome | None:
        """Queue the prefill; returns a failed outcome at once if it cannot run."""
        rid = msg.request_id
        if rid in self.jobs:
            return PrefillOutcome(rid, False, error=f"request id {rid!r} is already prefilling")
        if msg.decode_worker not in self.connector.peers:
            return PrefillOutcome(rid, False, error=f"unknown KV peer {msg.decode_worker!r}")
        cutoff = msg.deadline - (1.0 - LEASE_MARGIN) * msg.lease_s
        if self.wall_clock() > cutoff:
            return PrefillOutcome(rid, False, error="the lease ran out before the prefill began")
        try:
            self.engine.add_prefill_only(rid, msg.prompt_token_ids, msg.params)
        except ValueError as exc:
            return PrefillOutcome(rid, False, error=str(exc))
        self.jobs[rid] = _Job(rid, msg.decode_worker, msg.first_block, list(msg.block_ids), cutoff)
        return None

    def on_outputs(
        self, outputs: list[RequestOutput]
    ) -> tuple[list[RequestOutput], list[PrefillOutcome]]:
        """Feed every engine step's outputs: returns (the outputs that are not prefill jobs',
        outcomes of jobs that failed to start their send). Starts the sends of finished
        prefills."""
        rest: list[RequestOutput] = []
        failed: list[PrefillOutcome] = []
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None:
                rest.append(out)
                continue
            if not out.finished:  # max_tokens is 1: never happens
                continue
            if out.timings is not None:
                job.queue_seconds = out.timings.queue_time
                job.prefill_seconds = out.timings.prefill_time
            job.cached_tokens = out.num_cached_tokens
            error = self._send(job, out)
            if error is not None:
                failed.append(self._end(job, False, error))
        return rest, failed

    def _send(self, job: _Job, out: RequestOutput) -> str | None:
        blocks = self.engine.held_blocks(job.request_id)
        src = blocks[job.first_block : job.first_block + len(job.dst_blocks)]
        if self.wall_clock() > job.cutoff:
            return "the lease ran out before the prefill finished"
        if len(src) != len(job.dst_blocks):
            return f"block count mismatch ({len(src)} here vs {len(job.dst_blocks)} reserved)"
        lp = out.new_logprobs[0] if out.new_logprobs else None
        payload = _enc.encode(FirstToken(out.new_token_ids[0], lp))
        try:
            self.connector.send(job.request_id, src, job.decode_worker, job.dst_blocks, payload)
        except (KeyError, ValueError) as exc:  # unknown peer, block ids out of range
            return str(exc)
        job.started = True
        return None

    def poll(self) -> list[PrefillOutcome]:
        """Outcomes of sends that finished since the last call (their blocks are released), and
        of queued jobs whose lease ran out (computing them would be wasted)."""
        now = self.wall_clock()
        late = [j.request_id for j in self.jobs.values() if not j.started and now > j.cutoff]
        outcomes = self.abort(late, "the lease ran out before the prefill finished")
        for r in self.connector.poll_sent():
            job = self.jobs.get(r.request_id)
            if job is None:
                continue
            o = self._end(job, r.ok, r.error)
            o.nbytes, o.num_descriptors, o.transfer_seconds = r.nbytes, r.num_descriptors, r.seconds
            outcomes.append(o)
        return outcomes

    def abort(self, request_ids: Iterable[str], why: str = "aborted") -> list[PrefillOutcome]:
        """Jobs not sending yet end now (outcomes returned); a send in flight still completes
        (the transport is reading the blocks) and its outcome comes from `poll`."""
        outcomes = []
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is not None and not job.started:
                self.engine.abort([rid])
                outcomes.append(self._end(job, False, why))
        return outcomes

    def peer_gone(self, peer_id: str) -> list[PrefillOutcome]:
        """The decode worker left: forget its endpoint, end the jobs writing to it."""
        self.connector.remove_peer(peer_id)  # sends in flight to it fail (see `poll`)
        ids = [j.request_id for j in self.jobs.values() if j.decode_worker == peer_id]
        return self.abort(ids, f"decode worker {peer_id} left")

    def _end(self, job: _Job, ok: bool, error: str | None) -> PrefillOutcome:
        del self.jobs[job.request_id]
        self.engine.release_held(job.request_id)
        if not ok:
            (log.info if error == "aborted" else log.warning)(
                "remote prefill %s for %s failed: %s", job.request_id, job.decode_worker, error
            )
        return PrefillOutcome(
            job.request_id,
            ok,
            queue_seconds=job.queue_seconds,
            prefill_seconds=job.prefill_seconds,
            cached_tokens=job.cached_tokens,
            error=error,
            started=job.started,
        )


@dataclass
class _Reservation:
    first_block: int
    block_ids: list[int]
    deadline: float  # time.time() at the lease's end


class DecodeHandoff:
    def __init__(
        self, engine, connector: KVConnector, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.connector = connector
        self.wall_clock = wall_clock
        self.reservations: dict[str, _Reservation] = {}  # requests waiting for remote KV

    def reserve(self, worker_id: str, msg: ReserveRemote) -> Reserved:
        """Raises ValueError for a request the engine refuses (a 400 for the client)."""
        got = self.engine.reserve_remote(
            msg.request_id, msg.prompt_token_ids, msg.params, msg.lease_s, msg.grace_s
        )
        if got is None:
            return Reserved(
                worker_id=worker_id, request_id=msg.request_id, ok=False, reason="no room"
            )
        first, blocks = got
        deadline = self.wall_clock() + msg.lease_s
        self.reservations[msg.request_id] = _Reservation(first, blocks, deadline)
        return Reserved(
            worker_id=worker_id, request_id=msg.request_id, ok=True, first_block=first,
            block_ids=blocks, lease_s=msg.lease_s, deadline=deadline,
        )  # fmt: skip

    def retry(self, worker_id: str, request_ids: Iterable[str]) -> list[Reserved]:
        """Re-offer the reservations still waiting for their KV (the prefill worker died)."""
        out = []
        now = self.wall_clock()
        for rid in request_ids:
            res = self.reservations.get(rid)
            if res is None or not self.engine.remote_prefill_retried(rid):
                out.append(Reserved(worker_id=worker_id, request_id=rid, ok=False, retry=True,
                                    reason="not waiting for KV"))  # fmt: skip
                continue
            out.append(Reserved(
                worker_id=worker_id, request_id=rid, ok=True, first_block=res.first_block,
                block_ids=res.block_ids, lease_s=max(0.0, res.deadline - now),
                deadline=res.deadline, retry=True,
            ))  # fmt: skip
        return out

    def cancel(self, request_ids: Iterable[str], writer_gone: bool) -> None:
        """No KV will come: prefill locally what still waits; with `writer_gone`, no write is in
        flight either, so parked blocks are freed and nothing stays quarantined."""
        for rid in request_ids:
            if self.reservations.pop(rid, None) is not None:
                self.engine.remote_prefill_failed(rid)
            if writer_gone:
                self.engine.remote_writer_gone(rid)

    def forget(self, request_ids: Iterable[str]) -> None:
        """The requests were aborted or their lease expired."""
        for rid in request_ids:
            self.reservations.pop(rid, None)

    def poll(self) -> list[RequestOutput]:
        """Outputs (the first token) of requests whose KV fully landed since the last call."""
        outputs: list[RequestOutput] = []
        for a in self.connector.poll_received(accept=self.engine.waiting_for_remote_kv):
            self.reservations.pop(a.request_id, None)
            try:
                first = _dec.decode(a.payload)
                if not 0 <= first.token_id < self.engine.vocab_size:
                    raise ValueError(f"token id {first.token_id} is outside the vocabulary")
            except ValueError as exc:  # msgspec.DecodeError is one
                log.error(
                    "bad first-token payload for %s from %s: %s", a.request_id, a.sender_id, exc
                )
                self.engine.remote_prefill_failed(a.request_id)  # the KV is there; recompute anyway
                continue
            outputs += self.engine.remote_kv_arrived(a.request_id, first.token_id, first.logprobs)
        return outputs
