#!/usr/bin/env python3
"""Container health for pdserve (Docker HEALTHCHECK, Kubernetes exec probes). Standard library
only; exit 0 = healthy, 1 = not.

Router, or `pdserve serve` (PDSERVE_WORKER_ID unset): GET $PDSERVE_HEALTH_URL (default
http://127.0.0.1:8000/health), healthy on 200 (the router answers 200 once workers have joined).

Worker (PDSERVE_WORKER_ID set): a worker serves no HTTP; the router knows its state. This reads
the router's /metrics ($PDSERVE_ROUTER_URL, default http://router:8000; every address its host
name resolves to, so each router replica behind a headless Service is asked) and looks for
pdserve:worker_up{worker_id="$PDSERVE_WORKER_ID"}:
  --ready (default)  healthy when some router lists the worker as up (it loaded its model and its
                     handshake was accepted). Kubernetes startup and readiness probe.
  --alive            unhealthy only when routers answer and none lists the worker as up (a router
                     declared it dead: heartbeats stopped, or the router restarted and does not
                     know it); healthy when no router answers, since restarting the worker would
                     not fix the router. Kubernetes liveness probe: a restart makes it join again.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT = float(os.environ.get("PDSERVE_HEALTH_TIMEOUT", "3"))
_SAMPLE = re.compile(r"^pdserve:worker_up\{(?P<labels>.*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def router_urls(base: str) -> list[str]:
    """One /metrics URL per address the router's host name resolves to."""
    u = urllib.parse.urlsplit(base)
    port = u.port or 80
    try:
        addrs = sorted(
            {a[4][0] for a in socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)}
        )
    except OSError:
        return []
    return [f"{u.scheme}://{f'[{a}]' if ':' in a else a}:{port}/metrics" for a in addrs]


def worker_up(metrics_text: str, worker_id: str) -> bool:
    for line in metrics_text.splitlines():
        m = _SAMPLE.match(line)
        if m and dict(_LABEL.findall(m["labels"])).get("worker_id") == worker_id:
            return float(m["value"]) == 1.0
    return False


def check_worker(worker_id: str, router: str, alive: bool) -> bool:
    answered = 0
    for url in router_urls(router):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
                text = r.read().decode("utf-8", "replace")
        except (OSError, urllib.error.URLError):
            continue
        answered += 1
        if worker_up(text, worker_id):
            return True
    return alive and answered == 0


def main(argv: list[str]) -> int:
    worker_id = os.environ.get("PDSERVE_WORKER_ID")
    if not worker_id:
        return (
            0
            if http_ok(os.environ.get("PDSERVE_HEALTH_URL", "http://127.0.0.1:8000/health"))
            else 1
        )
    router = os.environ.get("PDSERVE_ROUTER_URL", "http://router:8000")
    return 0 if check_worker(worker_id, router, alive="--alive" in argv) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
