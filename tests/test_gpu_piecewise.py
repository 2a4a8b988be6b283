"""Piecewise CUDA graphs on the GPU (server/engine/piecewise_graphs.py): prefill / mixed batches
replayed from graphs split at attention give the eager forward's hidden states and K/V, store
nothing for padding rows, and stay right when buckets and batches change between replays.
The splitting logic itself runs in CI through the eager stand-in (tests/test_piecewise_cpu.py)."""

from __future__ import annotations

import pytest
import torch

from kernels.attention.flashinfer_backend import FlashInferAttentionBackend
from server.engine.piecewise_graphs import PiecewiseGraphRunner
from server.models.llama import LlamaForCausalLM
from server.models.presets import init_random_weights
from tests.paged_batch import TOL, make_batch, random_cache, rel_err
from tests.test_fused_layers import randomize, tiny_config

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
BATCHES = [  # (query_lens, context_lens): decodes first
    ([1, 1, 23], [40, 7, 0]),
    ([1, 5, 16], [3, 17, 33]),
    ([30], [0]),
    ([1], [9]),
    ([1] * 12 + [100, 37], [50] * 12 + [0, 64]),
    ([200], [16]),
]


@pytest.fixture(scope="module")
def model():
    from kernels.capabilities import install_fused_ops

    install_fused_ops(DEV)
    cfg = tiny_config(512, 1024, 4, 2, bias=False)  # head_dim 128, GQA 2
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg, torch.bfloat16, 1024).to(DEV, torch.bfloat16)
    init_random_weights(m, seed=3)
    randomize(m, bias=False)
    return m


def step(model, cache, batch, gen):
    cfg = model.config
    query_lens, context_lens = batch
    meta = make_batch(query_lens, context_lens, 16, cache.shape[0], DEV, gen)
    ids = torch.randint(0, cfg.vocab_size, (meta.num_tokens,), generator=gen, device=DEV)
    positions = torch.cat([
        torch.arange(c, c + q, device=DEV) for q, c in zip(query_lens, context_lens, strict=True)
    ])  # fmt: skip
    return meta, ids, positions


def backend_class(name: str):
    from kernels.attention.triton_backend import TritonAttentionBackend

    return {"flashinfer": FlashInferAttentionBackend, "triton": TritonAttentionBackend}[name]


@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_captured_pieces_give_the_eager_forward(model, backend):
    cfg = model.config
    cls = backend_class(backend)
    gen = torch.Generator(device=DEV).manual_seed(1)
    base = random_cache(64, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, DEV, gen)
    cache = base.clone()
    attn = cls(cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    runner = PiecewiseGraphRunner(model, attn, 256, DEV)
    runner.capture()
    assert sorted(runner._graphs) == [16, 32, 64, 128, 256]
    assert all(len(g) == cfg.num_layers + 1 for g, _ in runner._graphs.values())
    # Twice over: the second round replays every bucket after others have run.
    for _ in range(2):
        for batch in BATCHES:
            meta, ids, positions = step(model, cache, batch, gen)
            cache.copy_(base)
            hidden = runner.run(ids, positions, meta).clone()
            pw_cache = cache.clone()
            cache.copy_(base)
            eager_attn = cls(cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            eager_attn.plan(meta)
            ref = model(ids, positions, eager_attn)
            assert rel_err(hidden, ref) < TOL[torch.bfloat16], batch
            assert rel_err(pw_cache, cache) < TOL[torch.bfloat16], batch
            written = torch.zeros(base.shape[0] * 16, dtype=torch.bool, device=DEV)
            written[meta.slot_mapping] = True
            written = written.view(base.shape[0], 1, 1, 16, 1, 1).expand_as(base)
            assert torch.equal(pw_cache[~written], base[~written]), batch  # padding stored nothing
    assert runner.steps == 2 * len(BATCHES)


def test_engine_runs_prefill_and_mixed_steps_through_the_pieces():
    """A random-weight SmolLM2-shaped engine: staggered prompts of several lengths make prefill,
    mixed and decode steps; the piecewise runner takes the prefill / mixed ones (the decode
    graphs the rest), the run completes and returns every block."""
    from server.engine.engine import EngineConfig, EngineCore
    from server.engine.sampling_params import SamplingParams

    engine = EngineCore(EngineConfig(
        model="random:smollm2-135m", dtype="bfloat16", device="cuda", max_num_seqs=8,
        max_num_batched_tokens=512, gpu_memory_utilization=0, kv_cache_memory="256MiB",
        progress=False,
    ))  # fmt: skip
    runner = engine.runner.piecewise
    assert runner is not None and runner.sizes[-1] == 512
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    n = 0
    got: dict[str, int] = {}

    def step() -> None:
        for o in engine.step():
            got[o.request_id] = got.get(o.request_id, 0) + len(o.new_token_ids)

    for wave in range(4):
        for length in (7, 130, 600, 33):
            ids = torch.randint(0, 49152, (length + wave,), generator=gen).tolist()
            engine.add_request(f"r{n}", ids, params)
            n += 1
        for _ in range(5):
            step()
    while engine.has_unfinished_requests():
        step()
    # Each wave's 770-odd prompt tokens are at least two steps of <= 512 tokens, all piecewise.
    assert runner.steps >= 8
    assert got == {f"r{i}": 24 for i in range(n)}
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.check_integrity()
