"""Shared fixtures. Heavy objects (models) are session-scoped: CI has 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available():
    # Triton kernels can only run in its CPU interpreter here, which is chosen when triton and
    # each @triton.jit are first imported: set it before any test imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gguf_path() -> str:
    from server.models.loader import embedded_model_path

    return str(embedded_model_path())


@pytest.fixture(scope="session")
def smollm_tokenizer(gguf_path: str):
    """The embedded model's tokenizer, built once: parsing the GGUF takes seconds."""
    from server.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_path)


_LOADED: dict = {}


@pytest.fixture(scope="module")
def share_loaded_models():
    """While active, EngineCores built with the same (model, dtype, device, max_positions,
    seed) share one real loaded model instead of parsing and dequantizing the GGUF again
    (~4 s each on CI). The engines only read the weights (`pack_linears` leaves an already
    packed model as it is), so sharing them cannot change what a test sees. Kept for the
    session: float32 SmolLM2 is ~0.5 GiB."""
    import server.engine.engine as engine_module

    real = engine_module.load_model

    def load_model(model, dtype, device, max_positions=None, progress=True, seed=0):
        key = (model, dtype, str(device), max_positions, seed)
        if key not in _LOADED:
            _LOADED[key] = real(model, dtype, device, max_positions, progress=progress, seed=seed)
        return _LOADED[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "load_model", load_model)
        yield


@pytest.fixture(scope="session")
def colocated_outputs() -> list[dict]:
    """The colocated reference of the disaggregation tests (tests/test_disagg_e2e.py and
    tests/test_multihost_netns.py): `pdserve serve` with one worker doing everything, greedy
    tokens and usage of every prompt of test_disagg_e2e.PROMPTS, started once per session."""
    from server.api.server_process import ServerProcess
    from tests.test_disagg_e2e import COMMON, PROMPTS, complete

    with ServerProcess([*COMMON, "--num-workers", "1"]) as proc:
        return complete(proc.base_url, PROMPTS)
