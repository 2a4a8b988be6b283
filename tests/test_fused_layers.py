"""The model's fused small-batch path (`DecoderLayer._forward_fused`: four linears with the norms,
SiLU·mul and residual adds inside) computes the same block as the unfused path.

On CPU both paths run the torch references, so they must agree bit for bit: this checks the
restructuring (where the residual lives, which norm goes where, the bias) on every run of the
suite. On a GPU the fused path runs the Triton GEMV of kernels/triton/gemv.py and must agree
within the dtype's tolerance, on the 8B model's hidden size and on SmolLM2's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import ops
from kernels.attention.torch_backend import TorchAttentionBackend
from server.models.llama import LlamaForCausalLM
from server.models.presets import PRESETS, init_random_weights
from tests.paged_batch import make_batch, random_cache, rel_err


def tiny_config(hidden: int, inter: int, heads: int, kv_heads: int, bias: bool):
    return dataclasses.replace(
        PRESETS["smollm2-135m"], hidden_size=hidden, intermediate_size=inter, num_layers=3,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, attention_bias=bias,
        vocab_size=512, tie_word_embeddings=False, name="tiny",
    )  # fmt: skip


def randomize(model, bias: bool) -> None:
    """Random norm weights (init gives ones) and qkv biases, so a dropped one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
            elif bias and name.endswith("qkv_proj.bias"):
                p.normal_(0.0, 0.5)


def run_one_token(model, cfg, dtype, device, fused: bool, fused_linear=None):
    """One decode token (position 37, 37 cached tokens of random context) through the model;
    returns (final hidden state, the cache after the step, the logits, the logits of
    `forward_logits`: what the decode CUDA graphs capture, run again on the same inputs)."""
    gen = torch.Generator(device=device).manual_seed(1)
    cache = random_cache(16, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, dtype, device, gen)
    meta = make_batch([1], [37], 16, 16, device, gen)
    attn = TorchAttentionBackend(cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    attn.plan(meta)
    saved = ops.fuses_linears, ops.fused_linear
    ops.set_impl(fuses_linears=(lambda x: x.shape[0] == 1) if fused else ops.never,
                 fused_linear=fused_linear or ops.fused_linear_ref)
    try:
        ids = torch.tensor([7], device=device)
        hidden = model(ids, torch.tensor([37], device=device), attn)
        logits = model.compute_logits(hidden)
        cache_after = cache.clone()
        graph_logits = model.forward_logits(ids, torch.tensor([37], device=device), attn)
    finally:
        ops.set_impl(fuses_linears=saved[0], fused_linear=saved[1])
    assert graph_logits.dtype == logits.dtype == dtype  # the model's dtype: the sampler widens
    return hidden, cache_after, logits, graph_logits


@pytest.mark.parametrize("bias", [False, True])
def test_fused_path_is_the_same_block_on_cpu(bias):
    cfg = tiny_config(128, 320, 4, 2, bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, torch.float32, 64)
    init_random_weights(model, seed=3)
    randomize(model, bias)
    plain, plain_cache, plain_logits, plain_graph = run_one_token(model, cfg, torch.float32, torch.device("cpu"), fused=False)
    fused, fused_cache, fused_logits, fused_graph = run_one_token(model, cfg, torch.float32, torch.device("cpu"), fused=True)
    assert torch.equal(plain, fused)
    assert torch.equal(plain_cache, fused_cache)  # the K/V stored for the token too
    assert torch.equal(plain_logits, fused_logits)
    # forward_logits: the final norm inside lm_head on the fused path, the same numbers
    assert torch.equal(plain_graph, plain_logits)
    assert torch.equal(fused_graph, plain_logits)
    assert plain.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hidden", "inter", "heads", "kv_heads", "bias"),
                         [(4096, 14336, 32, 8, False), (576, 1536, 9, 3, False), (896, 4864, 14, 2, True)])
def test_fused_path_matches_unfused_on_gpu(dtype, hidden, inter, heads, kv_heads, bias):
    import kernels.triton as kt

    dev = torch.device("cuda")
    cfg = tiny_config(hidden, inter, heads, kv_heads, bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, dtype, 64).to(dev, dtype)
    init_random_weights(model, seed=3)
    randomize(model, bias)
    kt.install()
    try:
        plain, plain_cache, plain_logits, plain_graph = run_one_token(model, cfg, dtype, dev, fused=False)
        fused, fused_cache, fused_logits, fused_graph = run_one_token(model, cfg, dtype, dev, fused=True,
                                                                      fused_linear=ops.fused_linear)
    finally:
        kt.uninstall()
    assert rel_err(fused, plain.double()) < 2e-2
    assert rel_err(fused_cache, plain_cache.double()) < 2e-2
    assert rel_err(fused_logits, plain_logits.double()) < 2e-2
    assert torch.equal(plain_graph, plain_logits)
    assert rel_err(fused_graph, plain_logits.double()) < 2e-2  # norm inside lm_head's GEMV


@pytest.mark.gpu
@pytest.mark.parametrize(("hidden", "inter", "heads", "kv_heads", "bias"),
                         [(4096, 14336, 32, 8, False), (896, 4864, 14, 2, True)])
@pytest.mark.parametrize("rows", [16, 40])
def test_multi_row_fused_path_matches_unfused_on_gpu(hidden, inter, heads, kv_heads, bias, rows):
    """A decode batch of `rows` tokens on the fused layer path with the skinny GEMM planned for
    o, gate|up and down (what the decode graphs run where start-up tuning picked it) against
    the unfused path: hidden states, stored K/V and forward_logits within bf16 tolerance."""
    import kernels.triton as kt
    from kernels.triton import skinny_plan
    from kernels.triton.skinny_gemm import SkinnyConfig

    dev, dtype = torch.device("cuda"), torch.bfloat16
    cfg = tiny_config(hidden, inter, heads, kv_heads, bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, dtype, 128).to(dev, dtype)
    init_random_weights(model, seed=3)
    randomize(model, bias)
    layer = model.layers[0]
    tile = SkinnyConfig(64, 128, 4, 3, 2, True)
    plan = {(rows, *layer.o_proj.weight.shape, False, True): tile,
            (rows, *layer.gate_up_proj.weight.shape, True, False): tile,
            (rows, *layer.down_proj.weight.shape, False, True): tile}
    results = []
    kt.install()
    try:
        for p in (plan, {}):
            skinny_plan.set_plan(p)
            gen = torch.Generator(device=dev).manual_seed(1)
            cache = random_cache(256, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, dtype, dev, gen)
            meta = make_batch([1] * rows, [37 + i for i in range(rows)], 16, 256, dev, gen)
            attn = TorchAttentionBackend(cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            attn.plan(meta)
            ids = torch.arange(3, 3 + rows, device=dev)
            pos = meta.seq_lens.long() - 1
            assert ops.fuses_linears(torch.zeros(rows, hidden, device=dev)) == bool(p)
            hidden_out = model(ids, pos, attn)
            results.append((hidden_out, cache.clone(), model.forward_logits(ids, pos, attn)))
    finally:
        skinny_plan.set_plan({})
        kt.uninstall()
    (f_hidden, f_cache, f_logits), (p_hidden, p_cache, p_logits) = results
    assert rel_err(f_hidden, p_hidden.double()) < 2e-2
    assert rel_err(f_cache, p_cache.double()) < 2e-2
    assert rel_err(f_logits, p_logits.double()) < 2e-2
