"""Backend selection by device capability, on any host: the capability and import probes are
monkeypatched, so the fallback chain FlashInfer (sm80+) → Triton (sm75+) → torch is checked
without a GPU. Also `pdserve env` and the random-weight presets on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from kernels import capabilities
from kernels.attention.selector import select_backend

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_device(monkeypatch):
    """Pretend a CUDA device of the given capability is present with the given modules."""

    def setup(cap: tuple[int, int], modules=("triton", "flashinfer")) -> None:
        monkeypatch.setattr(capabilities, "device_capability", lambda device: cap)
        monkeypatch.setattr(capabilities, "module_available", lambda name: name in modules)
        monkeypatch.delenv(capabilities.ENV_ATTENTION_BACKEND, raising=False)

    return setup


def test_hopper_picks_flashinfer(fake_device):
    fake_device((9, 0))
    assert capabilities.choose_attention_backend("auto", CUDA) == ("flashinfer", "fastest available")


@pytest.mark.parametrize(
    ("cap", "expected", "reason"),
    [
        ((7, 5), "triton", "flashinfer needs sm80+, this device is sm75"),
        ((7, 0), "torch", "triton needs sm75+, this device is sm70"),
    ],
)
def test_older_gpus_fall_back_and_log_why(fake_device, caplog, cap, expected, reason):
    fake_device(cap)
    with caplog.at_level(logging.INFO, logger="kernels.attention.selector"):
        cls = select_backend("auto", CUDA)
    assert cls.name == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels.attention.selector"]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"attention backend: {expected} (")
    assert reason in lines[0]


def test_missing_flashinfer_falls_back_to_triton(fake_device):
    fake_device((9, 0), modules=("triton",))
    choice = capabilities.choose_attention_backend("auto", CUDA)
    assert choice == ("triton", "flashinfer cannot be imported")


def test_missing_triton_falls_back_to_torch(fake_device):
    fake_device((9, 0), modules=("flashinfer",))
    choice = capabilities.choose_attention_backend("auto", CUDA)
    assert choice.name == "torch"
    assert "triton" in choice.why


def test_request_and_env(fake_device, monkeypatch):
    fake_device((7, 5))
    # An explicit request falls down the chain from itself, saying so.
    choice = capabilities.choose_attention_backend("flashinfer", CUDA)
    assert choice.name == "triton"
    assert choice.why.startswith("flashinfer requested, but flashinfer needs sm80+")
    assert capabilities.choose_attention_backend("torch", CUDA) == ("torch", "requested")
    # The environment variable stands in for "auto" only.
    monkeypatch.setenv(capabilities.ENV_ATTENTION_BACKEND, "torch")
    assert capabilities.choose_attention_backend("auto", CUDA) == ("torch", "requested")
    assert capabilities.choose_attention_backend("triton", CUDA) == ("triton", "requested")
    with pytest.raises(ValueError, match="unknown attention backend"):
        capabilities.choose_attention_backend("cudnn", CUDA)


def test_cpu_is_torch_without_probing(monkeypatch):
    monkeypatch.delenv(capabilities.ENV_ATTENTION_BACKEND, raising=False)

    def boom(name):
        raise AssertionError("a CPU choice must not import GPU modules")

    monkeypatch.setattr(capabilities, "module_available", boom)
    choice = capabilities.choose_attention_backend("auto", torch.device("cpu"))
    assert choice.name == "torch"
    assert capabilities.triton_ops_usable(torch.device("cpu")).name == "torch"


def test_env_report_lists_versions_and_choices():
    from server.env_report import report

    rows = dict(report())
    for key in ("torch", "torch CUDA", "driver", "triton", "flashinfer", "nixl"):
        assert key in rows
    if not torch.cuda.is_available():
        assert rows["cpu attention"].startswith("torch (")


def test_env_command_prints(capsys):
    from server.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "torch" in out


def test_random_preset_builds_deterministically():
    from server.models.llama import LlamaForCausalLM
    from server.models.presets import PRESETS, init_random_weights, preset_config

    cfg = preset_config("random:smollm2-135m")
    assert cfg is PRESETS["smollm2-135m"]
    big = preset_config("llama-3.1-8b")
    assert (big.num_layers, big.hidden_size, big.num_heads, big.num_kv_heads) == (32, 4096, 32, 8)
    assert (big.intermediate_size, big.vocab_size) == (14336, 128256)
    assert big.rope_scaling["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="presets"):
        preset_config("random:gpt-5")
    tiny = cfg.__class__(**{**cfg.__dict__, "num_layers": 2})
    a, b = LlamaForCausalLM(tiny, torch.float32, 64), LlamaForCausalLM(tiny, torch.float32, 64)
    init_random_weights(a, seed=3)
    init_random_weights(b, seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    w = a.layers[0].qkv_proj.weight
    assert 0.015 < w.std().item() < 0.025
    assert torch.equal(a.layers[0].input_layernorm.weight, torch.ones_like(a.layers[0].input_layernorm.weight))


def test_random_model_runs_in_the_engine():
    from server.engine.engine import EngineConfig
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(EngineConfig(model="random:smollm2-135m", dtype="float32", device="cpu",
                           kv_cache_memory="32MiB", max_model_len=256, progress=False))
    assert llm.engine.model_name == "random-smollm2-135m"
    out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 4


def test_pdl_choice_follows_capability_and_env(monkeypatch):
    """Programmatic dependent launch: on for sm90+ unless PDSERVE_PDL=0. The device capability
    is patched (no GPU on the CI machine: the one mock here)."""
    from kernels.capabilities import pdl_choice

    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("PDSERVE_PDL", raising=False)
    assert pdl_choice(torch.device("cpu")).name == "off"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pdl_choice(cuda) == ("on", "sm90+")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert pdl_choice(cuda) == ("off", "needs sm90+, this is sm80")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("PDSERVE_PDL", "0")
    assert pdl_choice(cuda) == ("off", "PDSERVE_PDL=0")


def test_triton_decode_batches_setting(monkeypatch):
    """PDSERVE_TRITON_DECODE_BATCHES="min-max" and PDSERVE_TRITON_DECODE_TILE="n,warps,stages"
    parse into (min, max, tile); the defaults come from the module (the first candidate tile,
    timed at start-up); a fixed tile turns the timing off; a bad tile says so."""
    from kernels import capabilities as c

    monkeypatch.delenv("PDSERVE_TRITON_DECODE_BATCHES", raising=False)
    monkeypatch.delenv("PDSERVE_TRITON_DECODE_TILE", raising=False)
    lo, hi = (int(v) for v in c.TRITON_DECODE_BATCHES.split("-"))
    assert c.triton_decode_batches() == (lo, hi, c.TRITON_DECODE_TILES[0])
    assert c.triton_decode_tuned()
    monkeypatch.setenv("PDSERVE_TRITON_DECODE_BATCHES", "16-128")
    monkeypatch.setenv("PDSERVE_TRITON_DECODE_TILE", "128,8,3")
    assert c.triton_decode_batches() == (16, 128, (128, 8, 3))
    assert not c.triton_decode_tuned()  # a fixed tile: nothing is timed
    monkeypatch.setenv("PDSERVE_TRITON_DECODE_BATCHES", "0-0")
    assert c.triton_decode_batches()[:2] == (0, 0)
    monkeypatch.setenv("PDSERVE_TRITON_DECODE_TILE", "64,4")
    with pytest.raises(ValueError, match="BLOCK_N,warps,stages"):
        c.triton_decode_batches()


def test_skinny_gemm_setting(monkeypatch):
    from kernels.capabilities import skinny_gemm_enabled

    monkeypatch.delenv("PDSERVE_SKINNY_GEMM", raising=False)
    assert skinny_gemm_enabled()
    monkeypatch.setenv("PDSERVE_SKINNY_GEMM", "0")
    assert not skinny_gemm_enabled()


def test_blas_plan_setting_and_env_line(monkeypatch):
    from kernels.capabilities import blas_plan_enabled
    from server.env_report import decode_linears_line

    monkeypatch.delenv("PDSERVE_BLAS_PLAN", raising=False)
    assert blas_plan_enabled()
    monkeypatch.setenv("PDSERVE_BLAS_PLAN", "0")
    assert not blas_plan_enabled()
    assert decode_linears_line(True, True) == (
        "cuBLAS or cuBLASLt or the skinny GEMM, timed per batch size at engine start")
    assert decode_linears_line(False, True) == (
        "torch's default BLAS library or the skinny GEMM, timed per batch size at engine start (PDSERVE_BLAS_PLAN=0)")
    assert decode_linears_line(True, False) == (
        "cuBLAS or cuBLASLt, timed per batch size at engine start (PDSERVE_SKINNY_GEMM=0)")
    assert decode_linears_line(False, False) == (
        "torch's default BLAS library (PDSERVE_BLAS_PLAN=0, PDSERVE_SKINNY_GEMM=0)")


def test_decode_tile_for():
    """The per-batch rule of the FlashInfer backend's Triton decode: outside the range always
    FlashInfer; untuned, the default tile across the range; tuned, the choice of the smallest
    timed batch size (the CUDA graph) that holds the batch, FlashInfer above them all."""
    from kernels.attention.decode_tune import tile_for

    a, b = (32, 4, 2), (64, 4, 3)
    assert tile_for(40, 33, 128, a, None) == a
    assert tile_for(32, 33, 128, a, None) is None and tile_for(129, 33, 128, a, None) is None
    tuned = {64: b, 128: None}
    assert tile_for(33, 33, 128, a, tuned) == b and tile_for(64, 33, 128, a, tuned) == b
    assert tile_for(65, 33, 128, a, tuned) is None and tile_for(128, 33, 128, a, tuned) is None
    assert tile_for(100, 33, 100, a, {64: a, 100: b}) == b  # max_num_seqs 100: the last graph
    assert tile_for(120, 33, 128, a, {64: a, 100: b}) is None  # no graph holds it
    assert tile_for(40, 0, 0, a, tuned) is None  # "0-0": never, tuned or not


def test_decode_tune_picks(monkeypatch):
    """decode_tune.tune's choice per batch size, with the GPU timings replaced by given numbers
    (the kernels need a GPU; tests/test_gpu_kernels.py times them for real): the fastest tile
    that fits, only if it beats FlashInfer by MIN_GAIN; sizes outside the backend's range are
    not timed; the context is what the cache holds per sequence, at most TUNE_CONTEXT; a cache
    without a block per sequence times nothing."""
    from types import SimpleNamespace

    from kernels.attention import decode_tune

    a, b = (32, 4, 2), (64, 4, 3)
    timings = {64: {None: 100.0, a: 93.0, b: 95.0}, 128: {None: 100.0, a: 99.0, b: 98.5},
               96: {None: 100.0, a: 90.0}}  # 96: tile b does not fit the device
    seen = {}

    def fake_time_size(backend, size, ctx, tiles, gen):
        seen[size] = ctx
        return timings[size]

    monkeypatch.setattr(decode_tune, "_time_size", fake_time_size)

    def backend(blocks):  # kv_cache [blocks, layers, 2, block_size 16, Hkv, D]
        return SimpleNamespace(kv_cache=torch.empty(blocks, 2, 2, 16, 1, 1), _triton_lo=33, _triton_hi=128)

    chosen, lines = decode_tune.tune(backend(1000), [16, 32, 64, 96, 128], 4096, [a, b])
    assert chosen == {64: a, 96: a, 128: None}  # 128: a 1.5% win is inside MIN_GAIN
    assert seen == {64: 1000 // 64 * 16, 96: 1000 // 96 * 16, 128: 1000 // 128 * 16}
    assert [line.split(":")[0] for line in lines] == [
        "decode attention at 64 sequences x 240 tokens", "decode attention at 96 sequences x 160 tokens",
        "decode attention at 128 sequences x 112 tokens"]
    assert "(64, 4, 3) does not fit" in lines[1] and "FlashInfer;" in lines[2]
    seen.clear()
    chosen, lines = decode_tune.tune(backend(100_000), [64], 700, [a, b])
    assert seen == {64: 700} and chosen == {64: a}  # capped by max_context
    seen.clear()
    chosen, lines = decode_tune.tune(backend(100), [128], 4096, [a, b])
    assert seen == {} and chosen == {128: None} and "nothing to time" in lines[0]
