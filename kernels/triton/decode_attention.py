"""Split-KV ("flash-decoding") paged attention for decode batches: one query token per
sequence, the keys of each sequence cut into CHUNK-token splits that run in parallel, then
one small kernel that merges the splits.

Why: at batch 1 the 8B model's decode attention reads ~0.8 MB of KV a layer, yet FlashInfer's
tensor-core path takes ~12 us there (its prefill kernel plus a merge kernel; the CUDA-core
kernel is slower) and kernels/triton/paged_attention.py, one program per (sequence, KV head)
walking every key, takes 15 us at 256 keys and 95 us at 2048
(benchmarks/results/2026-12-01-decode-attention.md). Here a program owns one split of one KV
head's keys, so even one sequence spreads over many SMs.

NOT used by the engine yet: written and checked against the torch reference (tests, CPU
interpreter in float32) in a session with no device time left; benchmarks/bench_decode_attention.py
times it next to FlashInfer. Wire it in for small CUDA-graph batches only if it measures faster.

Graph-safe: the grid is (sequences, KV heads, max_splits) with max_splits from a host bound on
the sequence length (the graph's max_model_len); splits past a sequence's length exit at once
and the merge reads only the splits that ran.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(
    Q, Cache, BlockTables, SeqLens, PartO, PartM, PartL,
    sm_scale,
    stride_qt, stride_qh,
    stride_page, stride_kv, stride_entry, stride_head, stride_bt,
    stride_ps, stride_ph,
    PAGE: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + seq)
    start = split * CHUNK
    if start >= seq_len:
        return
    end = tl.minimum(seq_len, start + CHUNK)
    rows = tl.arange(0, ROWS)  # the GROUP query heads of this KV head, padded for tl.dot
    row_ok = rows < GROUP
    head = kvh * GROUP + rows
    d = tl.arange(0, D_P2)
    d_ok = d < D
    q_ptr = Q + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D_P2], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 below, m and l in log2 units
    bt_row = BlockTables + seq.to(tl.int64) * stride_bt
    for i in tl.static_range(CHUNK // BLOCK_N):
        n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < end
        page = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        off = page * stride_page + (n % PAGE).to(tl.int64) * stride_entry + kvh * stride_head
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(Cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(Cache + stride_kv + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    base = seq.to(tl.int64) * stride_ps + head * stride_ph + split
    tl.store(PartM + base, m_i, mask=row_ok)
    tl.store(PartL + base, l_i, mask=row_ok)
    o_ptr = PartO + (base * D)[:, None] + d[None, :]
    tl.store(o_ptr, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(
    Out, PartO, PartM, PartL, SeqLens,
    stride_ot, stride_oh, stride_ps, stride_ph,
    CHUNK: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_P: tl.constexpr,
    D: tl.constexpr, D_P2: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    n_splits = tl.cdiv(tl.load(SeqLens + seq), CHUNK)
    d = tl.arange(0, D_P2)
    d_ok = d < D
    base = seq.to(tl.int64) * stride_ps + head * stride_ph
    m_run = -1.0e30
    l_run = 0.0
    o_run = tl.zeros([D_P2], dtype=tl.float32)
    for p0 in tl.static_range(0, MAX_SPLITS, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < n_splits
        m = tl.load(PartM + base + p, mask=p_ok, other=-1.0e30)
        l_part = tl.load(PartL + base + p, mask=p_ok, other=0.0)
        o = tl.load(PartO + ((base + p) * D)[:, None] + d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        w = tl.exp2(m - m_new)
        alpha = tl.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(l_part * w, axis=0)
        o_run = o_run * alpha + tl.sum(o * w[:, None], axis=0)
        m_run = m_new
    o_ptr = Out + seq.to(tl.int64) * stride_ot + head * stride_oh + d
    tl.store(o_ptr, (o_run / l_run).to(Out.dtype.element_ty), mask=d_ok)


def decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    chunk: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its whole paged context (keys [0, seq_len)).

    q: [S, Hq, D] (row i = sequence i's query); kv_layer: [num_blocks, 2, block_size, Hkv, D]
    (strided view ok); block_tables: [S, W] int32; seq_lens: [S] int32, each >= 1 and <=
    max_seq_len (a host bound: it sizes the grid, so a CUDA graph captured with it stays
    valid); chunk: keys per split (a multiple of 32). Returns out [S, Hq, D] in q's dtype."""
    s, hq, d = q.shape
    hkv = kv_layer.shape[3]
    group = hq // hkv
    if chunk % 32 or hq % hkv:
        raise ValueError("chunk must be a multiple of 32 and Hq a multiple of Hkv")
    if out is None:
        out = torch.empty_like(q)
    max_splits = max(1, triton.cdiv(max_seq_len, chunk))
    part_o = torch.empty((s, hq, max_splits, d), dtype=torch.float32, device=q.device)
    part_m = torch.empty((s, hq, max_splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    if s:
        d_p2 = max(16, triton.next_power_of_2(d))
        _split_kernel[(s, hkv, max_splits)](
            q, kv_layer, block_tables, seq_lens, part_o, part_m, part_l,
            scale,
            q.stride(0), q.stride(1),
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
            block_tables.stride(0),
            part_m.stride(0), part_m.stride(1),
            PAGE=kv_layer.shape[2], GROUP=group, ROWS=max(16, triton.next_power_of_2(group)),
            CHUNK=chunk, BLOCK_N=32, D=d, D_P2=d_p2, num_warps=4,
        )  # fmt: skip
        _merge_kernel[(s, hq)](
            out, part_o, part_m, part_l, seq_lens,
            out.stride(0), out.stride(1), part_m.stride(0), part_m.stride(1),
            CHUNK=chunk, MAX_SPLITS=max_splits, BLOCK_P=min(32, triton.next_power_of_2(max_splits)),
            D=d, D_P2=d_p2, num_warps=4,
        )  # fmt: skip
    return out
