"""Admission control: admit a request now, or refuse it with a status and Retry-After.

Pure function of counts, unit-tested without a server. 503 when no worker can serve (none
ready: starting up or all dead), 429 when the cluster already holds `max_pending` engine
requests (running + queued in workers): queueing more would only add latency the client
could spend elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple


class Admission(NamedTuple):
    admitted: bool
    status: int = 200
    retry_after: int = 0  # seconds, for the Retry-After header
    message: str = ""


ADMIT = Admission(True)


def admit(num_ready_workers: int, inflight: int, new_requests: int, max_pending: int) -> Admission:
    """`new_requests` is the engine requests this API call needs (its `n`).

    `max_pending` <= 0 disables the 429 limit. A request that alone exceeds the limit is
    still admitted on an idle cluster, so a large `n` is slow, never impossible."""
    if num_ready_workers <= 0:
        return Admission(False, 503, 5, "No inference worker is ready; try again shortly.")
    if max_pending > 0 and inflight > 0 and inflight + new_requests > max_pending:
        return Admission(
            False,
            429,
            1,
            f"The server is at capacity ({inflight} requests in flight, limit {max_pending}); "
            "try again shortly.",
        )
    return ADMIT
