"""Hugging Face transformers as the reference implementation: the same GGUF, dequantized to
float32 by transformers' own loader, greedy `generate` with its own KV cache."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=2)
def hf_model(gguf_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=dtype, **extra
    )
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding through HF's own incremental KV cache, never stopping at EOS.

    A plain loop rather than `generate(min_new_tokens=...)`: that would *mask* EOS, whereas
    pdserve's `ignore_eos` only keeps going past it, so the two would legitimately differ."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt_ids], device=model.device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]], device=model.device)
    return out


@torch.inference_mode()
def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 log-softmax of a full teacher-forced forward pass."""
    logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
