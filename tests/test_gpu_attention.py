"""The FlashInfer and Triton attention backends against the torch reference backend: mixed
decode + prefill batches with cached context, on the block-major multi-layer cache (a layer's
view has a page stride of layers*2*block*Hkv*D), through `forward_rope` (the fused RoPE + K/V
store the model uses), eagerly and replayed from a CUDA graph with padded rows."""

from __future__ import annotations

import pytest
import torch

from server.models.rope import RotaryEmbedding
from tests.paged_batch import TOL, make_batch, poison_allocator, random_cache, rel_err
from tests.test_gpu_kernels import BATCHES, LLAMA3

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
SHAPES = [(32, 8, 128), (9, 3, 64)]


def backend_class(name):
    from kernels.attention.selector import backend_class

    return backend_class(name)


@pytest.fixture
def gen(request):
    g = torch.Generator(device=DEV)
    g.manual_seed(hash(request.node.name) % 2**31)
    return g


def _inputs(meta, hq, hkv, dim, dtype, gen):
    t = meta.num_tokens
    qkv = torch.randn(t, (hq + 2 * hkv) * dim, generator=gen, device=DEV).to(dtype)
    q, k, v = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
    return q.view(t, hq, dim), k.view(t, hkv, dim), v.view(t, hkv, dim)


def _reference(meta, cache, layer, q, k, v, positions, rope, hq, hkv, dim):
    from kernels.attention.torch_backend import TorchAttentionBackend

    ref_cache = cache.float()
    backend = TorchAttentionBackend(ref_cache, hq, hkv, dim)
    backend.plan(meta)
    ref_rope = RotaryEmbedding(dim, rope.cos.shape[0], 500000.0, LLAMA3, torch.float32).to(DEV)
    out = backend.forward_rope(layer, q.float(), k.float(), v.float(), positions, ref_rope)
    return out, ref_cache


# FlashInfer JIT-compiles one module per (dtype, head_dim) on first use (~1 min each): bf16
# only, the serving dtype; the Triton kernels also run in fp16.
@pytest.mark.parametrize(
    ("name", "dtype"),
    [("flashinfer", torch.bfloat16), ("triton", torch.bfloat16), ("triton", torch.float16)],
)
@pytest.mark.parametrize(("hq", "hkv", "dim"), SHAPES)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_backend_matches_torch(name, dtype, hq, hkv, dim, batch, gen):
    qlens, ctx = BATCHES[batch]
    blocks, layers, block_size = 96, 4, 16
    cache = random_cache(blocks, layers, block_size, hkv, dim, dtype, DEV, gen)
    meta = make_batch(qlens, ctx, block_size, blocks, DEV, gen)
    rope = RotaryEmbedding(dim, 2048, 500000.0, LLAMA3, dtype).to(DEV)
    positions = torch.tensor(
        [p for ql, sl in zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True) for p in range(sl - ql, sl)],
        device=DEV,
    )
    q, k, v = _inputs(meta, hq, hkv, dim, dtype, gen)
    for layer in (0, 2):  # the same plan serves every layer
        ref, ref_cache = _reference(meta, cache, layer, q, k, v, positions, rope, hq, hkv, dim)
        backend = backend_class(name)(cache, hq, hkv, dim)
        backend.plan(meta)
        poison_allocator(DEV)
        out = backend.forward_rope(layer, q, k, v, positions, rope)
        assert out.shape == (meta.num_tokens, hq * dim)
        err = rel_err(out, ref)
        assert err < TOL[dtype], (layer, err)
        # The store wrote the rotated keys and the values where the reference did.
        assert rel_err(cache[:, layer], ref_cache[:, layer]) < TOL[dtype]
        # Plain forward (no rope) agrees too.
        ref_plain = _plain_reference(meta, cache, layer, q, k, v, hq, hkv, dim)
        backend.plan(meta)
        assert rel_err(backend.forward(layer, q, k, v), ref_plain) < TOL[dtype]


def _plain_reference(meta, cache, layer, q, k, v, hq, hkv, dim):
    from kernels.attention.torch_backend import TorchAttentionBackend

    backend = TorchAttentionBackend(cache.float(), hq, hkv, dim)
    backend.plan(meta)
    return backend.forward(layer, q.float(), k.float(), v.float())


@pytest.mark.parametrize("name", ["flashinfer", "flashinfer-cuda-core", "triton"])
def test_decode_cuda_graph_replay(name, gen):
    """Capture one decode step over static buffers with padded rows (slot -1, dummy block),
    replay it on two different batches, compare with the reference each time.
    flashinfer-cuda-core: the graphs' decode on FlashInfer's CUDA-core kernel."""
    from server.engine.cuda_graphs import CudaGraphRunner, DecodeBatch

    hq, hkv, dim, layers, block_size, blocks = 32, 8, 128, 2, 16, 200
    dtype = torch.bfloat16
    cache = random_cache(blocks + 1, layers, block_size, hkv, dim, dtype, DEV, gen)
    dummy = blocks
    rope = RotaryEmbedding(dim, 4096, 500000.0, LLAMA3, dtype).to(DEV)
    if name == "flashinfer-cuda-core":
        backend = backend_class("flashinfer")(cache, hq, hkv, dim, cuda_core_decode_max_batch=8)
    else:
        backend = backend_class(name)(cache, hq, hkv, dim)
    wq = torch.randn(hq * dim, 64, generator=gen, device=DEV).to(dtype) * 0.1
    wk = torch.randn(hkv * dim, 64, generator=gen, device=DEV).to(dtype) * 0.1
    wv = torch.randn(hkv * dim, 64, generator=gen, device=DEV).to(dtype) * 0.1
    emb = torch.randn(1000, 64, generator=gen, device=DEV).to(dtype)

    class TinyModel(torch.nn.Module):
        """Embedding -> q/k/v projections -> attention over layers: the graph's whole step."""

        def forward(self, ids, positions, attn):
            x = emb[ids]
            outs = []
            for layer in range(layers):
                q = (x @ wq.T).view(-1, hq, dim)
                k = (x @ wk.T).view(-1, hkv, dim)
                v = (x @ wv.T).view(-1, hkv, dim)
                outs.append(attn.forward_rope(layer, q, k, v, positions, rope))
            return torch.cat(outs, dim=-1)

        def forward_logits(self, ids, positions, attn):  # what CudaGraphRunner captures
            return self.forward(ids, positions, attn)

    model = TinyModel()
    graphs = CudaGraphRunner(model, backend, block_size, max_num_seqs=8, max_model_len=1024,
                             dummy_block=dummy, device=DEV)
    graphs.capture()
    for n, ctx in ((3, [40, 1, 300]), (5, [16, 17, 100, 2, 64])):
        meta = make_batch([1] * n, ctx, block_size, blocks, DEV, gen)
        ids = torch.randint(0, 1000, (n,), generator=gen, device=DEV)
        positions = meta.seq_lens.long() - 1
        tables = [row[: -(-s // block_size)] for row, s in zip(meta.block_tables.tolist(), meta.seq_lens_cpu, strict=True)]
        ref_cache = cache.float()
        from kernels.attention.torch_backend import TorchAttentionBackend

        ref_backend = TorchAttentionBackend(ref_cache, hq, hkv, dim)
        ref_backend.plan(meta)
        ref_rope = RotaryEmbedding(dim, 4096, 500000.0, LLAMA3, torch.float32).to(DEV)
        x = emb[ids].float()
        ref = []
        for layer in range(layers):
            q = (x @ wq.T.float()).view(-1, hq, dim)
            k = (x @ wk.T.float()).view(-1, hkv, dim)
            v = (x @ wv.T.float()).view(-1, hkv, dim)
            ref.append(ref_backend.forward_rope(layer, q, k, v, positions, ref_rope))
        ref = torch.cat(ref, dim=-1)
        out = graphs.run(DecodeBatch(ids.tolist(), positions.tolist(), meta.slot_mapping.tolist(),
                                     meta.seq_lens_cpu, tables))
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 2e-2
        # The dummy block took the padding rows' reads only: their slot -1 stored nothing there.
        assert rel_err(cache[:blocks], ref_cache[:blocks]) < 1e-2
