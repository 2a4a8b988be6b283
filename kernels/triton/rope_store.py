"""Rotary embedding fused with the paged K/V store: one pass reads q, k, v of a token, writes the
rotated q (a new tensor) and the rotated k plus v straight into the layer's paged cache.

With `norm_of` (the un-normalised hidden rows that q/k/v were projected from, by weights with the
RMSNorm weight folded in; see `DecoderLayer.fold_norms`) each token's q, k and v are first
multiplied by its RMSNorm factor rsqrt(mean(row^2) + eps), in float32: the norm that would
otherwise be its own kernel before the projection.

Rotation follows `server.models.rope.RotaryEmbedding` (HF rotate_half over precomputed cos/sin
tables, so llama3/linear scaling comes for free), computed in float32 and rounded once. A slot
of -1 skips the store: CUDA-graph padding rows write nowhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_store_kernel(
    Q, K, V, QO, Pos, Cos, Sin, Cache, Slots, Norm,
    stride_norm, norm_dim, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cos,
    stride_page, stride_kv, stride_entry, stride_head,
    block_size,
    HQ: tl.constexpr, HKV: tl.constexpr, HQ_P2: tl.constexpr, HKV_P2: tl.constexpr,
    HALF: tl.constexpr, HALF_P2: tl.constexpr,
    ROPE: tl.constexpr,
    HAS_NORM: tl.constexpr, NORM_P2: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_P2)
    dmask = d < HALF
    hk = tl.arange(0, HKV_P2)
    kmask = (hk < HKV)[:, None] & dmask[None, :]
    k_ptr = K + t * stride_kt + hk[:, None] * stride_kh + d[None, :]
    k1 = tl.load(k_ptr, mask=kmask, other=0.0)
    k2 = tl.load(k_ptr + HALF, mask=kmask, other=0.0)
    r = 1.0
    if HAS_NORM:
        cols = tl.arange(0, NORM_P2)
        h = tl.load(Norm + t * stride_norm + cols, mask=cols < norm_dim, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(h * h, axis=0) / norm_dim + eps)
        k1 = k1.to(tl.float32) * r
        k2 = k2.to(tl.float32) * r
    if ROPE:
        pos = tl.load(Pos + t).to(tl.int64)
        c1 = tl.load(Cos + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(Cos + pos * stride_cos + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(Sin + pos * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(Sin + pos * stride_cos + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        hq = tl.arange(0, HQ_P2)
        qmask = (hq < HQ)[:, None] & dmask[None, :]
        q_ptr = Q + t * stride_qt + hq[:, None] * stride_qh + d[None, :]
        q1 = tl.load(q_ptr, mask=qmask, other=0.0).to(tl.float32) * r
        q2 = tl.load(q_ptr + HALF, mask=qmask, other=0.0).to(tl.float32) * r
        o_ptr = QO + t * stride_ot + hq[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, (q1 * c1 - q2 * s1).to(QO.dtype.element_ty), mask=qmask)
        tl.store(o_ptr + HALF, (q2 * c2 + q1 * s2).to(QO.dtype.element_ty), mask=qmask)
        k1f = k1.to(tl.float32)
        k2f = k2.to(tl.float32)
        k1 = (k1f * c1 - k2f * s1).to(Cache.dtype.element_ty)
        k2 = (k2f * c2 + k1f * s2).to(Cache.dtype.element_ty)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        block = slot // block_size
        entry = slot % block_size
        base = Cache + block * stride_page + entry * stride_entry + hk[:, None] * stride_head + d[None, :]
        tl.store(base, k1.to(Cache.dtype.element_ty), mask=kmask)
        tl.store(base + HALF, k2.to(Cache.dtype.element_ty), mask=kmask)
        v_ptr = V + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
        v1 = tl.load(v_ptr, mask=kmask, other=0.0)
        v2 = tl.load(v_ptr + HALF, mask=kmask, other=0.0)
        if HAS_NORM:
            v1 = v1.to(tl.float32) * r
            v2 = v2.to(tl.float32) * r
        tl.store(base + stride_kv, v1.to(Cache.dtype.element_ty), mask=kmask)
        tl.store(base + stride_kv + HALF, v2.to(Cache.dtype.element_ty), mask=kmask)


def _launch(q, k, v, positions, cos, sin, kv_layer, slot_mapping, rope: bool, out=None, norm_of=None,
            eps: float = 0.0):
    t, hkv, d = k.shape
    if norm_of is not None and (norm_of.dim() != 2 or norm_of.shape[0] != t or norm_of.stride(-1) != 1):
        raise ValueError(f"norm_of must be [{t}, hidden] with unit innermost stride, got {tuple(norm_of.shape)}")
    if d % 2 or kv_layer.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("rope_store needs an even head_dim and unit innermost strides")
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2:
        raise ValueError(f"expected a layer view [blocks, 2, block_size, heads, dim], got {tuple(kv_layer.shape)}")
    hq = q.shape[1] if q is not None else 1
    qo = None
    if rope:
        qo = torch.empty((t, hq, d), dtype=q.dtype, device=q.device) if out is None else out
        if qo.shape != (t, hq, d) or qo.dtype != q.dtype or qo.stride(-1) != 1:
            raise ValueError(f"out must be [{t}, {hq}, {d}] {q.dtype} with unit innermost stride")
    if t:
        _rope_store_kernel[(t,)](
            q if rope else k, k, v, qo if rope else k,
            positions if rope else slot_mapping, cos if rope else k, sin if rope else k,
            kv_layer, slot_mapping, k if norm_of is None else norm_of,
            0 if norm_of is None else norm_of.stride(0), 1 if norm_of is None else norm_of.shape[1], eps,
            q.stride(0) if rope else 0, q.stride(1) if rope else 0,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            qo.stride(0) if rope else 0, qo.stride(1) if rope else 0,
            cos.stride(0) if rope else 0,
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
            kv_layer.shape[2],
            HQ=hq, HKV=hkv, HQ_P2=triton.next_power_of_2(hq), HKV_P2=triton.next_power_of_2(hkv),
            HALF=d // 2, HALF_P2=triton.next_power_of_2(d // 2),
            ROPE=rope,
            HAS_NORM=norm_of is not None,
            NORM_P2=1 if norm_of is None else triton.next_power_of_2(norm_of.shape[1]),
            num_warps=4,
        )
    return qo


def rope_and_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    out: torch.Tensor | None = None,
    norm_of: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Rotate q and k by `positions`, store rotated k and v at `slot_mapping`; return rotated q.
    With `norm_of` ([T, hidden]), q, k and v are first scaled by its rows' RMSNorm factors.

    q: [T, Hq, D], k/v: [T, Hkv, D] (any row strides, unit innermost stride); positions: [T] int;
    cos/sin: [max_positions, D]; kv_layer: [num_blocks, 2, block_size, Hkv, D] (a strided view
    of the block-major cache); slot_mapping: [T] int, -1 = skip. Returns q rotated,
    [T, Hq, D] contiguous, q's dtype: written into `out` when given (any row strides).
    """
    return _launch(q, k, v, positions, cos, sin, kv_layer, slot_mapping, rope=True, out=out, norm_of=norm_of,
                   eps=eps)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k/v [T, Hkv, D] (unrotated) at `slot_mapping` ([T] int, -1 = skip)."""
    _launch(None, k, v, None, None, None, kv_layer, slot_mapping, rope=False)
