"""The worker half of disaggregation: wires an `EngineCore` to a `KVConnector`.

Prefill side (`PrefillHandoff`): a remote-prefill request is computed with `add_prefill_only`;
when its first token is sampled, its blocks (from the first block the decode worker lacks) are
sent straight into the decode worker's reserved blocks, with the first token as the payload.
The blocks are released when the connector reports the send finished — never before, since
the transport reads them — and a send that would start after the lease deadline is dropped.

Decode side (`DecodeHandoff`): arrivals turn reserved requests into running ones.

Neither half owns the socket to the router: they return events for the worker loop to report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import msgspec

from kvcache.transfer import KVConnector, KVLayout, SendResult
from server.engine.outputs import RequestOutput, TokenLogprobs
from server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class FirstToken(msgspec.Struct, array_like=True):
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
    deadline: float  # time.monotonic(): no send may start after this
    started: bool = False
    aborted: bool = False
    t0: float = field(default_factory=time.monotonic)


class PrefillOutcome(msgspec.Struct, array_like=True):
    """What the router hears about one remote prefill."""

    request_id: str
    ok: bool
    nbytes: int = 0
    num_descriptors: int = 0
    transfer_seconds: float = 0.0
    prefill_seconds: float = 0.0
    error: str | None = None


class PrefillHandoff:
    def __init__(self, engine, connector: KVConnector, clock=time.monotonic) -> None:
        self.engine = engine
        self.connector = connector
        self.clock = clock
        self.jobs: dict[str, _Job] = {}

    def start(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              decode_worker: str, first_block: int, dst_blocks: list[int], lease_s: float) -> None:
        """Raises ValueError for a request the engine refuses."""
        # Leave a margin: the decode worker's lease started before ours, by a network hop.
        deadline = self.clock() + lease_s * 0.8
        self.engine.add_prefill_only(request_id, prompt_token_ids, params)
        self.jobs[request_id] = _Job(request_id, decode_worker, first_block, list(dst_blocks), deadline)

    def on_outputs(self, outputs: list[RequestOutput]) -> list[PrefillOutcome]:
        """Feed every engine step's outputs; starts the sends of finished prefills."""
        failed = []
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None or not out.finished:
                continue
            blocks = self.engine.held_blocks(job.request_id)
            src = blocks[job.first_block : job.first_block + len(job.dst_blocks)]
            if job.aborted or self.clock() > job.deadline or len(src) != len(job.dst_blocks):
                why = ("aborted" if job.aborted else "lease deadline passed" if self.clock() > job.deadline
                       else f"block count mismatch ({len(src)} vs {len(job.dst_blocks)})")
                self._finish(job.request_id)
                failed.append(PrefillOutcome(job.request_id, False, error=why))
                continue
            lp = out.new_logprobs[0] if out.new_logprobs else None
            payload = _enc.encode(FirstToken(out.new_token_ids[0], lp))
            job.started = True
            job.prefill_seconds = self.clock() - job.t0
            self.connector.send(job.request_id, src, job.decode_worker, job.dst_blocks, payload)
        return failed

    def poll(self) -> list[PrefillOutcome]:
        outcomes = []
        for r in self.connector.poll_sent():
            job = self.jobs.get(r.request_id)
            self._finish(r.request_id)
            outcomes.append(_outcome(r, getattr(job, "prefill_seconds", 0.0)))
        return outcomes

    def abort(self, request_ids: list[str]) -> None:
        """Abort: computing requests stop at once; a send in flight still completes (the
        transport is reading the blocks) and releases them when it does."""
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is None:
                continue
            if job.started:
                job.aborted = True
            else:
                self.engine.abort([rid])
                self._finish(rid)

    def _finish(self, request_id: str) -> None:
        self.jobs.pop(request_id, None)
        self.engine.release_held(request_id)


def _outcome(r: SendResult, prefill_seconds: float) -> PrefillOutcome:
    return PrefillOutcome(r.request_id, r.ok, r.nbytes, r.num_descriptors, r.seconds, prefill_seconds, r.error)


class DecodeHandoff:
    def __init__(self, engine, connector: KVConnector) -> None:
        self.engine = engine
        self.connector = connector

    def poll(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for a in self.connector.poll_received():
            try:
                first = _dec.decode(a.payload)
            except msgspec.DecodeError:
                log.error("malformed first-token payload for %s from %s", a.request_id, a.sender_id)
                self.engine.remote_prefill_failed(a.request_id)
                continue
            outputs += self.engine.remote_kv_arrived(a.request_id, first.token_id, first.logprobs)
        return outputs
