"""Hugging Face model folders: config.json + *.safetensors (never pickled .bin files: loading a
pickle runs arbitrary code)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from server.models.config import ModelConfig


def hf_config(folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json")
    return ModelConfig.from_hf(json.loads(cfg_path.read_text()), name=folder.name)


def hf_weights(folder: Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    from tqdm import tqdm

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder} has no *.safetensors files (pickled .bin checkpoints are not loaded: "
            "convert them to safetensors)"
        )
    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 (safe_open is not a dict)
    for h, k in tqdm(keys, desc="loading weights", unit="tensor", disable=not progress):
        yield k, h.get_tensor(k)
