"""Model shapes for benchmarks and GPU tests, built with random weights (`--model random:NAME`):
the real architectures' sizes without a download. The text such a model writes is meaningless;
benchmarks feed and read token ids. Its tokenizer is the embedded SmolLM2 one (ids past that
vocabulary still run through the model; they just have no text)."""

from __future__ import annotations

import torch

from server.models.config import ModelConfig

RANDOM_PREFIX = "random:"
INIT_STD = 0.02

PRESETS: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        attention_bias=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        name="random-llama-3.1-8b",
    ),
    "smollm2-135m": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attention_bias=False,
        name="random-smollm2-135m",
    ),
}


def preset_config(model: str) -> ModelConfig:
    """`random:NAME` (or NAME) -> its ModelConfig; ValueError naming the presets otherwise."""
    name = model.removeprefix(RANDOM_PREFIX)
    if name not in PRESETS:
        raise ValueError(f"unknown random model {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Normal(0, INIT_STD) for every matrix and embedding, ones for norm weights, zeros for
    biases; drawn on the parameters' own device from one seeded generator (deterministic for a
    given device type and seed)."""
    params = list(model.named_parameters())
    if not params:
        return
    gen = torch.Generator(device=params[0][1].device)
    gen.manual_seed(seed)
    for name, p in params:
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, INIT_STD, generator=gen)
