"""Hugging Face transformers as the reference implementation: the same GGUF, dequantized to
float32 by transformers' own loader, greedy `generate` with its own KV cache."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=2)
def hf_model(gguf_path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=dtype
    )
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # never stop at EOS: compare the full length
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


@torch.inference_mode()
def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 log-softmax of a full teacher-forced forward pass."""
    logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
