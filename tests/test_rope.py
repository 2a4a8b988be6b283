"""server.models.rope against transformers' Llama rotary embedding, bit for bit.

RoPE is where an engine's half-precision roundings most easily drift from the reference's:
transformers rounds its cos/sin tables to the model dtype and computes
`q * cos + rotate_half(q) * sin` in that dtype (two rounded products, then a rounded sum). A
fused multiply-add rounds once instead: closer to float32, yet a systematic difference on every
rotated element that shows up as flipped near-ties against HF bf16. The torch reference here,
and the Triton kernels tested against it on the GPU (tests/test_gpu_kernels.py), round as
transformers does.
"""

from __future__ import annotations

import pytest
import torch

from server.models.rope import RotaryEmbedding

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("theta", "scaling"), [(10000.0, None), (500000.0, LLAMA3)])
def test_rotary_embedding_matches_transformers_bitwise(dtype, theta, scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hq, hkv, d, max_pos, t = 4, 2, 128, 16384, 300
    cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                      max_position_embeddings=max_pos, rope_theta=theta,
                      rope_scaling=dict(scaling) if scaling else None)
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, max_pos, (t,), generator=g)
    q = (torch.randn(t, hq, d, generator=g) * 3).to(dtype)
    k = (torch.randn(t, hkv, d, generator=g) * 3).to(dtype)

    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours = RotaryEmbedding(d, max_pos, theta, scaling, dtype)
    q_out, k_out = ours(pos, q, k)

    assert torch.equal(ours.cos[pos], cos[0]) and torch.equal(ours.sin[pos], sin[0])
    assert torch.equal(q_out, hf_q[0].transpose(0, 1))
    assert torch.equal(k_out, hf_k[0].transpose(0, 1))
