"""Choose an attention backend by name at start-up. "auto" takes the fastest one that works
on this device; the GPU issue adds FlashInfer and Triton in front of the torch reference."""

from __future__ import annotations

import logging
import os

import torch

from kernels.attention.base import AttentionBackend
from kernels.attention.torch_backend import TorchAttentionBackend

log = logging.getLogger(__name__)

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}


def select_backend(name: str, device: torch.device) -> type[AttentionBackend]:
    name = os.environ.get("PDSERVE_ATTENTION_BACKEND", name) if name == "auto" else name
    if name == "auto":
        cls, why = TorchAttentionBackend, f"the only backend for device {device.type}"
    elif name in BACKENDS:
        cls, why = BACKENDS[name], "requested"
    else:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")
    log.info("attention backend: %s (%s)", cls.name, why)
    return cls
