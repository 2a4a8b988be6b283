"""Token-centric continuous batching.

Each step, every scheduled request advances `num_computed_tokens` towards `num_tokens` by
`num_new_tokens` (1 for a decode, up to the token budget for a prefill chunk). Prefix-cache hits
start a request with `num_computed_tokens > 0`; a later issue's remote KV does the same. When KV
blocks run out, the most recently admitted running request is preempted (its blocks freed, its
computed tokens reset to 0) and recomputed later: nothing ever fails for lack of blocks.

Pure Python over `KVCacheManager`: no tensors, unit-tested on the CPU.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from kvcache.manager import KVCacheManager, PrefixMatch
from server.engine.outputs import RequestOutput, RequestTimings, TokenLogprobs
from server.engine.request import FINISH_REASON, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    # Longest prefill chunk one request may take in a step (0: up to the token budget). Keeps a
    # long prompt from stalling the decodes that share the step.
    long_prefill_token_threshold: int = 0


class ScheduledRequest(NamedTuple):
    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so it samples."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


class DecodeRow(NamedTuple):
    """A predicted decode of the next step: the request and the position of its next token."""

    request: Request
    position: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # decodes (1 new token) first, then prefill chunks
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv = kv
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        # Disaggregation (see Request.remote_deadline / keep_kv_on_finish):
        self.remote: dict[str, Request] = {}  # blocks reserved, prompt KV not yet arrived
        self.held: dict[str, Request] = {}  # finished prefill-only requests, KV being sent
        self.deferred: dict[str, float] = {}  # KV owner id -> time its blocks may be freed
        self.num_lease_expiries = 0
        # Step overlap: request ids of each launched step not yet synced, oldest first (the
        # device may still write their KV), and finished requests whose blocks wait for them.
        self._in_flight: list[frozenset[str]] = []
        self._busy_frees: dict[str, Request] = {}

    # -- admission / abort -----------------------------------------------------------------

    def add(self, req: Request) -> None:
        if req.request_id in self.requests or req.request_id in self._busy_frees:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self.prompt_tokens += req.num_prompt_tokens

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish the given requests at once and free everything they hold. Unknown or already
        finished ids are ignored (aborts race with completion)."""
        aborted = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if rid in self.remote:
                del self.remote[rid]
            elif req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._release(req)
            req.status = RequestStatus.FINISHED_ABORTED
            aborted.append(req)
        return aborted

    def _release(self, req: Request) -> None:
        """Return the request's blocks to the pool, or park them while a remote prefill may
        still write into them (its lease plus grace) or a launched step still computes the
        request (`step_launched`): they must not be reused before then."""
        if any(req.request_id in ids for ids in self._in_flight):
            self._busy_frees[req.request_id] = req
        elif req.quarantine_until > self.clock():
            self.deferred[req.request_id] = req.quarantine_until
        else:
            self.kv.free(req.request_id)

    def free_deferred(self, force: bool = False) -> None:
        now = self.clock()
        for rid, until in list(self.deferred.items()):
            if force or until <= now:
                del self.deferred[rid]
                self.kv.free(rid)

    # -- step overlap -----------------------------------------------------------------------

    def step_launched(self, out: SchedulerOutput) -> None:
        """`out` was launched on the device ahead of its turn (see `EngineCore.step`): until
        `step_synced`, a request of it that finishes or is aborted keeps its blocks, since the
        device may still write its KV there."""
        self._in_flight.append(frozenset(s.request.request_id for s in out.scheduled))

    def step_synced(self) -> None:
        """The oldest launched step has run: free what only it still held."""
        self._in_flight.pop(0)
        for rid, req in list(self._busy_frees.items()):
            if not any(rid in ids for ids in self._in_flight):
                del self._busy_frees[rid]
                self._release(req)

    @property
    def num_steps_in_flight(self) -> int:
        return len(self._in_flight)

    # -- disaggregation ---------------------------------------------------------------------

    def reserve_remote(self, req: Request, lease_s: float, grace_s: float) -> PrefixMatch | None:
        """Decode side: reserve blocks for the whole prompt (reusing cached prefix blocks) so a
        prefill worker can write its KV into them. None if the blocks are not there now."""
        rid = req.request_id
        if rid in self.requests or rid in self.deferred or rid in self._busy_frees:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if len(self.running) + len(self.remote) >= self.config.max_num_seqs:
            return None  # it could not join the batch when its KV lands
        match = self.kv.match_prefix(req.all_token_ids)
        if self.kv.allocate(req.request_id, req.num_prompt_tokens, match) is None:
            return None
        now = self.clock()
        self.kv.record_query(req.num_tokens, match.num_tokens)
        req.num_computed_tokens = req.num_cached_tokens = match.num_tokens
        req.first_scheduled_time = now
        req.remote_deadline = now + lease_s
        req.quarantine_until = now + lease_s + grace_s
        self.requests[req.request_id] = req
        self.remote[req.request_id] = req
        self.prompt_tokens += req.num_prompt_tokens
        return match

    def remote_arrived(
        self, request_id: str, token: int, logprobs: TokenLogprobs | None
    ) -> list[RequestOutput]:
        """The prompt's KV has fully landed (with the first token sampled by the prefill
        worker): the request joins the running batch."""
        req = self.remote.pop(request_id, None)
        if req is None:
            # Aborted (or already prefilled locally) meanwhile: nothing more will be written.
            if request_id in self.deferred and request_id not in self.requests:
                del self.deferred[request_id]
                self.kv.free(request_id)
            return []
        if not req.remote_retried:  # else a first, presumed-dead writer may still land
            req.quarantine_until = 0.0
        req.num_computed_tokens = req.num_prompt_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return [self._emit(req, token, logprobs, self.clock())]

    def remote_failed(self, request_id: str) -> bool:
        """The remote prefill will not deliver: compute the prompt here instead, in the blocks
        already reserved (cached prefix kept). Quarantine stays: a slow writer may still land."""
        req = self.remote.pop(request_id, None)
        if req is None:
            return False
        req.remote_deadline = None
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return True

    def remote_retry(self, request_id: str) -> bool:
        """A second prefill worker will write this request's KV (the first is presumed dead).
        False if the request no longer waits for KV. Its blocks then stay quarantined until
        lease + grace even after the arrival: the first writer might still land."""
        req = self.remote.get(request_id)
        if req is None:
            return False
        req.remote_retried = True
        return True

    def remote_writer_gone(self, request_id: str) -> None:
        """No write into this request's blocks is in flight or will start (the prefill worker
        said so): lift the quarantine, freeing the blocks now if the request already ended."""
        req = self.requests.get(request_id)
        if req is not None:
            req.quarantine_until = 0.0
        elif self.deferred.pop(request_id, None) is not None:
            self.kv.free(request_id)

    def expire_leases(self) -> list[str]:
        now = self.clock()
        expired = [rid for rid, r in self.remote.items() if r.remote_deadline is not None and r.remote_deadline <= now]
        for rid in expired:
            self.remote_failed(rid)
        self.num_lease_expiries += len(expired)
        return expired

    def release_held(self, request_id: str) -> None:
        """Prefill side: the KV has been sent (or will not be): free the blocks."""
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(request_id)

    @property
    def num_remote_reserved_blocks(self) -> int:
        return sum(len(self.kv.block_table(rid)) for rid in self.remote)

    def has_unfinished(self) -> bool:
        """Requests to compute. Requests waiting only for remote KV are not work for the step
        loop; their leases and deferred frees are settled by `tick()`."""
        return len(self.requests) > len(self.remote)

    def tick(self) -> list[str]:
        """Settle time-based state (deferred frees, expired leases); returns expired ids. Called
        by `schedule()` and, when idle, by the worker loop."""
        if self.deferred:
            self.free_deferred()
        return self.expire_leases() if self.remote else []

    # -- schedule ---------------------------------------------------------------------------

    def _chunk(self, req: Request, budget: int) -> int:
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        if self.config.long_prefill_token_threshold:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _victim(self) -> Request | None:
        """The newest running request whose blocks may be freed now (a remote prefill may
        still write into a quarantined one's blocks)."""
        now = self.clock()
        for req in reversed(self.running):
            if req.quarantine_until <= now:
                return req
        return None

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        self.tick()
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput(scheduled=[])
        # 1. Running requests, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, budget)
            while self.kv.allocate(req.request_id, req.num_computed_tokens + n) is None:
                victim = self._victim()
                if victim is None:  # only quarantined requests left: wait for blocks
                    break
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
                continue
            break  # `req` itself was preempted: nothing after it is left to schedule
        # 2. Waiting requests, in order, unless this step had to preempt (no room anyway).
        while (
            not out.preempted
            and self.waiting
            and budget > 0
            and len(self.running) + len(self.remote) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            # Prompt logprobs need every prompt position computed: no cache hits until sent.
            match = PrefixMatch([], 0) if req.prompt_logprobs is not None else self.kv.match_prefix(req.all_token_ids)
            n = min(req.num_tokens - match.num_tokens, budget)
            if self.config.long_prefill_token_threshold:
                n = min(n, self.config.long_prefill_token_threshold)
            if self.kv.allocate(req.request_id, match.num_tokens + n, match) is None:
                break
            self.waiting.popleft()
            self.kv.record_query(req.num_tokens, match.num_tokens)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = match.num_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = match.num_tokens
                req.first_scheduled_time = self.clock()
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)  # decodes first (stable)
        return out

    def lookahead(self, out: SchedulerOutput) -> list[DecodeRow] | None:
        """Predict the next step while this one runs on the device: when every running request
        samples a token now and nothing waits to join, the next step is a pure decode of the
        running requests that do not finish by length, in `running` order. Each gets the block
        its next token needs now (the allocation `schedule` would make one step later). None
        when the next step cannot be predicted: a prefill continues or may be admitted, or a
        block is not free (no preemption for a prediction).

        A prediction is a hint: the next `schedule` decides, and a request that stops on a
        token keeps its early block until it is freed with the request."""
        # Rows of a launched-ahead step whose request finished meanwhile are dropped.
        live = [s for s in out.scheduled if not s.request.status.finished]
        if len(live) != len(self.running) or not all(s.samples for s in live):
            return None
        if self.waiting and len(self.running) + len(self.remote) < self.config.max_num_seqs:
            return None
        rows: list[DecodeRow] = []
        for req in self.running:
            position = req.num_tokens  # the token sampled now is computed next
            p = req.sampling_params
            if req.num_output_tokens + 1 >= p.max_tokens or position + 1 >= self.config.max_model_len:
                continue  # finishes by length with this step's token
            if self.kv.allocate(req.request_id, position + 1) is None:
                return None
            rows.append(DecodeRow(req, position))
        return rows or None

    # -- update -----------------------------------------------------------------------------

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[str, tuple[int, TokenLogprobs | None]],
        prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] | None = None,
    ) -> list[RequestOutput]:
        """Advance computed tokens, append sampled tokens, finish requests, cache full blocks.
        `sampled` holds a token for exactly the scheduled requests whose `samples` was true;
        `prompt_logprobs` (request id -> first prompt index scored, logprobs) those computed
        for requests that asked. Rows of requests that finished or were aborted after the step
        was launched (a step launched ahead, see `step_launched`) are dropped."""
        outputs: list[RequestOutput] = []
        now = self.clock()
        for req, n in out.scheduled:
            if req.status.finished:
                continue
            scored = prompt_logprobs.get(req.request_id) if prompt_logprobs else None
            if scored is not None and req.prompt_logprobs is not None:
                first, lps = scored
                req.prompt_logprobs[first : first + len(lps)] = lps
            req.num_computed_tokens += n
            hit = sampled.get(req.request_id)
            if hit is None:
                self.kv.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)
                continue
            outputs.append(self._emit(req, hit[0], hit[1], now))
        return outputs

    def _emit(self, req: Request, token: int, logprobs: TokenLogprobs | None, now: float) -> RequestOutput:
        """Append one sampled token to a running request, finish it if a stop condition holds,
        cache its newly full blocks; returns its output for this step."""
        req.append_token(token)
        self.generation_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = now
        self._check_stop(req, token)
        self.kv.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)
        ro = RequestOutput(
            request_id=req.request_id,
            new_token_ids=[token],
            new_logprobs=None if logprobs is None else [logprobs],
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
        )
        if req.prompt_logprobs is not None:  # the first token: hand them out once
            ro.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None
        if req.status.finished:
            ro.finish_reason = FINISH_REASON[req.status]
            ro.stop_reason = req.stop_reason
            ro.timings = RequestTimings(
                arrival=req.arrival_time,
                first_scheduled=req.first_scheduled_time or now,
                first_token=req.first_token_time,
                finished=now,
                num_preemptions=req.num_preemptions,
            )
            self.running.remove(req)
            del self.requests[req.request_id]
            if req.keep_kv_on_finish:
                self.held[req.request_id] = req
            else:
                self._release(req)
        return ro

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
                return
            if not p.ignore_eos and token in req.eos_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                return
        if n_out >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
