"""EngineConfig rejects values that would build a dead or broken engine, naming the flag; the CLI
turns that into one line on stderr and a non-zero exit before anything loads (no model, no
torch import in the router process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.engine.config import ATTENTION_BACKENDS, MAX_NUM_SEQS, EngineConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("max_num_seqs", 0, "--max-num-seqs"),  # used to build an engine that never scheduled
        ("max_num_seqs", -3, "--max-num-seqs"),
        ("max_num_seqs", MAX_NUM_SEQS + 1, "--max-num-seqs"),
        ("max_num_batched_tokens", 0, "--max-num-batched-tokens"),
        ("block_size", 0, "--block-size"),
        ("max_model_len", 1, "--max-model-len"),
        ("max_piecewise_tokens", -1, "--max-piecewise-tokens"),
        ("long_prefill_token_threshold", -1, None),  # no flag: the Python API's only
        ("gpu_memory_utilization", 1.5, "--gpu-memory-utilization"),
        ("gpu_memory_utilization", -0.1, "--gpu-memory-utilization"),
        ("num_threads", 0, "--worker-threads"),
        ("max_num_seqs", 2.5, "--max-num-seqs"),
        ("dtype", "foo", "--dtype"),
        ("attention_backend", "flashattn", "--attention-backend"),
        ("device", "tpu", "--device"),
        ("device", "cuda:x", "--device"),
        ("kv_cache_memory", "abc", "--kv-cache-memory"),
        ("kv_cache_memory", -1, "--kv-cache-memory"),
    ],
)
def test_bad_values_name_their_flag(field, value, flag):
    with pytest.raises(ValueError, match=f"{field} \\({flag}\\)" if flag else f"^{field} must"):
        EngineConfig(**{field: value})


def test_edges_that_are_valid():
    EngineConfig()
    EngineConfig(max_num_seqs=1, max_num_batched_tokens=1, block_size=1, max_model_len=2,
                 max_piecewise_tokens=0, gpu_memory_utilization=0, num_threads=1)
    EngineConfig(max_num_seqs=MAX_NUM_SEQS, gpu_memory_utilization=1.0, dtype="bf16", kv_cache_memory=0)
    EngineConfig(kv_cache_memory="1.5 GB", dtype="float32", device="cuda:1")
    EngineConfig(device="cpu")


def test_attention_backend_names_match_the_fallback_chain():
    from kernels.capabilities import ATTENTION_CHAIN

    assert ("auto", *ATTENTION_CHAIN) == ATTENTION_BACKENDS


@pytest.mark.parametrize(("argv", "flag"), [
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["serve", "--kv-cache-memory", "abc"], "--kv-cache-memory"),  # was a worker's traceback
    (["serve", "--dtype", "foo"], "--dtype"),
    (["generate", "hi", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
    (["serve", "--device", "tpu"], "--device"),
    (["generate", "hi", "--max-model-len", "100000000"], "--max-model-len"),  # the model's check
])  # fmt: skip
def test_cli_exits_with_the_flag_named(argv, flag):
    proc = subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "pdserve: error:" in proc.stderr and flag in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "listening" not in proc.stderr


def test_a_context_longer_than_the_model_is_refused_in_one_line():
    """--max-model-len past the model's max_position_embeddings: refused before the RoPE tables
    are sized to it (100M positions tried to allocate 25.6 GB), as one log line from the worker
    and a failed start, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--max-model-len", "100000000",
                           "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--max-model-len" in proc.stderr and "8192" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "allocate" not in proc.stderr
