"""The piecewise runner's splitting, padding and buffers (server/engine/piecewise_graphs.py) on
the CPU, through its eager stand-in (`capture=False`: the same pieces and static buffers, no
graphs) and the torch attention backend's `store_rope` / `attend`: a mixed batch must give the
plain forward's hidden states and store the same K/V, nothing for the padding rows. The CUDA
graphs themselves run in tests/test_gpu_piecewise.py."""

from __future__ import annotations

import pytest
import torch

from kernels.attention.torch_backend import TorchAttentionBackend
from server.engine.engine import EngineConfig, EngineCore
from server.engine.piecewise_graphs import PiecewiseGraphRunner, bucket_sizes
from server.engine.sampling_params import SamplingParams
from server.models.llama import LlamaForCausalLM
from server.models.presets import init_random_weights
from tests.paged_batch import make_batch, random_cache
from tests.test_fused_layers import randomize, tiny_config

CPU = torch.device("cpu")


def tiny_model(bias: bool) -> LlamaForCausalLM:
    """3 layers, hidden 128, 4 heads of 32, GQA 2, random weights and norm weights."""
    cfg = tiny_config(128, 320, 4, 2, bias=bias)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, torch.float32, 128)
    init_random_weights(model, seed=3)
    randomize(model, bias=bias)
    return model


def test_bucket_sizes():
    assert bucket_sizes(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048]
    assert bucket_sizes(100) == [16, 32, 64, 100]
    assert bucket_sizes(8) == [8]


@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [([1, 1, 23], [40, 7, 0]), ([1, 5, 16], [3, 17, 33]), ([30], [0]), ([1], [9])],
)
def test_pieces_give_the_plain_forward(query_lens, context_lens):
    model = tiny_model(bias=True)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    cache = random_cache(24, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, CPU, gen)
    meta = make_batch(query_lens, context_lens, 16, 24, CPU, gen)
    t = meta.num_tokens
    ids = torch.randint(0, cfg.vocab_size, (t,), generator=gen)
    positions = torch.cat([
        torch.arange(c, c + q) for q, c in zip(query_lens, context_lens, strict=True)
    ])  # fmt: skip

    plain_cache = cache.clone()
    attn = TorchAttentionBackend(plain_cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    attn.plan(meta)
    plain = model(ids, positions, attn)

    pw_cache = cache.clone()
    pw_attn = TorchAttentionBackend(pw_cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    runner = PiecewiseGraphRunner(model, pw_attn, 64, CPU, capture=False)
    # Stale values from an earlier, larger step in every static buffer: the padding rows of
    # this step must neither store them nor leak them into the real rows.
    runner.ids.fill_(5)
    runner.positions.fill_(3)
    runner.slots.copy_(torch.arange(runner.max_tokens))
    runner.a.fill_(1e4)
    runner.q.fill_(-1e4)
    hidden = runner.run(ids, positions, meta)
    assert hidden.shape == plain.shape
    torch.testing.assert_close(hidden, plain, rtol=1e-5, atol=1e-5)
    # The same K/V stored (the padded GEMM may round the last bit differently) ...
    torch.testing.assert_close(pw_cache, plain_cache, rtol=1e-5, atol=1e-5)
    # ... at the step's slots only: the padding rows (stale slots 0..63 above) stored nothing.
    written = torch.zeros(cache.shape[0] * cache.shape[3], dtype=torch.bool)
    written[meta.slot_mapping] = True
    written = written.view(cache.shape[0], 1, 1, cache.shape[3], 1, 1).expand_as(cache)
    assert torch.equal(pw_cache[~written], cache[~written])
    assert not torch.equal(pw_cache[written], cache[written])  # the step did store its K/V
    assert runner.bucket(t) >= t and runner.steps == 1


def test_engine_generates_the_same_through_the_pieces():
    """The embedded model (float32) with the stand-in runner in the engine: prefill chunks,
    mixed and decode steps of up to 32 tokens go through the pieces (the 48-token steps do not)
    and give the plain engine's tokens."""
    engine = EngineCore(EngineConfig(
        device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=48,
        kv_cache_memory="64MiB", enable_prefix_caching=False, progress=False,
    ))  # fmt: skip
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8] * 9, [9, 10, 11, 12] * 4, [13, 14, 15] * 11]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    def generate() -> list[list[int]]:
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        while engine.has_unfinished_requests():
            for o in engine.step():
                out[o.request_id].extend(o.new_token_ids)
        engine.check_integrity()
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        return list(out.values())

    plain = generate()
    engine.runner.piecewise = runner = PiecewiseGraphRunner(engine.model, engine.attn, 32, CPU, capture=False)
    pieces = generate()
    assert runner.steps >= 8
    assert pieces == plain
    assert all(len(toks) == 10 for toks in plain)


@pytest.fixture(scope="module")
def triton_rope_store():
    """kernels.triton.rope_store and paged_attention under Triton's CPU interpreter (skipped
    where triton is missing, as in CI's CPU install, or where CUDA runs the compiled ones)."""
    from tests.triton_interpreter import interpreted_module

    gen = interpreted_module("kernels.triton.rope_store")
    yield next(gen)
    next(gen, None)


def test_triton_backend_pieces_give_its_plain_forward(triton_rope_store):
    """The Triton backend's store_rope / attend (the piecewise split) against its own
    forward_rope, interpreted, on a mixed batch with padding rows."""
    from kernels.attention.triton_backend import TritonAttentionBackend

    model = tiny_model(bias=False)  # head_dim 32
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    cache = random_cache(24, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, CPU, gen)
    meta = make_batch([1, 1, 9], [20, 3, 5], 16, 24, CPU, gen)
    ids = torch.randint(0, cfg.vocab_size, (meta.num_tokens,), generator=gen)
    positions = torch.tensor([20, 3, *range(5, 14)])
    plain_cache, pw_cache = cache.clone(), cache.clone()
    attn = TritonAttentionBackend(plain_cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    attn.plan(meta)
    plain = model(ids, positions, attn)
    pw_attn = TritonAttentionBackend(pw_cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    runner = PiecewiseGraphRunner(model, pw_attn, 16, CPU, capture=False)
    runner.slots.copy_(torch.arange(16))  # stale slots: the padding rows must not use them
    hidden = runner.run(ids, positions, meta)
    torch.testing.assert_close(hidden, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pw_cache, plain_cache, rtol=1e-5, atol=1e-5)
