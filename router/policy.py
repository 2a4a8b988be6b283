"""Routing policy: which READY worker gets a new request.

A pure function of a snapshot (`WorkerLoad`s), so it is unit-tested without processes. Today:
least loaded. Load is the number of engine requests the router has in flight on the worker
(exact and up to date, unlike the worker's periodic stats), then the worker's reported KV
usage, then its id so ties break deterministically. All `n` children of one request go to the
same worker so they share the prompt's prefix blocks.

The disaggregation work replaces this with a KV-aware cost (prefix blocks the worker already
holds vs. its load) over the same snapshot type.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.registry import WorkerLoad


def choose_worker(loads: Sequence[WorkerLoad], role: str = "both") -> str | None:
    """The worker id to route to, or None when no worker of `role` is available."""
    candidates = [w for w in loads if w.role == role]
    if not candidates:
        return None
    best = min(candidates, key=lambda w: (w.inflight, w.kv_cache_usage, w.worker_id))
    return best.worker_id
