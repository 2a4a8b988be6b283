"""Prometheus metrics: names, labels and what one request adds (no server)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.engine.outputs import EngineStats, RequestTimings
from server.metrics import RequestTracker, ServerMetrics, WorkerSample


def samples(metrics: ServerMetrics) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_one_request_feeds_every_request_metric():
    m = ServerMetrics(lambda: "tiny")
    role = m.for_role("both")
    t = RequestTracker(role, arrival=10.0)
    t.on_tokens(1, num_prompt=7, num_cached=4, now=10.5)
    t.on_tokens(1, 7, 4, now=10.6)
    t.on_tokens(2, 7, 4, now=10.8)
    t.on_finished(
        "length",
        RequestTimings(arrival=0.0, first_scheduled=0.1, first_token=0.4, finished=0.7),
        now=11.0,
    )
    assert abs(t.ttft - 0.5) < 1e-9 and abs(t.tpot - 0.1) < 1e-9
    s = samples(m)
    lab = frozenset({"model_name": "tiny", "role": "both"}.items())
    assert s[("pdserve:time_to_first_token_seconds_count", lab)] == 1
    assert abs(s[("pdserve:time_to_first_token_seconds_sum", lab)] - 0.5) < 1e-9
    assert s[("pdserve:inter_token_latency_seconds_count", lab)] == 2
    assert s[("pdserve:e2e_request_latency_seconds_count", lab)] == 1
    assert abs(s[("pdserve:request_queue_time_seconds_sum", lab)] - 0.1) < 1e-9
    assert abs(s[("pdserve:request_prefill_time_seconds_sum", lab)] - 0.3) < 1e-9
    assert abs(s[("pdserve:request_decode_time_seconds_sum", lab)] - 0.3) < 1e-9
    assert s[("pdserve:prompt_tokens_total", lab)] == 7
    assert s[("pdserve:generation_tokens_total", lab)] == 4
    assert (
        s[
            (
                "pdserve:request_success_total",
                frozenset({**dict(lab), "finished_reason": "length"}.items()),
            )
        ]
        == 1
    )


def test_worker_series_come_from_the_latest_stats():
    m = ServerMetrics(lambda: "tiny")
    workers = [
        WorkerSample("worker-0", "both", True, EngineStats(3, 1, 0.25, 100, 75, 40, 16, 2, 0, 0)),
        WorkerSample("worker-1", "both", False, None),
    ]
    m.attach_workers(lambda: workers)
    s = samples(m)
    w0 = frozenset({"model_name": "tiny", "worker_id": "worker-0", "role": "both"}.items())
    w1 = frozenset({"model_name": "tiny", "worker_id": "worker-1", "role": "both"}.items())
    assert s[("pdserve:num_requests_running", w0)] == 3
    assert s[("pdserve:num_requests_waiting", w0)] == 1
    assert s[("pdserve:kv_cache_usage_perc", w0)] == 0.25
    assert s[("pdserve:prefix_cache_queries_total", w0)] == 40
    assert s[("pdserve:prefix_cache_hits_total", w0)] == 16
    assert s[("pdserve:num_preemptions_total", w0)] == 2
    assert s[("pdserve:worker_up", w0)] == 1 and s[("pdserve:worker_up", w1)] == 0
    assert ("pdserve:num_requests_running", w1) not in s
