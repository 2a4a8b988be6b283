"""Every Triton kernel the engine launches compiles for Hopper (sm90) and Ampere (sm80), checked
on a host without a GPU (tests/triton_compile_check.py says how). It runs in a subprocess:
this process's triton runs under the CPU interpreter (tests/conftest.py), which never calls
the compiler. Skipped where triton is absent (CI's CPU install) or CUDA is present (the GPU
tests compile and run the kernels there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("capability", [90, 80])
def test_kernels_compile_for_cuda(capability):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU tests compile the kernels for this device")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "tests.triton_compile_check", str(capability)],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
