"""Triton kernels against the torch references, on fresh random inputs, over shapes and
dtypes: RMSNorm (+ fused residual), SiLU·mul, RoPE (llama3-scaled tables) fused with the paged
K/V store into a block-major cache, the Triton paged attention, the one-row fused GEMV, the
decode-batch GEMM (split-K and swapped operands included), and the
fused small-batch decode attention (RoPE + store + split-KV + merge in one launch)."""

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


@pytest.mark.parametrize(("n", "k"), [(49152, 576), (128256, 4096)])
def test_gemv_float32_out(n, k, gen):
    """lm_head in the decode graph: the final norm fused in and float32 stored by the kernel,
    bit for bit the bf16 output widened."""
    from kernels.triton.gemv import gemv

    w = randn(n, k, dtype=torch.bfloat16, gen=gen, scale=0.05)
    x = randn(1, k, dtype=torch.bfloat16, gen=gen, scale=2.0)
    kw = dict(norm_weight=randn(k, dtype=torch.bfloat16, gen=gen, scale=0.3) + 1, eps=1e-5)
    out = gemv(x, w, out_dtype=torch.float32, **kw)
    assert out.dtype == torch.float32 and out.shape == (1, n)
    assert torch.equal(out, gemv(x, w, **kw).float())


SKINNY_CONFIGS = [  # (BLOCK_N, BLOCK_K, warps, stages, split_k, swap)
    (32, 128, 4, 4, 1, False),
    (32, 128, 4, 4, 4, False),
    (64, 128, 4, 4, 1, True),
    (128, 64, 8, 3, 3, True),
]


@pytest.mark.parametrize("config", SKINNY_CONFIGS)
@pytest.mark.parametrize(("m", "n", "k", "fuse"), [
    (64, 6144, 4096, ""), (128, 4096, 4096, "residual"), (32, 14336, 4096, "silu"),
    (64, 4096, 14336, "residual"), (7, 1000, 576, "silu residual"), (100, 33, 200, "residual"),
])
def test_skinny_linear(m, n, k, fuse, config, gen):
    """The decode-batch GEMM against `ops.fused_linear_ref` in float64; the split-K configs
    also twice in a CUDA graph replay: the same bits each time (the last slice to arrive sums
    the partials in slice order) and the tile counters left at zero."""
    from kernels.triton.skinny_gemm import _counters, skinny_linear

    dtype = torch.bfloat16
    w = randn(2 * n if "silu" in fuse else n, k, dtype=dtype, gen=gen, scale=0.05)
    x = randn(m, k, dtype=dtype, gen=gen, scale=2.0)
    r = randn(m, n, dtype=dtype, gen=gen) if "residual" in fuse else None
    poison_allocator(DEV)
    out = skinny_linear(x, w, silu_mul="silu" in fuse, residual=r, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = ops.fused_linear_ref(x.double(), w.double(), silu_mul="silu" in fuse,
                               residual=None if r is None else r.double())
    assert rel_err(out, ref) < TOL[dtype]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        again = skinny_linear(x, w, silu_mul="silu" in fuse, residual=r, config=config)
    for _ in range(3):
        again.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(again, out)
    assert int(_counters(DEV, 1).abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 128256), (1, 49152), (3, 4097), (130, 32000), (2, 1)])
def test_argmax(dtype, rows, vocab, gen):
    """The sampler's row argmax against torch.argmax, ties (the first wins) and -inf rows included."""
    from kernels.triton.argmax import argmax

    x = randn(rows, vocab, dtype=dtype, gen=gen, scale=3.0)
    x[0, vocab // 3] = x[0, (2 * vocab) // 3] = 50.0  # tied maximum in two chunks
    if rows > 2:
        x[1] = float("-inf")
        x[2, -1] = 60.0  # in the last, partial chunk
    poison_allocator(DEV)
    assert torch.equal(argmax(x), x.argmax(dim=-1))
    assert torch.equal(argmax(x[:, : max(1, vocab - 3)]), x[:, : max(1, vocab - 3)].argmax(dim=-1))


@pytest.mark.parametrize(("n", "bs", "w"), [(1, 1, 1), (3, 4, 7), (100, 128, 600)])
@pytest.mark.parametrize("with_tokens", [False, True])
def test_stage_decode(n, bs, w, with_tokens, gen):
    """The graphs' one-kernel input staging against the torch ops it replaces (the CPU
    interpreter runs the same check in tests/test_stage_decode_interpreter.py)."""
    from kernels.triton.stage_decode import stage_decode

    max_bs, width = 128, 640
    o_len, o_src, o_tab = 3 * max_bs, 4 * max_bs, 5 * max_bs
    dev = torch.randint(0, 3000, (5 * max_bs + max_bs * width,), generator=gen, device=DEV)
    dev[o_src : o_src + n] = torch.randperm(n, generator=gen, device=DEV)
    tokens = torch.randint(0, 50000, (n,), generator=gen, device=DEV) if with_tokens else None
    lens = torch.full((max_bs,), -7, dtype=torch.int32, device=DEV)
    tables = torch.full((max_bs, width), -7, dtype=torch.int32, device=DEV)
    ref_dev, ref_lens, ref_tables = dev.clone(), lens.clone(), tables.clone()
    if tokens is not None:
        ref_dev[:n].copy_(tokens.index_select(0, ref_dev[o_src : o_src + n]))
    ref_lens[:bs].copy_(ref_dev[o_len : o_len + bs])
    ref_tables[:bs, :w].copy_(ref_dev[o_tab : o_tab + bs * w].view(bs, w))
    stage_decode(dev, tokens, n, bs, w, o_len, o_src, o_tab, lens, tables)
    assert torch.equal(dev, ref_dev) and torch.equal(lens, ref_lens) and torch.equal(tables, ref_tables)


FUSED_SHAPES = [(32, 8, 128), (9, 3, 64), (8, 8, 128)]
FUSED_CONFIGS = [(32, 4, 3), (128, 8, 2), (16, 4, 4)]  # besides the default (64, 4, 2)
FUSED_LENS = {
    "one": [1],
    "two": [2],
    "page_edges": [15, 16, 17],
    "255": [255],
    "1000": [1000],
    "4097": [4097],
    "batch8": [1, 2, 15, 16, 17, 255, 1000, 4097],
    "padded": [700, 5, 1, 1],  # the last two: CUDA-graph padding rows (slot -1)
}


def _fused_inputs(lens, hq, hkv, d, dtype, gen, nb=None, pad=0):
    """A one-layer-of-three cache, a decode batch over `lens` (keys [0, L-1) cached, the new token
    at L-1), q/k/v as strided views of one qkv row each; the last `pad` rows get slot -1."""
    bs = 16
    nb = nb or sum(-(-n // bs) for n in lens) + 4
    cache = random_cache(nb, 3, bs, hkv, d, dtype, DEV, gen)
    meta = make_batch([1] * len(lens), [n - 1 for n in lens], bs, nb, DEV, gen)
    slots = meta.slot_mapping.clone()
    if pad:
        slots[-pad:] = -1
    qkv = randn(len(lens), (hq + 2 * hkv) * d, dtype=dtype, gen=gen)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    t = len(lens)
    return cache, meta, slots, q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def _fused_reference(layer, tables, lens, q, k, v, pos, hq, hkv, d):
    """float64: q and the new k rotated (exact llama3 tables), attention over the cached keys
    [0, L-1) read from `layer` (a snapshot taken before the kernel) plus the new token.
    Returns (out [S, Hq * D], rotated k [S, Hkv, D])."""
    rope = RotaryEmbedding(d, 8192, 500000.0, LLAMA3, torch.float64).to(DEV)
    qr, kr = rope(pos, q.double(), k.double())
    bs, outs = layer.shape[2], []
    for i, n in enumerate(lens):
        tab = tables[i].long()
        p = torch.arange(n - 1, device=DEV)
        kv = layer[tab[p // bs], :, p % bs].double()  # [n - 1, 2, hkv, d]
        keys = torch.cat([kv[:, 0], kr[i][None]]).repeat_interleave(hq // hkv, dim=1)
        vals = torch.cat([kv[:, 1], v[i][None].double()]).repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", qr[i], keys) * d**-0.5
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), vals).reshape(-1))
    return torch.stack(outs), kr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d"), FUSED_SHAPES)
@pytest.mark.parametrize("case", list(FUSED_LENS))
def test_fused_decode_attention(dtype, hq, hkv, d, case, gen):
    """kernels/triton/decode_attention.py (RoPE + store + split-KV + in-launch merge) against
    float64 attention: the output, the rotated k and the v stored at each slot, nothing else
    written, counters back at 0; split counts from 1 to 64 (most splits of a short sequence
    exit at once) and every loop tile the engine may pick."""
    from kernels.triton.decode_attention import SplitKVWorkspace, fused_decode_attention

    lens = FUSED_LENS[case]
    pad = 2 if case == "padded" else 0
    cache, meta, slots, q, k, v = _fused_inputs(lens, hq, hkv, d, dtype, gen, pad=pad)
    rope = RotaryEmbedding(d, 8192, 500000.0, LLAMA3, dtype).to(DEV)
    pos = meta.seq_lens.long() - 1
    ws = SplitKVWorkspace(8, hq, hkv, d, DEV, max_splits=64)
    before = cache.clone()
    ref, kr = _fused_reference(before[:, 1], meta.block_tables, lens, q, k, v, pos, hq, hkv, d)
    ok = slots >= 0
    s = slots[ok]
    bs = cache.shape[3]
    runs = [(None, None), (1, None), (3, None), (64, None)] + [(5, cfg) for cfg in FUSED_CONFIGS]
    for splits, cfg in runs:
        cache.copy_(before)
        poison_allocator(DEV)
        out = fused_decode_attention(q, k, v, pos, rope.cos, rope.sin, cache[:, 1], slots, meta.block_tables,
                                     meta.seq_lens, d**-0.5, ws, num_splits=splits, config=cfg)
        assert out.shape == (len(lens), hq * d) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], (splits, cfg)
        assert not ws.counters.any()
        layer = cache[:, 1]
        assert rel_err(layer[s // bs, 0, s % bs], kr[ok]) < TOL[dtype]
        assert torch.equal(layer[s // bs, 1, s % bs], v[ok])
        restored = cache.clone()
        restored[s // bs, 1, :, s % bs] = before[s // bs, 1, :, s % bs]
        assert torch.equal(restored, before)  # no other slot or layer written


@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fused_decode_attention_graph_replays(hq, hkv, d, batch, gen):
    """One CUDA graph captured over static buffers, replayed 50 times with other lengths, slots
    and padding rows each time, every output checked (a merge race or a counter left non-zero
    shows up as a wrong or NaN output); then one input replayed 300 times must give
    bit-identical outputs (the kernel is deterministic; a race would not be)."""
    from kernels.triton.decode_attention import SplitKVWorkspace, fused_decode_attention

    dtype, bs, max_len = torch.bfloat16, 16, 4097
    width = -(-max_len // bs)
    nb = batch * width + 1
    dummy = nb - 1
    cache = random_cache(nb, 1, bs, hkv, d, dtype, DEV, gen)
    layer = cache[:, 0]
    rope = RotaryEmbedding(d, 8192, 500000.0, LLAMA3, dtype).to(DEV)
    ws = SplitKVWorkspace(8, hq, hkv, d, DEV)
    qkv = torch.zeros(batch, (hq + 2 * hkv) * d, dtype=dtype, device=DEV)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(batch, hq, d), k.view(batch, hkv, d), v.view(batch, hkv, d)
    pos = torch.zeros(batch, dtype=torch.int64, device=DEV)
    slots = torch.full((batch,), -1, dtype=torch.int64, device=DEV)
    seq_lens = torch.ones(batch, dtype=torch.int32, device=DEV)
    tables = torch.full((batch, width), dummy, dtype=torch.int32, device=DEV)
    out = torch.empty(batch, hq * d, dtype=dtype, device=DEV)
    run = lambda: fused_decode_attention(q, k, v, pos, rope.cos, rope.sin, layer, slots, tables,  # noqa: E731
                                         seq_lens, d**-0.5, ws, out=out)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    lens_gen = torch.Generator().manual_seed(batch * 1000 + d)
    perm = torch.randperm(nb - 1, generator=lens_gen)
    choices = [1, 2, 15, 16, 17, 31, 32, 33, 255, 1000, 4096, 4097]
    for step in range(50):
        n = 1 + step % batch  # real rows; the rest are padding (slot -1, one token, dummy block)
        lens = [choices[int(i)] for i in torch.randint(len(choices), (n,), generator=lens_gen)]
        lens[0] = int(torch.randint(1, max_len + 1, (1,), generator=lens_gen))
        perm = perm[torch.randperm(len(perm), generator=lens_gen)]
        tab = torch.full((batch, width), dummy, dtype=torch.int32)
        tab[:n] = perm[: n * width].view(n, width).to(torch.int32)
        all_lens = lens + [1] * (batch - n)
        tables.copy_(tab)
        seq_lens.copy_(torch.tensor(all_lens, dtype=torch.int32))
        pos.copy_(torch.tensor(all_lens, dtype=torch.int64) - 1)
        sl = [int(tab[i, (L - 1) // bs]) * bs + (L - 1) % bs for i, L in enumerate(lens)]
        slots.copy_(torch.tensor(sl + [-1] * (batch - n), dtype=torch.int64))
        qkv.copy_(torch.randn(qkv.shape, generator=gen, device=DEV).to(dtype))
        before = layer.clone()
        out.fill_(float("nan"))
        graph.replay()
        ref, kr = _fused_reference(before, tables, all_lens, q, k, v, pos, hq, hkv, d)
        assert rel_err(out, ref) < TOL[dtype], (step, all_lens)
        s = slots[:n]
        assert rel_err(layer[s // bs, 0, s % bs], kr[:n]) < TOL[dtype]
        assert torch.equal(layer[s // bs, 1, s % bs], v[:n])
    assert not ws.counters.any()
    first = out.clone()
    for _ in range(300):
        graph.replay()  # stores the same k/v at the same slots again: idempotent
        assert torch.equal(out, first)
    assert not ws.counters.any()


def _forward_rope_layers_0_2(backend, c, cache, q, k, v, pos, rope, graph: bool) -> torch.Tensor:
    """forward_rope of layers 0 and 2 as the model calls it, on `backend` (planned, over cache
    `c`, a copy of `cache`); graph: run once, restore `c` from `cache`, capture the two calls in
    a CUDA graph and replay it into NaN-poisoned outputs. Returns both outputs side by side."""
    run = lambda: [backend.forward_rope(layer, q, k, v, pos, rope) for layer in (0, 2)]  # noqa: E731
    outs = run()
    if graph:
        c.copy_(cache)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = run()
        for o in outs:
            o.fill_(float("nan"))
        g.replay()
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("name", ["flashinfer", "triton"])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("lens", [[1], [300], [17, 4097, 2], [5, 1000, 64, 129]])
@pytest.mark.parametrize("graph", [False, True])
def test_split_kv_decode_backend_on_off(name, hq, hkv, d, lens, graph, gen):
    """A backend's forward_rope with the fused small-batch kernel (split_kv_decode_max_batch=4)
    and without (0) agree within bf16 tolerance, output and stored K/V, eagerly and in a CUDA
    graph captured after plan_cuda_graph (two layers, as the model calls it)."""
    if name == "flashinfer":
        pytest.importorskip("flashinfer")
    from kernels.attention.selector import backend_class

    dtype = torch.bfloat16
    cache, meta, slots, q, k, v = _fused_inputs(lens, hq, hkv, d, dtype, gen)
    rope = RotaryEmbedding(d, 8192, 500000.0, LLAMA3, dtype).to(DEV)
    pos = meta.seq_lens.long() - 1
    results = []
    for threshold in (4, 0):
        c = cache.clone()
        backend = backend_class(name)(c, hq, hkv, d, split_kv_decode_max_batch=threshold)
        (backend.plan_cuda_graph if graph else backend.plan)(meta)
        assert backend._fused_decode == (threshold > 0)
        results.append((_forward_rope_layers_0_2(backend, c, cache, q, k, v, pos, rope, graph), c))
    (fused, fused_cache), (plain, plain_cache) = results
    assert rel_err(fused, plain) < TOL[dtype]
    assert rel_err(fused_cache, plain_cache) < TOL[dtype]
    assert torch.equal(fused_cache[:, 1], cache[:, 1])  # layer 1 untouched by both


def _without_then_captured_with_pdl(chain, reset=None):
    """Run `chain` with PDL off (the reference), call `reset`, then capture it in a CUDA graph
    with PDL on; returns (reference output, graph, the graph's output)."""
    import kernels.triton.gemv as g

    saved = g.USE_PDL
    try:
        g.USE_PDL = False
        ref = chain()
        if reset is not None:
            reset()
        g.USE_PDL = True
        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
    finally:
        g.USE_PDL = saved
    return ref, graph, out


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm90+")
def test_gemv_chain_with_pdl(gen):
    """The PDL launch (default on sm90+): a chain of GEMVs, each reading the previous one's output (and a
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

    ref, graph, out = _without_then_captured_with_pdl(chain)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs sm90+")
@pytest.mark.parametrize("lens", [[200], [1000], [3, 4097]])
def test_fused_decode_attention_in_a_pdl_chain(lens, gen):
    """The batch-1 layer's attention as the decode graph runs it with PDL: norm+qkv GEMV ->
    fused decode attention (which loads its cached keys BEFORE waiting for the GEMV) -> o GEMV
    with the residual, captured in a CUDA graph and replayed; outputs and the stored K/V equal
    the same chain launched without PDL, bit for bit, every replay."""
    import kernels.triton.gemv as g
    from kernels.triton.decode_attention import SplitKVWorkspace, fused_decode_attention

    hq, hkv, d, hidden, dtype = 32, 8, 128, 4096, torch.bfloat16
    cache, meta, slots, _, _, _ = _fused_inputs(lens, hq, hkv, d, dtype, gen)
    rope = RotaryEmbedding(d, 8192, 500000.0, LLAMA3, dtype).to(DEV)
    pos = meta.seq_lens.long() - 1
    ws = SplitKVWorkspace(8, hq, hkv, d, DEV)
    t = len(lens)
    x = randn(t, hidden, dtype=dtype, gen=gen)
    nw = randn(hidden, dtype=dtype, gen=gen, scale=0.3) + 1
    w_qkv = randn((hq + 2 * hkv) * d, hidden, dtype=dtype, gen=gen, scale=0.02)
    w_o = randn(hidden, hq * d, dtype=dtype, gen=gen, scale=0.02)
    before = cache.clone()

    def chain():
        outs = []
        for i in range(t):  # one-row GEMVs, as at batch 1
            outs.append(g.gemv(x[i : i + 1], w_qkv, norm_weight=nw, eps=1e-5))
        qkv = torch.cat(outs)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        a = fused_decode_attention(q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d), pos,
                                   rope.cos, rope.sin, cache[:, 1], slots, meta.block_tables,
                                   meta.seq_lens, d**-0.5, ws)
        return torch.cat([g.gemv(a[i : i + 1], w_o, residual=x[i : i + 1]) for i in range(t)])

    ref_cache = []

    def reset():  # after the reference run: keep its cache, start the PDL runs from `before`
        ref_cache.append(cache.clone())
        cache.copy_(before)

    ref, graph, out = _without_then_captured_with_pdl(chain, reset)
    for _ in range(20):
        cache.copy_(before)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
        assert torch.equal(cache, ref_cache[0])
    assert not ws.counters.any()


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


@pytest.mark.parametrize("decode_config", [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_triton_paged_attention_decode_configs(decode_config, block_size, gen):
    """The paged kernel's decode tiles (BLOCK_N, warps, stages) against the torch reference;
    a prefill batch through the same backend keeps the default tile."""
    from kernels.attention.triton_backend import TritonAttentionBackend

    hq, hkv, dim, dtype = 32, 8, 128, torch.bfloat16
    cache = random_cache(80, 3, block_size, hkv, dim, dtype, DEV, gen)
    backend = TritonAttentionBackend(cache, hq, hkv, dim, split_kv_decode_max_batch=0,
                                     decode_config=decode_config)
    for batch in ("decode", "mixed"):
        qlens, ctx = BATCHES[batch]
        meta = make_batch(qlens, ctx, block_size, 80, DEV, gen)
        t = meta.num_tokens
        q, k, v = (randn(t, h, dim, dtype=dtype, gen=gen) for h in (hq, hkv, hkv))
        ref = _torch_reference(meta, cache, 1, q, k, v, hq, hkv, dim)
        backend.plan(meta)
        out = backend.forward(1, q, k, v)
        assert rel_err(out, ref) < TOL[dtype], batch


@pytest.mark.parametrize("lens", [[300], [17, 4097, 2], [5, 1000, 64, 129, 640, 1, 33, 800]])
@pytest.mark.parametrize("tile", [(32, 4, 2), (64, 4, 3)])
@pytest.mark.parametrize("graph", [False, True])
def test_flashinfer_backend_triton_decode_range(lens, tile, graph, gen):
    """The FlashInfer backend with pure-decode batches routed to the Triton paged kernel
    (triton_decode_batches covering the batch) agrees with FlashInfer's decode within bf16
    tolerance, output and stored K/V, eagerly and in a CUDA graph; FlashInfer is never planned
    for such a batch, and a batch outside the range still takes FlashInfer."""
    pytest.importorskip("flashinfer")
    from kernels.attention.flashinfer_backend import FlashInferAttentionBackend

    hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    cache, meta, slots, q, k, v = _fused_inputs(lens, hq, hkv, d, dtype, gen)
    rope = RotaryEmbedding(d, 8192, 500000.0, LLAMA3, dtype).to(DEV)
    pos = meta.seq_lens.long() - 1
    results = []
    for lo, hi in ((1, 64), (0, 0)):
        c = cache.clone()
        backend = FlashInferAttentionBackend(c, hq, hkv, d, split_kv_decode_max_batch=0,
                                             triton_decode_batches=(lo, hi, tile))
        (backend.plan_cuda_graph if graph else backend.plan)(meta)
        assert backend._triton_decode == (hi > 0)
        assert (backend._pending_plan is not None) == (hi > 0)
        results.append((_forward_rope_layers_0_2(backend, c, cache, q, k, v, pos, rope, graph), c))
    (tri, tri_cache), (fi, fi_cache) = results
    assert rel_err(tri, fi) < TOL[dtype]
    assert rel_err(tri_cache, fi_cache) < TOL[dtype]
    outside = FlashInferAttentionBackend(cache.clone(), hq, hkv, d, split_kv_decode_max_batch=0,
                                         triton_decode_batches=(len(lens) + 1, 64, tile))
    outside.plan(meta)
    assert not outside._triton_decode and outside._pending_plan is None


def test_flashinfer_backend_tune_decode(gen):
    """tune_decode times FlashInfer's decode against the Triton tiles at each batch size in the
    Triton range (one line each; sizes outside it are not timed), and the backend then routes
    each pure-decode batch by the choice of the smallest timed size that holds it: the Triton
    kernel with the winning tile (FlashInfer unplanned), or FlashInfer, with outputs that agree
    within bf16 tolerance either way."""
    pytest.importorskip("flashinfer")
    from kernels.attention.flashinfer_backend import FlashInferAttentionBackend

    hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    tiles = [(32, 4, 2), (64, 4, 3)]
    cache = random_cache(300, 3, 16, hkv, d, dtype, DEV, gen)
    backend = FlashInferAttentionBackend(cache, hq, hkv, d, split_kv_decode_max_batch=0,
                                         triton_decode_batches=(3, 8, tiles[0]))
    lines = backend.tune_decode([1, 2, 4, 8, 16], 4096, tiles)
    assert len(lines) == 2 and all(line.startswith("decode attention at") for line in lines), lines
    assert set(backend._triton_tuned) == {4, 8}
    assert all(t is None or t in tiles for t in backend._triton_tuned.values())
    assert "4 sequences x 1024 tokens" in lines[0] and "8 sequences x 592 tokens" in lines[1]  # 300 blocks // 8 = 37 pages

    rope = RotaryEmbedding(d, 8192, 500000.0, LLAMA3, dtype).to(DEV)
    backend._triton_tuned = {4: tiles[1], 8: None}
    for lens, want in (([40, 300, 7], tiles[1]), ([40, 300, 7, 90], tiles[1]), ([40, 300, 7, 90, 5], None)):
        c0, meta, _, q, k, v = _fused_inputs(lens, hq, hkv, d, dtype, gen)
        pos = meta.seq_lens.long() - 1
        outs = []
        for tuned in (backend._triton_tuned, {4: None, 8: None}):
            c = c0.clone()
            b = FlashInferAttentionBackend(c, hq, hkv, d, split_kv_decode_max_batch=0,
                                           triton_decode_batches=(3, 8, tiles[0]))
            b._triton_tuned = tuned
            b.plan(meta)
            assert b._tile == (want if tuned is backend._triton_tuned else None), (lens, tuned)
            assert (b._pending_plan is not None) == (b._tile is not None)
            outs.append(_forward_rope_layers_0_2(b, c, c0, q, k, v, pos, rope, False))
        assert rel_err(outs[0], outs[1]) < TOL[dtype], lens


@pytest.mark.parametrize("m", [2, 16, 33, 64])
@pytest.mark.parametrize("kind", ["o", "gate_up", "down", "qkv_norm", "lm_head_norm"])
def test_multi_row_fused_linear(m, kind, gen):
    """ops.fused_linear for several CUDA rows (the fused layer path of decode batches the
    skinny plan covers) against the torch reference, with the skinny kernel planned for the
    shape and with cuBLAS; and fuses_linears follows the plan's row counts."""
    from kernels import ops
    from kernels.triton import install, skinny_plan
    from kernels.triton.skinny_gemm import SkinnyConfig

    install()
    k, n = {"o": (512, 384), "gate_up": (384, 2 * 640), "down": (640, 384),
            "qkv_norm": (384, 640), "lm_head_norm": (384, 1000)}[kind]
    w = randn(n, k, dtype=torch.bfloat16, gen=gen, scale=0.05)
    x = randn(m, k, dtype=torch.bfloat16, gen=gen)
    gated, res = kind == "gate_up", kind in ("o", "down")
    r = randn(m, n, dtype=torch.bfloat16, gen=gen) if res else None
    nw = randn(k, dtype=torch.bfloat16, gen=gen, scale=0.3) + 1 if kind.endswith("norm") else None
    kw = dict(norm_weight=nw, eps=1e-5, silu_mul=gated, residual=r,
              out_dtype=torch.float32 if kind == "lm_head_norm" else None)
    ref = ops.fused_linear_ref(x.double(), w.double(), **{**kw, "norm_weight": None if nw is None else nw.double(),
                                                          "residual": None if r is None else r.double(),
                                                          "out_dtype": None})
    try:
        for plan in ({(m, n, k, gated, res): SkinnyConfig(32, 64, 4, 3, 2, True)}, {}):
            skinny_plan.set_plan(plan)
            assert ops.fuses_linears(x) == bool(plan)
            out = ops.fused_linear(x, w, **kw)
            assert out.dtype == (torch.float32 if kind == "lm_head_norm" else torch.bfloat16)
            assert rel_err(out.double(), ref) < 1e-2, plan
    finally:
        skinny_plan.set_plan({})


def test_skinny_plan_tune(gen):
    """tune() times every kind at the row counts asked for (2..64; others skipped), installs
    only winners as plan entries for those shapes, and fuses_linears follows the plan. Row
    counts of the folded block are timed against it, the fused path's norm kernels counted."""
    from torch import nn

    from kernels.triton import install, skinny_plan
    from server.models.llama import RMSNorm

    install()

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = nn.Linear(512, 512, bias=False)
            self.gate_up_proj = nn.Linear(512, 2 * 1024, bias=False)
            self.down_proj = nn.Linear(1024, 512, bias=False)
            self.input_layernorm = RMSNorm(512, 1e-5)
            self.post_attention_layernorm = RMSNorm(512, 1e-5)

    layers = nn.ModuleList(Layer() for _ in range(4)).to(DEV, torch.bfloat16)
    try:
        lines = skinny_plan.tune(layers, [1, 2, 16, 64, 128], folded_rows=[64, 128])
        assert [line.split(" rows")[0] for line in lines] == [f"skinny GEMM at {m}" for m in (2, 16, 64)]
        assert "us unfused: o " in lines[1] and "us folded: norms " in lines[2], lines
        shapes = {(512, 512, False, True), (2048, 512, True, False), (512, 1024, False, True)}
        for m, n, k, gated, res in skinny_plan._PLAN:
            assert m in (2, 16, 64) and (n, k, gated, res) in shapes
        assert skinny_plan.planned_rows() == {key[0] for key in skinny_plan._PLAN}
        for m in (2, 16, 64):
            assert ops.fuses_linears(torch.zeros(m, 512, device=DEV)) == (m in skinny_plan.planned_rows())
    finally:
        skinny_plan.set_plan({})
