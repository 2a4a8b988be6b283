"""The repository's own lint gates, run as tests so CI enforces them: ruff over the whole tree
and mypy over the plain-Python core (router, KV cache, scheduler; `[tool.mypy]` in
pyproject.toml names the files). Both tools come with the test extra."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean():
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean_on_the_core():
    proc = _run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
