"""RMSNorm folding (`DecoderLayer.fold_norms`): the norm weights moved into the qkv and gate|up
weights, and `_forward_folded`, the block without norm kernels that batches on the
rotate-and-store kernel run (each row's RMSNorm factor applied after qkv / gate|up, inside the
store and SiLU·mul kernels; the residual adds inside the o / down GEMMs).

On CPU (float32) the folded model must compute the same function as the loaded one, on both
of its paths, for decode, prefill and mixed batches. The two kernels' factor variants run
under Triton's CPU interpreter where triton is installed, and compiled on a GPU against the
torch references; there the folded engine path is also checked against the unfolded one at the
decode-graph batch sizes and with the FlashInfer / Triton backends."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kernels import ops
from kernels.attention.torch_backend import TorchAttentionBackend
from server.models.llama import LlamaForCausalLM
from server.models.presets import PRESETS, init_random_weights
from server.models.rope import RotaryEmbedding
from tests.paged_batch import make_batch, random_cache, rel_err
from tests.triton_interpreter import interpreted_module

BATCHES = {
    "decode": ([1] * 6, [17, 1, 64, 100, 33, 5]),
    "decode40": ([1] * 40, [3 + 7 * i for i in range(40)]),  # above the fused small-batch decode
    "prefill": ([40, 7], [0, 3]),
    "mixed": ([1, 1, 23, 5], [30, 15, 0, 16]),
}


class RowScalingTorchBackend(TorchAttentionBackend):
    """The torch backend, declaring that it takes the RMSNorm factors: the model then runs
    `_forward_folded`, and the factors go through `AttentionBackend.forward_rope`'s torch
    scaling (the path every backend falls back to)."""

    def fuses_row_scale(self) -> bool:
        return True

    def decode_fuses_row_scale(self, num_seqs: int) -> bool:
        return True


def tiny_config(hidden: int, inter: int, heads: int, kv_heads: int, bias: bool = False):
    return dataclasses.replace(
        PRESETS["smollm2-135m"], hidden_size=hidden, intermediate_size=inter, num_layers=3,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, attention_bias=bias,
        vocab_size=512, tie_word_embeddings=False, name="tiny",
    )  # fmt: skip


def random_model(cfg, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Random weights, and random norm weights (init gives ones: folding them would be a no-op)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, dtype, 512).to(device, dtype)
    init_random_weights(model, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith("qkv_proj.bias"):
                p.normal_(0.0, 0.5)
    return model


def run(model, cfg, backend_cls, batch: str, dtype: torch.dtype, device: torch.device):
    """One step of `batch` (BATCHES) through the model on a fresh random cache: (final hidden
    states, the cache after the step, forward_logits' logits), and whether the backend took
    the RMSNorm factors for it (`fuses_row_scale`)."""
    query_lens, context_lens = BATCHES[batch]
    gen = torch.Generator(device=device).manual_seed(1)
    cache = random_cache(512, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, dtype, device, gen)
    meta = make_batch(query_lens, context_lens, 16, 512, device, gen)
    attn = backend_cls(cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    attn.plan(meta)
    positions = torch.cat([torch.arange(c, c + q) for q, c in zip(query_lens, context_lens, strict=True)]).to(device)
    ids = torch.randint(0, cfg.vocab_size, (meta.num_tokens,), generator=gen, device=device)
    hidden = model(ids, positions, attn)
    cache_after = cache.clone()
    attn.plan(meta)
    return (hidden, cache_after, model.forward_logits(ids, positions, attn)), attn.fuses_row_scale()


def test_fold_moves_the_norm_weights_into_the_linears():
    cfg = tiny_config(64, 96, 4, 2)
    model = random_model(cfg, torch.float32, torch.device("cpu"))
    layer = model.layers[1]
    gamma1, gamma2 = layer.input_layernorm.weight.clone(), layer.post_attention_layernorm.weight.clone()
    qkv, gate_up = layer.qkv_proj.weight.clone(), layer.gate_up_proj.weight.clone()
    assert model.fold_norms() == cfg.num_layers
    assert torch.equal(layer.qkv_proj.weight, qkv * gamma1)  # column j times gamma_j
    assert torch.equal(layer.gate_up_proj.weight, gate_up * gamma2)
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(gamma1))
    assert torch.equal(layer.post_attention_layernorm.weight, torch.ones_like(gamma2))
    assert model.fold_norms() == cfg.num_layers  # idempotent: folded once
    assert torch.equal(layer.qkv_proj.weight, qkv * gamma1)
    assert not torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))  # the final norm stays


def test_a_qkv_bias_leaves_the_model_unfolded():
    cfg = tiny_config(64, 96, 4, 2, bias=True)
    model = random_model(cfg, torch.float32, torch.device("cpu"))
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert model.fold_norms() == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("batch", list(BATCHES))
def test_folded_model_is_the_same_function_on_cpu(batch):
    """float32: the loaded model, the folded one on the usual path (norms of weight one) and the
    folded one on `_forward_folded` agree to float32 rounding: hidden states, stored K/V, logits."""
    cpu = torch.device("cpu")
    cfg = tiny_config(128, 320, 4, 2)
    model = random_model(cfg, torch.float32, cpu)
    folded = copy.deepcopy(model)
    folded.fold_norms()
    ref, _ = run(model, cfg, TorchAttentionBackend, batch, torch.float32, cpu)
    usual, took = run(folded, cfg, TorchAttentionBackend, batch, torch.float32, cpu)
    assert not took
    fast, took = run(folded, cfg, RowScalingTorchBackend, batch, torch.float32, cpu)
    assert took
    for got in (usual, fast):
        for a, b in zip(got, ref, strict=True):
            assert rel_err(a, b.double()) < 1e-5
    assert ref[0].abs().sum() > 0
    # `_forward_folded` really ran: the folded layer's norm weights are ones, so skipping the
    # factor would show as a different result.
    layer = folded.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    # The unfolded model never takes the folded path, whatever the backend says.
    assert torch.equal(run(model, cfg, RowScalingTorchBackend, batch, torch.float32, cpu)[0][2], ref[2])


def test_folded_decode_rows():
    """The decode batch sizes the skinny-GEMM plan must time against the folded block: those
    of a folded model up to FOLDED_MAX_ROWS whose backend takes the factors at that size."""
    from server.models.llama import FOLDED_MAX_ROWS

    cfg = tiny_config(64, 96, 4, 2)
    model = random_model(cfg, torch.float32, torch.device("cpu"))
    cache = random_cache(4, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32,
                         torch.device("cpu"), torch.Generator().manual_seed(0))
    scaling = RowScalingTorchBackend(cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    plain = TorchAttentionBackend(cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    rows = [1, 2, 64, FOLDED_MAX_ROWS, 2 * FOLDED_MAX_ROWS]
    assert model.folded_decode_rows(rows, scaling) == []  # not folded
    model.fold_norms()
    assert model.folded_decode_rows(rows, scaling) == rows[:-1]
    assert model.folded_decode_rows(rows, plain) == []  # the torch backend scales with extra ops


def _rope_store_case(rope_store, dtype, device, tokens=37, hq=8, hkv=2, dim=64, hidden=200):
    """rope_and_store with norm_of against the float64 reference: q, stored k and v."""
    gen = torch.Generator(device=device).manual_seed(tokens)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, generator=gen, device=device).to(dtype)
    q, k, v = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
    q, k, v = q.view(tokens, hq, dim), k.view(tokens, hkv, dim), v.view(tokens, hkv, dim)
    wide = torch.randn(tokens, hidden + 8, generator=gen, device=device) * 3
    wide[0] = 0.0  # an all-zero row: the factor is rsqrt(eps), finite
    norm_of = wide.to(dtype)[:, :hidden]  # strided rows
    rope = RotaryEmbedding(dim, 512, 10000.0, None, torch.float64).to(device)
    pos = torch.randint(0, 512, (tokens,), generator=gen, device=device)
    slots = torch.randperm(32 * 16, generator=gen, device=device)[:tokens]
    slots[1::5] = -1
    cache = torch.full((32, 2, 16, hkv, dim), float("nan"), dtype=dtype, device=device)
    q_out = rope_store(q, k, v, pos, rope.cos.to(dtype), rope.sin.to(dtype), cache, slots, norm_of=norm_of, eps=1e-5)
    r = ops.rms_factor_ref(norm_of, 1e-5).double().unsqueeze(-1)
    ref_q, ref_k = rope(pos, q.double() * r, k.double() * r)
    ok = slots >= 0
    s = slots[ok]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(q_out, ref_q) < tol
    assert rel_err(cache[s // 16, 0, s % 16], ref_k[ok]) < tol
    assert rel_err(cache[s // 16, 1, s % 16], (v.double() * r)[ok]) < tol
    with pytest.raises(ValueError, match="norm_of"):
        rope_store(q, k, v, pos, rope.cos.to(dtype), rope.sin.to(dtype), cache, slots, norm_of=norm_of[:-1])


def _silu_mul_case(silu_and_mul, dtype, device, tokens=9, inter=2100, hidden=300):
    gen = torch.Generator(device=device).manual_seed(inter)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen, device=device).to(dtype)
    norm_of = (torch.randn(tokens, hidden, generator=gen, device=device) * 4).to(dtype)
    y = silu_and_mul(gate_up, norm_of=norm_of, eps=1e-6)
    ref = ops.silu_and_mul_ref(gate_up.double(), norm_of.double(), 1e-6)
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 2e-2)
    # The reference itself: silu(r * gate) * (r * up) with r the RMSNorm factor.
    r = torch.rsqrt(norm_of.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    g, u = gate_up.double().chunk(2, dim=-1)
    assert rel_err(ref, torch.nn.functional.silu(g * r) * (u * r)) < 1e-6  # r in float32
    with pytest.raises(ValueError, match="norm_of"):
        silu_and_mul(gate_up, norm_of=norm_of[:, None])


@pytest.fixture(scope="module")
def interpreted_rope_store():
    yield from (m.rope_and_store for m in interpreted_module("kernels.triton.rope_store"))


@pytest.fixture(scope="module")
def interpreted_silu_mul():
    yield from (m.silu_and_mul for m in interpreted_module("kernels.triton.silu_mul"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_factor_interpreted(interpreted_rope_store, dtype):
    _rope_store_case(interpreted_rope_store, dtype, torch.device("cpu"), tokens=6, hq=4, dim=16, hidden=40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_factor_interpreted(interpreted_silu_mul, dtype):
    _silu_mul_case(interpreted_silu_mul, dtype, torch.device("cpu"), tokens=3, inter=2100, hidden=40)


GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(("tokens", "hq", "hkv", "dim", "hidden"), [(1, 32, 8, 128, 4096), (128, 32, 8, 128, 4096),
                                                                     (300, 9, 3, 64, 576)])
def test_rope_store_factor_on_gpu(dtype, tokens, hq, hkv, dim, hidden):
    from kernels.triton.rope_store import rope_and_store

    _rope_store_case(rope_and_store, dtype, torch.device("cuda"), tokens, hq, hkv, dim, hidden)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize(("tokens", "inter", "hidden"), [(1, 14336, 4096), (128, 14336, 4096), (77, 1536, 576)])
def test_silu_mul_factor_on_gpu(dtype, tokens, inter, hidden):
    from kernels.triton.silu_mul import silu_and_mul

    _silu_mul_case(silu_and_mul, dtype, torch.device("cuda"), tokens, inter, hidden)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_folded_model_matches_unfolded_on_gpu(backend, batch):
    """bf16 on the GPU with the Triton ops installed, on the 8B model's hidden size: the folded
    model and the loaded one against the loaded model in float32 (torch backend). The folded
    one is within bf16 tolerance and no less accurate than the loaded one (hidden states,
    stored K/V, logits). The batches on the rotate-and-store kernel (all but the small pure
    decode, which takes the fused decode kernel) run `_forward_folded`."""
    import kernels.triton as kt
    from kernels.attention.selector import backend_class

    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    cls = backend_class(backend)
    cfg = tiny_config(4096, 14336, 32, 8)
    model = random_model(cfg, dtype, dev)
    folded = copy.deepcopy(model)
    folded.fold_norms()
    ref, _ = run(copy.deepcopy(model).float(), cfg, TorchAttentionBackend, batch, torch.float32, dev)
    kt.install()
    try:
        plain, _ = run(model, cfg, cls, batch, dtype, dev)
        got, took = run(folded, cfg, cls, batch, dtype, dev)
    finally:
        kt.uninstall()
    assert took == (batch != "decode")
    for name, a, p, r in zip(("hidden", "cache", "logits"), got, plain, ref, strict=True):
        err, plain_err = rel_err(a, r.double()), rel_err(p, r.double())
        print(f"{backend} {batch} {name}: folded {err:.4f}, loaded {plain_err:.4f} (rel. to float32)")
        assert err < 3e-2
        assert err < 1.25 * plain_err + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_decode_fuses_row_scale_is_what_the_plan_gives(backend):
    """`decode_fuses_row_scale(n)`, asked at start-up, is `fuses_row_scale()` once a pure-decode
    batch of n sequences is planned: no for the fused split-KV decode kernel's batches."""
    from kernels.attention.selector import backend_class

    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    cache = random_cache(512, 2, 16, 2, 64, torch.bfloat16, dev, gen)
    for max_batch in (0, 32):
        attn = backend_class(backend)(cache, 8, 2, 64, split_kv_decode_max_batch=max_batch)
        for n in (1, 32, 33, 64, 128):
            attn.plan(make_batch([1] * n, [5] * n, 16, 512, dev, gen))
            assert attn.decode_fuses_row_scale(n) == attn.fuses_row_scale() == (n > max_batch), (max_batch, n)
