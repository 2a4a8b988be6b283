"""Choose an attention backend by name at start-up. "auto" (or env PDSERVE_ATTENTION_BACKEND)
takes the fastest one that runs here: FlashInfer (sm80+) → Triton (sm75+) → torch; a named one
falls down the same chain when it cannot run. One log line says which and why
(`kernels.capabilities`). Backend modules are imported only once chosen: the CPU test suite
never imports flashinfer or triton."""

from __future__ import annotations

import importlib
import logging

import torch

from kernels.attention.base import AttentionBackend
from kernels.capabilities import choose_attention_backend

log = logging.getLogger(__name__)

# name -> "module:class", imported lazily
BACKENDS: dict[str, str] = {
    "flashinfer": "kernels.attention.flashinfer_backend:FlashInferAttentionBackend",
    "triton": "kernels.attention.triton_backend:TritonAttentionBackend",
    "torch": "kernels.attention.torch_backend:TorchAttentionBackend",
}


def backend_class(name: str) -> type[AttentionBackend]:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def select_backend(name: str, device: torch.device) -> type[AttentionBackend]:
    choice = choose_attention_backend(name, device)
    cls = backend_class(choice.name)
    log.info("attention backend: %s (%s)", cls.name, choice.why)
    return cls
