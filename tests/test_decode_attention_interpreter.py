"""The fused decode-attention kernel (kernels/triton/decode_attention.py: RoPE + K/V store +
split-KV attention + in-launch merge) under Triton's CPU interpreter, in float32, against
float64 attention: outputs, what was stored (and that nothing else was), counters left at 0
for the next launch, and the Triton backend's small-batch dispatch. Skipped where triton is
not installed (CI's CPU install) and where CUDA is (tests/test_gpu_kernels.py runs the
compiled kernel there). The interpreter runs programs one after another, so it checks the
math and the merge bookkeeping, not the memory ordering between programs."""

from __future__ import annotations

import pytest
import torch

from server.models.rope import RotaryEmbedding
from tests.paged_batch import make_batch, random_cache, rel_err
from tests.triton_interpreter import interpreted_module

CPU = torch.device("cpu")
BS = 16  # tokens per page


@pytest.fixture(scope="module")
def dec():
    """kernels.triton.decode_attention under the interpreter."""
    yield from interpreted_module("kernels.triton.decode_attention")


def _qkv(n, hq, hkv, d, gen):
    """q, k, v as strided views of one fused projection output, like the model's."""
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(n, hq, d), k.view(n, hkv, d), v.view(n, hkv, d)


def _reference(before, meta, q, k, v, pos, hq, hkv, d):
    """float64: rotate q and the new k, attend over the cached keys [0, L-1) plus the new one.
    Returns (out [S, Hq*D], rotated k [S, Hkv, D])."""
    rope = RotaryEmbedding(d, 512, 10000.0, None, torch.float64)
    qr, kr = rope(pos, q.double(), k.double())
    outs = []
    for i, n in enumerate(meta.seq_lens_cpu):
        tab = meta.block_tables[i].long()
        p = torch.arange(n - 1)
        kv = before[tab[p // BS], :, p % BS].double()  # [n-1, 2, hkv, d]
        keys = torch.cat([kv[:, 0], kr[i][None]]).repeat_interleave(hq // hkv, dim=1)
        vals = torch.cat([kv[:, 1], v[i][None].double()]).repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", qr[i], keys) * d**-0.5
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), vals).reshape(-1))
    return torch.stack(outs), kr


# float16 rounds q after rotation and the stored k like the GPU; bfloat16 cannot be checked
# here (the interpreter's tl.dot multiplies bfloat16 bit patterns as integers).
@pytest.mark.parametrize(("hq", "hkv", "d", "dtype"), [
    (8, 2, 32, torch.float32), (3, 3, 16, torch.float32), (6, 2, 64, torch.float32), (8, 2, 32, torch.float16),
])  # fmt: skip
@pytest.mark.parametrize(("splits", "config"), [(1, None), (3, None), (8, None), (64, None), (5, (16, 4, 2))])
def test_fused_decode_matches_float64(dec, hq, hkv, d, dtype, splits, config):
    gen = torch.Generator().manual_seed(hq * 100 + d + splits)
    lens = [1, 2, 17, 100, 33]
    nb = 32
    cache = random_cache(nb, 2, BS, hkv, d, dtype, CPU, gen)
    meta = make_batch([1] * len(lens), [n - 1 for n in lens], BS, nb, CPU, gen)
    slots = meta.slot_mapping.clone()
    slots[3] = -1  # a CUDA-graph padding row: attends, stores nothing
    q, k, v = (x.to(dtype) for x in _qkv(len(lens), hq, hkv, d, gen))
    pos = meta.seq_lens.long() - 1
    rope = RotaryEmbedding(d, 512, 10000.0, None, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    layer = cache[:, 1]
    before = cache.clone()
    ws = dec.SplitKVWorkspace(8, hq, hkv, d, CPU, max_splits=64)
    out = dec.fused_decode_attention(q, k, v, pos, rope.cos, rope.sin, layer, slots, meta.block_tables,
                                     meta.seq_lens, d**-0.5, ws, num_splits=splits, config=config)
    ref, kr = _reference(before[:, 1], meta, q, k, v, pos, hq, hkv, d)
    assert out.shape == (len(lens), hq * d) and out.dtype == dtype
    assert rel_err(out, ref) < tol
    assert torch.equal(ws.counters, torch.zeros_like(ws.counters))
    ok = slots >= 0
    s = slots[ok]
    assert rel_err(layer[s // BS, 0, s % BS], kr[ok]) < tol
    assert torch.equal(layer[s // BS, 1, s % BS], v[ok])
    restored = cache.clone()
    restored[s // BS, 1, :, s % BS] = before[s // BS, 1, :, s % BS]
    assert torch.equal(restored, before)  # no other slot, no other layer written


def test_fused_decode_workspace_reuse(dec):
    """Three launches on one workspace with other lengths and batch sizes (a graph replay, the
    next layer): each merges correctly, so every launch left the counters at 0."""
    hq, hkv, d, nb = 8, 2, 32, 40
    gen = torch.Generator().manual_seed(7)
    ws = dec.SplitKVWorkspace(4, hq, hkv, d, CPU)
    assert ws.max_splits == 64 and ws.splits_for(1) == 64 and ws.splits_for(4) == 32
    rope = RotaryEmbedding(d, 512, 10000.0, None, torch.float32)
    for lens, splits in (([40, 3], 4), ([200], None), ([1, 64, 65, 16], 2)):
        cache = random_cache(nb, 1, BS, hkv, d, torch.float32, CPU, gen)
        meta = make_batch([1] * len(lens), [n - 1 for n in lens], BS, nb, CPU, gen)
        q, k, v = _qkv(len(lens), hq, hkv, d, gen)
        pos = meta.seq_lens.long() - 1
        before = cache[:, 0].clone()
        out = dec.fused_decode_attention(q, k, v, pos, rope.cos, rope.sin, cache[:, 0], meta.slot_mapping,
                                         meta.block_tables, meta.seq_lens, d**-0.5, ws, num_splits=splits)
        ref, _ = _reference(before, meta, q, k, v, pos, hq, hkv, d)
        assert rel_err(out, ref) < 1e-5, lens
        assert not ws.counters.any()
    with pytest.raises(ValueError, match="exceed"):
        dec.fused_decode_attention(*_qkv(5, hq, hkv, d, gen), pos[:1].repeat(5), rope.cos, rope.sin,
                                   cache[:, 0], meta.slot_mapping[:1].repeat(5), meta.block_tables[:1].repeat(5, 1),
                                   meta.seq_lens[:1].repeat(5), d**-0.5, ws)


def test_workspace_splits(dec):
    """The workspace sizes for batch 1's split count (kernels.attention.split_kv_decode's rule,
    tests/test_split_kv_rule.py) or the one it is given, and caps every batch's count by it."""
    ws = dec.SplitKVWorkspace(32, 32, 8, 128, CPU)
    assert ws.max_splits == 32 and [ws.splits_for(b) for b in (1, 8, 24)] == [32, 4, 1]
    assert dec.SplitKVWorkspace(4, 32, 8, 128, CPU, max_splits=8).splits_for(1) == 8
    assert dec.SplitKVWorkspace(4, 9, 3, 64, CPU).splits_for(1) == dec.MAX_SPLITS


@pytest.mark.parametrize("threshold", [4, 2])
def test_triton_backend_dispatch(dec, threshold):
    """TritonAttentionBackend.forward_rope takes the fused kernel exactly for pure-decode
    batches of at most `split_kv_decode_max_batch` sequences; either way it matches the torch
    backend (the unfused path: rope_store + paged_attention, also interpreted here)."""
    from kernels.attention.torch_backend import TorchAttentionBackend
    from kernels.attention.triton_backend import TritonAttentionBackend

    hq, hkv, d, nb = 8, 2, 32, 40
    gen = torch.Generator().manual_seed(threshold)
    cache = random_cache(nb, 2, BS, hkv, d, torch.float32, CPU, gen)
    backend = TritonAttentionBackend(cache, hq, hkv, d, split_kv_decode_max_batch=threshold)
    assert TritonAttentionBackend(cache, hq, hkv, d, split_kv_decode_max_batch=0)._split_kv is None
    backend.plan(make_batch([1, 5], [10, 3], BS, nb, CPU, gen))
    assert not backend._fused_decode  # not a pure-decode batch
    meta = make_batch([1, 1, 1], [30, 0, 70], BS, nb, CPU, gen)
    backend.plan(meta)
    assert backend._fused_decode == (threshold >= 3)
    q, k, v = _qkv(3, hq, hkv, d, gen)
    pos = meta.seq_lens.long() - 1
    rope = RotaryEmbedding(d, 512, 10000.0, None, torch.float32)
    ref_cache = cache.clone()
    ref = TorchAttentionBackend(ref_cache, hq, hkv, d)
    ref.plan(meta)
    expect = ref.forward_rope(1, q, k, v, pos, rope)
    out = backend.forward_rope(1, q, k, v, pos, rope)
    assert rel_err(out, expect) < 1e-5
    assert rel_err(cache, ref_cache) < 1e-6
