"""deploy/warm_flashinfer.py on the CPU: which FlashInfer JIT modules it builds, for which head
config and archs. Building and running them needs nvcc and a GPU (deploy/README.md says where
that was done); nothing here imports flashinfer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
sys.path.insert(0, str(DEPLOY))
import warm_flashinfer as wf  # noqa: E402

sys.path.remove(str(DEPLOY))


def test_fa2_serves_decode_and_prefill_fa3_only_when_asked_for_on_hopper():
    specs = wf.kernel_specs([128, 64, 128], ["bfloat16"], "fa2", ["8.0", "9.0"])
    assert [s.describe() for s in specs] == [
        "batch_prefill backend=fa2 dtype=bfloat16 head_dim=64 idx=int32",
        "batch_prefill backend=fa2 dtype=bfloat16 head_dim=128 idx=int32",
    ]
    auto = wf.kernel_specs([128], ["bfloat16", "float16"], "auto", ["9.0"])
    assert {(s.backend, s.dtype) for s in auto} == {
        ("fa2", "bfloat16"),
        ("fa3", "bfloat16"),
        ("fa2", "float16"),
        ("fa3", "float16"),
    }
    assert {s.backend for s in wf.kernel_specs([128], ["bfloat16"], "auto", ["8.0", "8.9"])} == {
        "fa2"
    }


@pytest.mark.parametrize(
    ("env", "archs"),
    [
        ({"FLASHINFER_CUDA_ARCH_LIST": "8.0 8.9 9.0"}, ["8.0", "8.9", "9.0"]),
        ({"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}, ["8.0", "9.0"]),
        ({}, []),
    ],
)
def test_arch_list(monkeypatch, env, archs):
    monkeypatch.delenv("FLASHINFER_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert wf.arch_list() == archs


def test_head_config_from_a_hugging_face_folder(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096})
    )
    (hc,) = wf.resolve_head_configs(wf.parse_args(["--model", str(tmp_path)]))
    assert (hc.num_heads, hc.num_kv_heads, hc.head_dim) == (32, 8, 128)


def test_head_config_from_the_embedded_gguf_and_a_preset(gguf_path):
    (hc,) = wf.resolve_head_configs(wf.parse_args(["--model", gguf_path]))
    assert (hc.num_heads, hc.num_kv_heads, hc.head_dim) == (9, 3, 64)  # SmolLM2-135M
    (hc,) = wf.resolve_head_configs(wf.parse_args(["--preset", "llama-3.1-8b"]))
    assert (hc.num_heads, hc.num_kv_heads, hc.head_dim) == (32, 8, 128)


def test_list_prints_the_modules_and_imports_neither_torch_nor_flashinfer():
    code = (
        "import sys, warm_flashinfer as w\n"
        "assert w.main(['--list', '--head-dim', '128', '--head-dim', '64']) == 0\n"
        "assert not {'torch', 'flashinfer'} & set(sys.modules), 'imported'\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=DEPLOY, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "head_dim=64" in r.stdout and "head_dim=128" in r.stdout


def test_compile_only_wants_an_arch_list(monkeypatch, capsys):
    monkeypatch.delenv("FLASHINFER_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert wf.compile_only(wf.kernel_specs([128], ["bfloat16"], "fa2", [])) == 2
    assert "FLASHINFER_CUDA_ARCH_LIST" in capsys.readouterr().err
