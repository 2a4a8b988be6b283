"""server.models.rope against transformers' Llama rotary embedding.

The cos/sin tables are transformers' bit for bit (same inverse frequencies, llama3 scaling,
rounding to the model dtype). The rotation itself rounds less often: transformers computes
`q * cos + rotate_half(q) * sin` in the model dtype (two rounded products, a rounded sum), ours
rounds `q * cos` and then one fused multiply-add (the Triton kernels: float32 throughout, one
rounding). So it may differ from transformers by an ulp, but on average it must be no further
from the exact rotation (float64, of the same half-precision inputs and tables) than
transformers is.
Matching transformers' roundings exactly was tried (2026-12-02): teacher-forced agreement of
SmolLM2 with HF bf16 on the GPU did not move beyond run-to-run noise (mean 98.47% vs 98.43% with
the roundings of the time, over six engine configurations), while in three of the six the engine
fell below HF bf16's own agreement with HF float32 (565 vs 568 of 576 tokens).
"""

from __future__ import annotations

import pytest
import torch

from server.models.rope import RotaryEmbedding

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("theta", "scaling"), [(10000.0, None), (500000.0, LLAMA3)])
def test_rotary_embedding_vs_transformers(dtype, theta, scaling):
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
    hf_q, hf_k = (x[0].transpose(0, 1) for x in
                  apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin))
    ours = RotaryEmbedding(d, max_pos, theta, scaling, dtype)
    q_out, k_out = ours(pos, q, k)
    assert torch.equal(ours.cos[pos], cos[0]) and torch.equal(ours.sin[pos], sin[0])

    # the exact rotation of the same inputs and (rounded) tables
    c, s = cos[0].double()[:, None], sin[0].double()[:, None]
    for x, mine, theirs in ((q, q_out, hf_q), (k, k_out, hf_k)):
        xd = x.double()
        exact = xd * c + torch.cat((-xd[..., d // 2:], xd[..., : d // 2]), dim=-1) * s
        err_mine, err_theirs = (mine.double() - exact).abs(), (theirs.double() - exact).abs()
        assert err_mine.mean() <= err_theirs.mean()
        assert not torch.equal(mine, theirs)  # (the two roundings do differ on these inputs)
