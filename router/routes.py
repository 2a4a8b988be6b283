"""Where each engine request is in the router's view, and the snapshots scoring reads.

Life of one engine request (`Route`), as `router/cluster.py` drives it:

    local prefill:   DECODING from the start (AddRequest to the decode worker D)
    remote prefill:  RESERVING  ReserveRemote sent to D, waiting for its answer
                     PREFILLING RemotePrefill sent to prefill worker P; ends when D's first
                                output arrives (KV landed) or P reports a failure (then D
                                prefills it locally)
                     DECODING   D streams tokens as for any request

`prefill` names the prefill worker counted in its `prefill_inflight` (planned while
RESERVING, asked while PREFILLING); `Cluster._set_prefill` keeps that count exact.
`charged` names the worker whose `prefill_backlog` holds this prompt's `charged_tokens`
(whoever computes the prompt, until its first token is out); `Cluster._charge` moves it.
Pure data and pure functions: no sockets here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.block_hash import hash_prompt_blocks
from router.disagg_policy import WorkerSnapshot
from router.prefix_index import PrefixIndex
from router.registry import WorkerInfo
from server.engine.sampling_params import SamplingParams


class Stage(enum.Enum):
    RESERVING = "reserving"
    PREFILLING = "prefilling"
    DECODING = "decoding"


@dataclass(eq=False)
class Route:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float  # router clock
    decode: str  # the decode worker (the stream's worker)
    stage: Stage = Stage.DECODING
    prefill: str | None = None
    path: str = "local"  # "remote" once a remote prefill was planned
    sent_at: float = 0.0  # ReserveRemote sent (router clock)
    dispatched: bool = False  # router queue time observed
    retried: bool = False  # a second prefill worker was asked: the first may still write
    awaiting_retry: bool = False  # RetryPrefill sent to D, answer pending
    charged: str | None = None  # the worker whose prefill backlog counts this prompt
    charged_tokens: int = 0


@dataclass(frozen=True)
class Orphan:
    """An aborted request whose prefill worker may still be working on it: when that worker
    reports that it wrote nothing, the decode worker may free the parked blocks at once."""

    decode: str
    prefill: str
    retried: bool


class PromptHashes:
    """A prompt's chained block hashes, per block size, computed on first use."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._by_size: dict[int, list[int]] = {}

    def get(self, block_size: int) -> list[int]:
        hashes = self._by_size.get(block_size)
        if hashes is None:
            # A block covering the last token is never a hit (the worker must compute it).
            usable = self.token_ids[: max(len(self.token_ids) - 1, 0)]
            hashes = self._by_size[block_size] = hash_prompt_blocks(usable, block_size)
        return hashes


def snapshot(info: WorkerInfo, index: PrefixIndex, prompt: PromptHashes) -> WorkerSnapshot:
    """What scoring may know about one READY worker for one prompt.

    Counts the router keeps (requests in flight, remote prefills outstanding) are exact; the
    worker's own queue length and KV usage come from its last heartbeat."""
    hello, stats = info.hello, info.stats
    block_size = hello.block_size if hello is not None else 0
    hits = index.match(info.worker_id, prompt.get(block_size)) if block_size > 0 else 0
    if info.decodes:
        queued = stats.num_waiting if stats else 0
        running = max(info.inflight - queued, 0)
        waiting = queued + info.prefill_inflight
    else:
        running, waiting = 0, info.prefill_inflight
    return WorkerSnapshot(
        worker_id=info.worker_id,
        role=info.role,
        num_running=running,
        num_waiting=waiting,
        kv_usage=stats.kv_cache_usage if stats else 0.0,
        prefix_hit_blocks=hits,
        max_num_seqs=(hello.max_num_seqs if hello is not None else 0) or 64,
        prefill_backlog_tokens=info.prefill_backlog,
    )
