"""Prometheus metrics, prefix `pdserve:`, with vLLM's names, semantics and buckets.

One scrape target covers the cluster: the router process exports everything at `/metrics`.
  * Request-level histograms and counters are observed in the router process as outputs
    arrive (`RequestTracker`), labelled `model_name` and `role` (the role of the worker that
    served the request). TTFT, inter-token latency and end-to-end latency are measured where
    the client feels them: from the router's arrival to the router's receipt of tokens.
    Queue, prefill and decode times come from the worker's own timestamps (`RequestTimings`).
  * Engine gauges and counters (running / waiting requests, KV usage, prefix-cache queries
    and hits, preemptions) are read at scrape time from each worker's latest `EngineStats`
    heartbeat and labelled `worker_id` (and `role`), so a dead worker's series disappear.
  * `pdserve:http_requests_total{method,handler,status}` counts every HTTP response.
  * Disaggregation (`StageMetrics`, observed by the router as its control messages arrive):
    every routing decision, fallbacks, and the stages of a request -- router queue, decode
    queue, remote prefill queue and compute, KV transfer time, bytes, descriptors, failures.

Each `ServerMetrics` owns its own `CollectorRegistry`, so several servers (or tests) in one
process never collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.outputs import EngineStats, RequestTimings

PREFIX = "pdserve:"

# vLLM v1's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
ITL_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
]  # fmt: skip
REQUEST_LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
]  # fmt: skip


# Stages that can take well under a millisecond (a KV transfer on one host) or many seconds.
STAGE_BUCKETS = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
]  # fmt: skip


class WorkerSample(NamedTuple):
    worker_id: str
    role: str
    up: bool
    stats: EngineStats | None
    prefill_inflight: int = 0  # remote prefills the router has outstanding on it
    draining: bool = False  # it said Draining: no new work; it leaves once idle


WorkerSource = Callable[[], Iterable[WorkerSample]]


class _WorkerStatsCollector(Collector):
    """Per-worker series, computed at scrape time from the latest heartbeat of each worker."""

    def __init__(self, model_name: Callable[[], str], source: WorkerSource) -> None:
        self._model_name = model_name
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model_name", "worker_id", "role"]
        g = {
            "up": GaugeMetricFamily(
                PREFIX + "worker_up", "1 if the worker is ready.", labels=labels
            ),
            "running": GaugeMetricFamily(
                PREFIX + "num_requests_running",
                "Requests in model execution batches.",
                labels=labels,
            ),
            "waiting": GaugeMetricFamily(
                PREFIX + "num_requests_waiting", "Requests waiting to be processed.", labels=labels
            ),
            "kv": GaugeMetricFamily(
                PREFIX + "kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                labels=labels,
            ),
        }
        c = {
            "queries": CounterMetricFamily(
                PREFIX + "prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                labels=labels,
            ),
            "hits": CounterMetricFamily(
                PREFIX + "prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                labels=labels,
            ),
            "preempt": CounterMetricFamily(
                PREFIX + "num_preemptions", "Cumulative number of preemptions.", labels=labels
            ),
            "expiries": CounterMetricFamily(
                PREFIX + "kv_lease_expiries",
                "Reservations whose remote KV never came (prefilled locally).",
                labels=labels,
            ),
        }
        g["reserved"] = GaugeMetricFamily(
            PREFIX + "remote_kv_reserved_blocks",
            "KV blocks reserved for KV a prefill worker is sending.",
            labels=labels,
        )
        g["remote_waiting"] = GaugeMetricFamily(
            PREFIX + "num_requests_remote_waiting",
            "Requests whose prompt KV is on its way from a prefill worker.",
            labels=labels,
        )
        g["prefills"] = GaugeMetricFamily(
            PREFIX + "remote_prefills_inflight",
            "Remote prefills the router has outstanding on this worker.",
            labels=labels,
        )
        g["draining"] = GaugeMetricFamily(
            PREFIX + "worker_draining",
            "1 while the worker drains (SIGTERM): it finishes its requests and takes no new ones.",
            labels=labels,
        )
        model = self._model_name()
        for w in self._source():
            lv = [model, w.worker_id, w.role]
            g["up"].add_metric(lv, 1.0 if w.up else 0.0)
            g["draining"].add_metric(lv, 1.0 if w.up and w.draining else 0.0)
            if not w.up or w.stats is None:
                continue
            s = w.stats
            g["running"].add_metric(lv, s.num_running)
            g["waiting"].add_metric(lv, s.num_waiting)
            g["kv"].add_metric(lv, s.kv_cache_usage)
            c["queries"].add_metric(lv, s.prefix_cache_queries)
            c["hits"].add_metric(lv, s.prefix_cache_hits)
            c["preempt"].add_metric(lv, s.num_preemptions)
            c["expiries"].add_metric(lv, s.num_lease_expiries)
            g["reserved"].add_metric(lv, s.remote_reserved_blocks)
            g["remote_waiting"].add_metric(lv, s.num_remote_waiting)
            g["prefills"].add_metric(lv, w.prefill_inflight)
        yield from g.values()
        yield from c.values()


class _RoleMetrics:
    """The labelled children for one (model_name, role), resolved once (hot path)."""

    def __init__(self, m: ServerMetrics, model: str, role: str) -> None:
        lv = (model, role)
        self.ttft = m.ttft.labels(*lv)
        self.itl = m.itl.labels(*lv)
        self.e2e = m.e2e.labels(*lv)
        self.tpot = m.tpot.labels(*lv)
        self.queue = m.queue_time.labels(*lv)
        self.prefill = m.prefill_time.labels(*lv)
        self.decode = m.decode_time.labels(*lv)
        self.prompt_tokens = m.prompt_tokens.labels(*lv)
        self.generation_tokens = m.generation_tokens.labels(*lv)
        self._success = m.request_success
        self._lv = lv

    def success(self, finished_reason: str) -> None:
        self._success.labels(*self._lv, finished_reason).inc()


class ServerMetrics:
    def __init__(
        self, model_name: Callable[[], str] = lambda: "", registry: CollectorRegistry | None = None
    ) -> None:
        """`model_name` is asked each time (the served name is known only after the handshake)."""
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        r = self.registry
        lab = ["model_name", "role"]
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            lab, registry=r, buckets=TTFT_BUCKETS,
        )  # fmt: skip
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            lab, registry=r, buckets=ITL_BUCKETS,
        )  # fmt: skip
        self.tpot = Histogram(
            PREFIX + "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            lab, registry=r, buckets=ITL_BUCKETS,
        )  # fmt: skip
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            lab, registry=r, buckets=REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            lab, registry=r, buckets=REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.prefill_time = Histogram(
            PREFIX + "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            lab, registry=r, buckets=REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.decode_time = Histogram(
            PREFIX + "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            lab, registry=r, buckets=REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Number of prefill tokens processed.", lab, registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Number of generation tokens processed.", lab, registry=r
        )
        self.request_success = Counter(
            PREFIX + "request_success",
            "Count of successfully processed requests.",
            lab + ["finished_reason"],
            registry=r,
        )
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP responses by method, route and status code.",
            ["method", "handler", "status"],
            registry=r,
        )
        self._roles: dict[tuple[str, str], _RoleMetrics] = {}
        self.stages = StageMetrics(r)

    def attach_workers(self, source: WorkerSource) -> None:
        self.registry.register(_WorkerStatsCollector(self.model_name, source))

    def for_role(self, role: str) -> _RoleMetrics:
        key = (self.model_name(), role)
        rm = self._roles.get(key)
        if rm is None:
            rm = self._roles[key] = _RoleMetrics(self, *key)
        return rm

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StageMetrics:
    """Disaggregation, per request stage. Definitions:

    router queue   arrival at the router -> the request is sent to the worker that computes
                   its prompt (for a remote prefill: after the decode worker's reservation)
    decode queue   local: waiting in the decode worker's queue for blocks (its own timestamps);
                   remote: ReserveRemote sent -> the decode worker's answer
    remote prefill queue / time   in the prefill worker: queued -> scheduled -> first token
    KV transfer time   send started -> the connector reported it done (prefill worker); the
                       transfer series are labelled with the sending worker's id
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry

        def hist(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=r, buckets=STAGE_BUCKETS)

        self.decisions = Counter(
            PREFIX + "disagg_decision",
            "Routing decisions: where each request's prefill runs, and why.",
            ["decision"],
            registry=r,
        )
        self.fallbacks = Counter(
            PREFIX + "disagg_fallback",
            "Remote prefills that became local ones (no_room, no_prefill_worker, prefill_failed).",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            PREFIX + "remote_prefill_retries",
            "Remote prefills re-sent to another prefill worker after theirs died.",
            registry=r,
        )
        self.router_queue = hist(
            "router_queue_time_seconds", "Time from arrival to dispatch of the prefill.", ("path",)
        )
        self.decode_queue = hist(
            "decode_queue_time_seconds",
            "Time a request waited for its decode worker to take it.",
            ("path",),
        )
        self.prefill_queue = hist(
            "remote_prefill_queue_time_seconds", "Time queued in the prefill worker."
        )
        self.prefill_time = hist(
            "remote_prefill_time_seconds", "Remote prefill compute: scheduled to first token."
        )
        # Labelled by the sending (prefill) worker.
        sender = ("worker_id",)
        self.transfer_time = hist(
            "kv_transfer_seconds", "KV transfer time per request (completed ones).", sender
        )
        self.transfer_bytes = Counter(
            PREFIX + "kv_transfer_bytes",
            "KV bytes written into decode workers.",
            sender,
            registry=r,
        )
        self.transfer_descriptors = Counter(
            PREFIX + "kv_transfer_descriptors",
            "Transfer descriptors (contiguous regions) used to move them.",
            sender,
            registry=r,
        )
        self.transfer_failures = Counter(
            PREFIX + "kv_transfer_failures",
            "KV transfers that started and failed.",
            sender,
            registry=r,
        )
        self.prefill_cached_tokens = Counter(
            PREFIX + "remote_prefill_cached_tokens",
            "Prompt tokens prefill workers found in their own prefix caches.",
            registry=r,
        )
        self.event_gaps = Counter(
            PREFIX + "kv_event_gaps",
            "Gaps detected in workers' KV event streams (each repaired by a resync).",
            registry=r,
        )


class RequestTracker:
    """Latency bookkeeping for one engine request, fed as its outputs reach the router.

    Call `on_tokens` for every output carrying tokens and `on_finished` once; `summary()` gives
    the numbers for the per-request log line."""

    __slots__ = (
        "_m", "arrival", "first_token", "last_token", "num_generated",
        "num_prompt", "num_cached", "finish_reason",
    )  # fmt: skip

    def __init__(self, metrics: _RoleMetrics, arrival: float | None = None) -> None:
        self._m = metrics
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token: float | None = None
        self.last_token = 0.0
        self.num_generated = 0
        self.num_prompt = 0
        self.num_cached = 0
        self.finish_reason = ""

    def on_tokens(self, num_new: int, num_prompt: int, num_cached: int, now: float) -> None:
        if num_new <= 0:
            return
        if self.first_token is None:
            self.first_token = now
            self.num_prompt = num_prompt
            self.num_cached = num_cached
            self._m.ttft.observe(now - self.arrival)
            self._m.prompt_tokens.inc(num_prompt)
        else:
            self._m.itl.observe(now - self.last_token)
        self.last_token = now
        self.num_generated += num_new
        self._m.generation_tokens.inc(num_new)

    def on_finished(self, finish_reason: str, timings: RequestTimings | None, now: float) -> None:
        self.finish_reason = finish_reason
        self._m.e2e.observe(now - self.arrival)
        self._m.success(finish_reason)
        if self.first_token is not None and self.num_generated > 1:
            self._m.tpot.observe(self.tpot)
        if timings is not None:
            self._m.queue.observe(max(0.0, timings.queue_time))
            self._m.prefill.observe(max(0.0, timings.prefill_time))
            self._m.decode.observe(max(0.0, timings.decode_time))

    @property
    def ttft(self) -> float:
        return (self.first_token - self.arrival) if self.first_token is not None else 0.0

    @property
    def tpot(self) -> float:
        if self.first_token is None or self.num_generated <= 1:
            return 0.0
        return (self.last_token - self.first_token) / (self.num_generated - 1)
