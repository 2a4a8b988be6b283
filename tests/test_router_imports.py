"""The router process never imports torch: it tokenizes, routes and streams, and importing
torch would cost it ~1.5 s before it can spawn its workers (and ~185 MB of memory). Checked in
a fresh interpreter doing what `pdserve serve` does up to the spawn: parse the flags, build the
workers' engine configs, load the tokenizer, build the server context's pieces."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from server.api.launch import gpu_device_nodes


@pytest.mark.skipif(gpu_device_nodes(), reason="a GPU host: the router asks torch how many GPUs")
def test_router_start_path_imports_no_torch():
    code = textwrap.dedent("""
        import argparse, sys
        from server.cli import main  # noqa: F401  (the entry point's module)
        from server.api.launch import add_serve_args, engine_configs, worker_plan
        from server.api.app import create_app  # noqa: F401
        from server.frontend.tokenizer_loader import load_tokenizer
        from router.cluster import Cluster  # noqa: F401
        p = argparse.ArgumentParser()
        add_serve_args(p)
        args = p.parse_args(["--num-workers", "2"])
        configs = engine_configs(args, len(worker_plan(args)))
        assert len(configs) == 2 and configs[0][0]["device"] in ("cpu", "auto"), configs
        load_tokenizer(None).encode("hello")
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
