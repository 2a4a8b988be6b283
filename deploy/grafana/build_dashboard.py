#!/usr/bin/env python3
"""Generate deploy/grafana/pdserve-dashboard.json (the file Grafana imports).

Edit the panels here and run `python deploy/grafana/build_dashboard.py`; the test
tests/test_deploy_manifests.py fails when the JSON and this script disagree, and checks every
metric the dashboard queries against a live pdserve /metrics scrape.

Conventions:
  * Every query filters on `job=~"$job"` (default pdserve-router: the router's /metrics covers the
    whole cluster; workers' own ports are another job, so nothing is counted twice).
  * Engine series (labelled worker_id) come from the router, one copy per router replica: they
    are deduplicated with `max by (worker_id, role)` before any sum.
  * Request histograms are observed once, by the router that served the request: plain sums.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("pdserve-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

REQ = 'job=~"$job", model_name=~"$model", role=~"$role"'
WRK = 'job=~"$job", model_name=~"$model", role=~"$role", worker_id=~"$worker"'
HTTP = 'job=~"$job"'
KV = 'job=~"$job", worker_id=~"$worker"'


def quantiles(metric: str, sel: str, by: str = "le", qs=(0.5, 0.9, 0.99), legend: str = "") -> list:
    return [
        (
            f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
            f"p{round(q * 100)}{legend}",
        )
        for q in qs
    ]


def worker(expr_metric: str, sel: str = WRK, fn: str = "") -> str:
    inner = f"{expr_metric}{{{sel}}}" if not fn else f"{fn}({expr_metric}{{{sel}}}[{RATE}])"
    return f"max by (worker_id, role) ({inner})"


def hit_rate(sel: str = WRK, per_worker: bool = True) -> str:
    hits = worker("pdserve:prefix_cache_hits_total", sel, "rate")
    queries = worker("pdserve:prefix_cache_queries_total", sel, "rate")
    if per_worker:
        return f"{hits} / {queries}"
    return f"sum({hits}) / sum({queries})"


# (title, unit, [(expr, legend)], kind, width)
# fmt: off
SECTIONS: list[tuple[str, list[tuple]]] = [
    ("Overview", [
        ("Workers up", "short",
         [(f"sum by (role) ({worker('pdserve:worker_up')})", "{{role}}")], "stat", 6),
        ("Requests finished /s", "reqps",
         [(f"sum(rate(pdserve:request_success_total{{{REQ}}}[{RATE}]))", "requests/s")], "stat", 6),
        ("Generated tokens /s", "short",
         [(f"sum(rate(pdserve:generation_tokens_total{{{REQ}}}[{RATE}]))", "tokens/s")], "stat", 6),
        ("Prefix-cache hit rate", "percentunit",
         [(hit_rate(per_worker=False), "hit rate")], "stat", 6),
    ]),
    ("Throughput", [
        ("Requests finished /s by reason", "reqps",
         [(f"sum by (finished_reason) (rate(pdserve:request_success_total{{{REQ}}}[{RATE}]))",
           "{{finished_reason}}")], "timeseries", 8),
        ("Tokens /s by role", "short",
         [(f"sum by (role) (rate(pdserve:prompt_tokens_total{{{REQ}}}[{RATE}]))", "prompt {{role}}"),
          (f"sum by (role) (rate(pdserve:generation_tokens_total{{{REQ}}}[{RATE}]))",
           "generated {{role}}")], "timeseries", 8),
        ("HTTP responses /s by status", "reqps",
         [(f"sum by (status) (rate(pdserve:http_requests_total{{{HTTP}}}[{RATE}]))", "{{status}}")],
         "timeseries", 8),
    ]),
    ("Latency", [
        ("Time to first token", "s",
         quantiles("pdserve:time_to_first_token_seconds", REQ), "timeseries", 8),
        ("Inter-token latency", "s",
         quantiles("pdserve:inter_token_latency_seconds", REQ), "timeseries", 8),
        ("End-to-end request latency", "s",
         quantiles("pdserve:e2e_request_latency_seconds", REQ), "timeseries", 8),
        ("TTFT p90 by role", "s",
         quantiles("pdserve:time_to_first_token_seconds", REQ, "le, role", (0.9,), " {{role}}"),
         "timeseries", 12),
        ("Time per stage, p90 by role", "s",
         quantiles("pdserve:request_queue_time_seconds", REQ, "le, role", (0.9,), " queue {{role}}")
         + quantiles("pdserve:request_prefill_time_seconds", REQ, "le, role", (0.9,),
                     " prefill {{role}}")
         + quantiles("pdserve:request_decode_time_seconds", REQ, "le, role", (0.9,),
                     " decode {{role}}"), "timeseries", 12),
    ]),
    ("Queues and KV cache, per worker", [
        ("Queue depth per stage", "short",
         [(f"sum by (role) ({worker('pdserve:num_requests_waiting')})", "waiting {{role}}"),
          (f"sum by (role) ({worker('pdserve:num_requests_running')})", "running {{role}}"),
          (f"sum({worker('pdserve:remote_prefills_inflight')})", "remote prefills in flight"),
          (f"sum({worker('pdserve:num_requests_remote_waiting')})", "waiting for remote KV")],
         "timeseries", 8),
        ("Waiting requests per worker", "short",
         [(worker("pdserve:num_requests_waiting"), "{{worker_id}} ({{role}})")], "timeseries", 8),
        ("Running requests per worker", "short",
         [(worker("pdserve:num_requests_running"), "{{worker_id}} ({{role}})")], "timeseries", 8),
        ("KV-cache usage per worker", "percentunit",
         [(worker("pdserve:kv_cache_usage_perc"), "{{worker_id}} ({{role}})")], "timeseries", 8),
        ("Prefix-cache hit rate per worker", "percentunit",
         [(hit_rate(), "{{worker_id}} ({{role}})")], "timeseries", 8),
        ("Preemptions /s per worker", "short",
         [(worker("pdserve:num_preemptions_total", fn="rate"), "{{worker_id}} ({{role}})")],
         "timeseries", 8),
    ]),
    ("Disaggregation", [
        ("Disaggregation decisions /s", "short",
         [(f"sum by (decision) (rate(pdserve:disagg_decision_total{{{HTTP}}}[{RATE}]))",
           "{{decision}}")], "timeseries", 8),
        ("Remote prefills that fell back to local /s", "short",
         [(f"sum by (reason) (rate(pdserve:disagg_fallback_total{{{HTTP}}}[{RATE}]))",
           "{{reason}}"),
          (f"sum(rate(pdserve:remote_prefill_retries_total{{{HTTP}}}[{RATE}]))", "retried")],
         "timeseries", 8),
        ("Remote prefill: queue and compute time", "s",
         quantiles("pdserve:remote_prefill_queue_time_seconds", HTTP, qs=(0.5, 0.9),
                   legend=" queue")
         + quantiles("pdserve:remote_prefill_time_seconds", HTTP, qs=(0.5, 0.9),
                     legend=" compute"), "timeseries", 8),
        ("Router and decode-worker queue time, p90 by path", "s",
         quantiles("pdserve:router_queue_time_seconds", HTTP, "le, path", (0.9,),
                   " router {{path}}")
         + quantiles("pdserve:decode_queue_time_seconds", HTTP, "le, path", (0.9,),
                     " decode {{path}}"), "timeseries", 12),
        ("Remote prefill in flight per worker", "short",
         [(worker("pdserve:num_requests_remote_waiting"), "waiting for KV {{worker_id}}"),
          (worker("pdserve:remote_prefills_inflight"), "prefilling {{worker_id}}")],
         "timeseries", 12),
    ]),
    ("KV transfer", [
        ("KV transfer bandwidth per worker", "Bps",
         [(f"sum by (worker_id) (rate(pdserve:kv_transfer_bytes_total{{{KV}}}[{RATE}]))",
           "{{worker_id}}")], "timeseries", 8),
        ("KV transfer time", "s",
         quantiles("pdserve:kv_transfer_seconds", KV, qs=(0.5, 0.9, 0.99)), "timeseries", 8),
        ("Descriptors per KV transfer (collation)", "short",
         [(f"sum(rate(pdserve:kv_transfer_descriptors_total{{{KV}}}[{RATE}])) / "
           f"sum(rate(pdserve:kv_transfer_seconds_count{{{KV}}}[{RATE}]))", "descriptors/transfer")],
         "timeseries", 8),
        ("KV transfer failures", "short",
         [(f"sum by (worker_id) (increase(pdserve:kv_transfer_failures_total{{{KV}}}[{RATE}]))",
           "{{worker_id}}")], "timeseries", 8),
        ("Remote KV blocks reserved per decode worker", "short",
         [(worker("pdserve:remote_kv_reserved_blocks"), "{{worker_id}}")], "timeseries", 8),
        ("KV leases expired, KV event gaps /s", "short",
         [(worker("pdserve:kv_lease_expiries_total", fn="rate"), "lease expired {{worker_id}}"),
          (f"sum(rate(pdserve:kv_event_gaps_total{{{HTTP}}}[{RATE}]))", "event-stream gaps")],
         "timeseries", 8),
    ]),
]
# fmt: on


def panel(pid: int, title: str, unit: str, targets: list, kind: str, grid: dict) -> dict:
    p = {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": grid,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DS,
                "expr": expr,
                "legendFormat": legend,
                "range": True,
                "instant": False,
            }
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
        }
        p["options"] = {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["mean", "max", "lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        p["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    return p


def query_var(name: str, label: str, query: str, *, all_: bool, current: str | None = None) -> dict:
    v = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"var-{name}"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "multi": all_,
        "includeAll": all_,
    }
    if all_:
        v["allValue"] = ".*"
        v["current"] = {"text": ["All"], "value": ["$__all"]}
    elif current:
        v["current"] = {"text": current, "value": current}
    return v


def build() -> dict:
    panels, pid, y = [], 1, 0
    for section, items in SECTIONS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": section,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for title, unit, targets, kind, w in items:
            h = 4 if kind == "stat" else 8
            if x + w > 24:
                x, y = 0, y + row_h
            panels.append(panel(pid, title, unit, targets, kind, {"h": h, "w": w, "x": x, "y": y}))
            pid, x, row_h = pid + 1, x + w, h
        y += row_h
    templating = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "hide": 0,
            "refresh": 1,
            "current": {},
        },
        query_var(
            "job",
            "Job",
            "label_values(pdserve:http_requests_total, job)",
            all_=False,
            current="pdserve-router",
        ),
        query_var(
            "model", "Model", 'label_values(pdserve:worker_up{job=~"$job"}, model_name)', all_=True
        ),
        {
            "name": "role",
            "label": "Role",
            "type": "custom",
            "query": "prefill,decode,both",
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "hide": 0,
            "current": {"text": ["All"], "value": ["$__all"]},
            "options": [],
        },
        query_var(
            "worker",
            "Worker",
            'label_values(pdserve:worker_up{job=~"$job", role=~"$role"}, worker_id)',
            all_=True,
        ),
    ]
    return {
        "uid": "pdserve-overview",
        "title": "pdserve",
        "description": "pdserve: latency, throughput, queues, KV cache and KV transfer, per worker. "
        "Generated by deploy/grafana/build_dashboard.py.",
        "tags": ["pdserve", "llm", "inference"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 41,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": templating},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
