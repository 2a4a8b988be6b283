"""Triton kernels against the torch references, on fresh random inputs, over shapes and
dtypes: RMSNorm (+ fused residual), SiLU·mul, RoPE (llama3-scaled tables) fused with the paged
K/V store into a block-major cache, the Triton paged attention, and the one-row fused GEMV."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from server.models.rope import RotaryEmbedding
from tests.paged_batch import TOL, make_batch, poison_allocator, random_cache, rel_err

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.fixture
def gen(request):
    g = torch.Generator(device=DEV)
    g.manual_seed(hash(request.node.name) % 2**31)
    return g


def randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("hidden", [576, 4096, 1000])
def test_rms_norm(dtype, tokens, hidden, gen):
    from kernels.triton.rms_norm import add_rms_norm, rms_norm

    x = randn(tokens, hidden, dtype=dtype, gen=gen)
    res = randn(tokens, hidden, dtype=dtype, gen=gen)
    w = randn(hidden, dtype=dtype, gen=gen, scale=0.5) + 1
    poison_allocator(DEV)
    y = rms_norm(x, w, 1e-5)
    assert rel_err(y, ops.rms_norm_ref(x.double(), w.double(), 1e-5)) < TOL[dtype]
    poison_allocator(DEV)
    y, s = add_rms_norm(x, res, w, 1e-6)
    ref_y, ref_s = ops.add_rms_norm_ref(x.double(), res.double(), w.double(), 1e-6)
    assert rel_err(s, ref_s) < TOL[dtype]
    assert rel_err(y, ref_y) < TOL[dtype]
    # Strided rows (a view of a wider tensor) work too.
    wide = randn(tokens, hidden + 64, dtype=dtype, gen=gen)
    assert rel_err(rms_norm(wide[:, :hidden], w, 1e-5),
                   ops.rms_norm_ref(wide[:, :hidden].double(), w.double(), 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 33, 1000])
@pytest.mark.parametrize("inter", [1536, 14336, 100])
def test_silu_and_mul(dtype, tokens, inter, gen):
    from kernels.triton.silu_mul import silu_and_mul

    x = randn(tokens, 2 * inter, dtype=dtype, gen=gen, scale=2.0)
    poison_allocator(DEV)
    y = silu_and_mul(x)
    assert y.shape == (tokens, inter)
    assert rel_err(y, ops.silu_and_mul_ref(x.double())) < TOL[dtype]


GEMV_CASES = [(dtype, fuse, None) for dtype in (torch.bfloat16, torch.float16)
              for fuse in ("plain", "bias", "norm", "norm+bias", "norm+silu", "silu", "residual")]
GEMV_CASES += [(torch.bfloat16, fuse, config) for fuse in ("norm+bias", "norm+silu", "bias+residual")
               for config in ((16, 256, 4), (2, 1024, 8))]


@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336), (1000, 576), (33, 200)])
@pytest.mark.parametrize(("dtype", "fuse", "config"), GEMV_CASES)
def test_gemv(dtype, n, k, fuse, config, gen):
    """The one-row fused linear against `ops.fused_linear_ref` in float64."""
    from kernels.triton.gemv import gemv

    w = randn(n, k, dtype=dtype, gen=gen, scale=0.05)
    x = randn(1, k, dtype=dtype, gen=gen, scale=2.0)
    kw = {}
    if "norm" in fuse:
        kw.update(norm_weight=randn(k, dtype=dtype, gen=gen, scale=0.3) + 1, eps=1e-5)
    if "silu" in fuse:
        kw["silu_mul"] = True
        w = torch.cat([w, randn(n, k, dtype=dtype, gen=gen, scale=0.05)])  # gate | up
    if "residual" in fuse:
        kw["residual"] = randn(1, n, dtype=dtype, gen=gen)
    bias = randn(n, dtype=dtype, gen=gen) if "bias" in fuse else None
    poison_allocator(DEV)
    out = gemv(x, w, bias, config=config, **kw)
    assert out.shape == (1, n) and out.dtype == dtype
    ref = ops.fused_linear_ref(x.double(), w.double(), None if bias is None else bias.double(),
                               **{a: v.double() if torch.is_tensor(v) else v for a, v in kw.items()})
    assert rel_err(out, ref) < TOL[dtype]
    # A row view with a stride (the model's last-token rows), and rejected shapes.
    wide = randn(2, k + 64, dtype=dtype, gen=gen)
    view = wide[1:, :k]
    assert rel_err(gemv(view, w, bias, config=config, **kw), ops.fused_linear_ref(view, w, bias, **kw)) < TOL[dtype]
    with pytest.raises(ValueError):
        gemv(randn(2, k, dtype=dtype, gen=gen), w, bias, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize(("lens", "chunk"), [([1], 64), ([200], 64), ([2049], 256), ([5, 700, 64, 1], 64)])
@pytest.mark.parametrize("graph", [False, True])
def test_split_kv_decode_attention(dtype, hq, hkv, d, lens, chunk, graph, gen):
    """kernels/triton/decode_attention.py against float64 attention gathered from the pages,
    eagerly and replayed from a CUDA graph captured with a larger length bound."""
    from kernels.triton.decode_attention import decode_attention

    bs, nb = 16, 256
    cache = random_cache(nb, 2, bs, hkv, d, dtype, DEV, gen)
    meta = make_batch([1] * len(lens), [n - 1 for n in lens], bs, nb, DEV, gen)
    layer = cache[:, 1]
    q = randn(len(lens), hq, d, dtype=dtype, gen=gen)
    run = lambda: decode_attention(q, layer, meta.block_tables, meta.seq_lens, 4096, d**-0.5, chunk)  # noqa: E731
    out = run()
    if graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run()
        out.fill_(float("nan"))
        g.replay()
    for i, n in enumerate(lens):
        tab = meta.block_tables[i].long()
        pos = torch.arange(n, device=DEV)
        kv = layer[tab[pos // bs], :, pos % bs].double()  # [n, 2, hkv, d]
        k = kv[:, 0].repeat_interleave(hq // hkv, dim=1)
        v = kv[:, 1].repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].double(), k) * d**-0.5
        ref = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
        assert rel_err(out[i], ref) < TOL[dtype], (i, n)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm90+")
def test_gemv_chain_with_pdl(gen):
    """The opt-in PDL launch: a chain of GEMVs, each reading the previous one's output (and a
    residual two kernels back), inside a CUDA graph, equals the chain without PDL."""
    import kernels.triton.gemv as g

    k = 4096
    ws = [randn(k, k, dtype=torch.bfloat16, gen=gen, scale=0.02) for _ in range(4)]
    x0 = randn(1, k, dtype=torch.bfloat16, gen=gen)
    nw = randn(k, dtype=torch.bfloat16, gen=gen, scale=0.3) + 1

    def chain():
        h = g.gemv(x0, ws[0], norm_weight=nw, eps=1e-5)
        s = g.gemv(h, ws[1], residual=x0)
        h = g.gemv(s, ws[2], norm_weight=nw, eps=1e-5)
        return g.gemv(h, ws[3], residual=s)

    saved = g.USE_PDL
    try:
        g.USE_PDL = False
        ref = chain()
        g.USE_PDL = True
        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    finally:
        g.USE_PDL = saved
    assert torch.equal(out, ref)


def test_install_routes_cuda_tensors_only(gen):
    import kernels.triton as kt

    kt.install()
    try:
        x = randn(4, 256, dtype=torch.bfloat16, gen=gen)
        w = torch.ones(256, dtype=torch.bfloat16, device=DEV)
        assert rel_err(ops.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x.double(), w.double(), 1e-5)) < 1e-2
        cpu = torch.randn(4, 256)
        assert torch.equal(ops.rms_norm(cpu, torch.ones(256), 1e-5), ops.rms_norm_ref(cpu, torch.ones(256), 1e-5))
    finally:
        kt.uninstall()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv", "dim"), [(32, 8, 128), (9, 3, 64), (4, 4, 80)])
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_rope_and_store(dtype, hq, hkv, dim, tokens, gen):
    from kernels.triton.rope_store import rope_and_store, store_kv

    layers, block, blocks = 3, 16, 64
    rope = RotaryEmbedding(dim, 4096, 500000.0, LLAMA3, torch.float64).to(DEV)
    qkv = randn(tokens, (hq + 2 * hkv) * dim, dtype=dtype, gen=gen)
    q, k, v = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
    q, k, v = q.view(tokens, hq, dim), k.view(tokens, hkv, dim), v.view(tokens, hkv, dim)
    pos = torch.randint(0, 4096, (tokens,), generator=gen, device=DEV)
    slots = torch.randperm(blocks * block, generator=gen, device=DEV)[:tokens]
    slots[1::5] = -1  # padding rows: stored nowhere
    cache = torch.full((blocks, layers, 2, block, hkv, dim), float("nan"), dtype=dtype, device=DEV)
    cos, sin = rope.cos.to(dtype), rope.sin.to(dtype)
    poison_allocator(DEV)
    q_out = rope_and_store(q, k, v, pos, cos, sin, cache[:, 1], slots)
    ref = RotaryEmbedding(dim, 4096, 500000.0, LLAMA3, torch.float64).to(DEV)
    ref_q, ref_k = ref(pos, q.double(), k.double())
    assert rel_err(q_out, ref_q) < TOL[dtype]
    ok = slots >= 0
    s = slots[ok]
    layer = cache[:, 1]
    assert rel_err(layer[s // block, 0, s % block], ref_k[ok]) < TOL[dtype]
    assert torch.equal(layer[s // block, 1, s % block], v[ok])
    # Nothing else was written: other layers, other slots.
    written = torch.zeros(blocks * block, dtype=torch.bool, device=DEV)
    written[s] = True
    untouched = cache.view(blocks, layers, 2, block, -1).permute(1, 2, 0, 3, 4).reshape(layers, 2, blocks * block, -1)
    assert torch.isnan(untouched[[0, 2]]).all()
    assert torch.isnan(untouched[1][:, ~written]).all()
    # store_kv: no rotation.
    cache.fill_(float("nan"))
    store_kv(k, v, cache[:, 2], slots)
    assert torch.equal(cache[:, 2][s // block, 0, s % block], k[ok])


BATCHES = {
    "decode": ([1] * 5, [17, 1, 64, 100, 33]),
    "prefill": ([40, 7, 129], [0, 0, 0]),
    "prefill_with_prefix": ([9, 64, 200], [50, 16, 3]),
    "mixed": ([1, 1, 1, 23, 300, 5], [300, 15, 48, 0, 40, 16]),
}


def _torch_reference(meta, cache, layer, q, k, v, hq, hkv, dim):
    from kernels.attention.torch_backend import TorchAttentionBackend

    ref_cache = cache.float()  # a float32 copy: the reference never shares the kernel's cache
    backend = TorchAttentionBackend(ref_cache, hq, hkv, dim)
    backend.plan(meta)
    return backend.forward(layer, q.float(), k.float(), v.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "dim"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("block_size", [16, 32])
def test_triton_paged_attention(dtype, hq, hkv, dim, batch, block_size, gen):
    from kernels.attention.triton_backend import TritonAttentionBackend

    qlens, ctx = BATCHES[batch]
    cache = random_cache(80, 3, block_size, hkv, dim, dtype, DEV, gen)
    meta = make_batch(qlens, ctx, block_size, 80, DEV, gen)
    t = meta.num_tokens
    q, k, v = (randn(t, h, dim, dtype=dtype, gen=gen) for h in (hq, hkv, hkv))
    ref = _torch_reference(meta, cache, 1, q, k, v, hq, hkv, dim)
    backend = TritonAttentionBackend(cache, hq, hkv, dim)
    backend.plan(meta)
    poison_allocator(DEV)
    out = backend.forward(1, q, k, v)
    assert rel_err(out, ref) < TOL[dtype]
