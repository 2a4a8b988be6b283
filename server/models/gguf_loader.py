"""GGUF checkpoints: config from metadata (server/models/gguf_file.py), tensors dequantized to
float32 (server/models/gguf_dequant.py), renamed to Hugging Face names so
`LlamaForCausalLM.load_weights` has one input format."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from server.models.config import GGUF_ARCHITECTURES, ModelConfig, UnsupportedModelError
from server.models.gguf_file import GGUFFile

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def open_gguf(path: str | Path) -> GGUFFile:
    return GGUFFile(path)


def gguf_config(reader: GGUFFile, name: str) -> ModelConfig:
    field = reader.fields.get
    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}."
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(
            "this GGUF stores llama3 RoPE scaling as a rope_freqs tensor, which pdserve does not "
            "read yet; load the Hugging Face folder of the model instead."
        )
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    vocab = field(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"])
    hf_arch = GGUF_ARCHITECTURES[arch]
    return ModelConfig(
        architecture=hf_arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=hf_arch == "Qwen2ForCausalLM",
        name=name,
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time q/k row permutation (it interleaves the two rotary
    halves for its GPT-J-style RoPE); we use the HF rotate-half convention."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    base, _, kind = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        mapped = _LAYER_NAMES.get(part)
        return None if mapped is None else f"model.layers.{idx}.{mapped}.{kind}"
    mapped = _TOP_NAMES.get(base)
    return None if mapped is None else f"{mapped}.{kind}"


def gguf_weights(reader: GGUFFile, cfg: ModelConfig, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor) for every tensor, dequantizing as it goes."""
    from tqdm import tqdm

    from server.models.gguf_dequant import dequantize

    permute = cfg.architecture == "LlamaForCausalLM"
    for t in tqdm(reader.tensors, desc="loading weights", unit="tensor", disable=not progress):
        name = _hf_name(t.name)
        if name is None:
            raise UnsupportedModelError(f"unexpected GGUF tensor {t.name!r}")
        w = dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.dim() != len(t.shape) else w
        if permute and ".self_attn.q_proj." in name:
            w = _unpermute(w, cfg.num_heads)
        elif permute and ".self_attn.k_proj." in name:
            w = _unpermute(w, cfg.num_kv_heads)
        yield name, w.contiguous()
