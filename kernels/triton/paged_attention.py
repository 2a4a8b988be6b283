"""Causal attention over the paged KV cache in one Triton kernel, for decodes and (chunked)
prefills alike: the fallback attention where FlashInfer is absent (sm75+).

Grid: (kv head, query tile, sequence). A program owns BLOCK_T query tokens of one sequence and
all query heads of one KV head (GQA packed into the rows of one tile, so decodes still fill the
tensor cores), walks the sequence's pages BLOCK_N keys at a time with an online softmax, and
stops at the last key its last query may see. Block-table pages are gathered per key row, so
any page size and the block-major strided layout both work. Programs whose tile lies past their
sequence's query length exit at once, so one launch covers a batch of mixed lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    Q, Out, Cache, BlockTables, SeqLens, QueryStart,
    sm_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_page, stride_kv, stride_entry, stride_head, stride_bt,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_P2: tl.constexpr,
):
    kvh = tl.program_id(0)
    tile = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(QueryStart + seq)
    q_len = tl.load(QueryStart + seq + 1) - q_start
    if tile * BLOCK_T >= q_len:
        return
    seq_len = tl.load(SeqLens + seq)
    ctx = seq_len - q_len  # tokens before this step's first query

    BLOCK_R: tl.constexpr = BLOCK_T * GROUP_P2
    rows = tl.arange(0, BLOCK_R)
    tok = tile * BLOCK_T + rows // GROUP_P2
    head = kvh * GROUP + rows % GROUP_P2
    row_ok = (tok < q_len) & (rows % GROUP_P2 < GROUP)
    d = tl.arange(0, D_P2)
    d_ok = d < D
    q_ptr = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok  # absolute position of each row's query
    kv_end = tl.minimum(seq_len, ctx + tl.minimum(q_len, (tile + 1) * BLOCK_T))

    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, D_P2], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 below
    bt_row = BlockTables + seq.to(tl.int64) * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        page = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        off = page * stride_page + (n % PAGE).to(tl.int64) * stride_entry + kvh * stride_head
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(Cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(Cache + stride_kv + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptr = Out + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Causal paged attention (bottom-right aligned: query i of a sequence with L keys and Q
    queries sees keys [0, L - Q + i]).

    q: [T, Hq, D]; kv_layer: [num_blocks, 2, block_size, Hkv, D] (strided view ok);
    block_tables: [S, W] int32; seq_lens: [S] int32 (keys after this step's store);
    query_start_loc: [S + 1] int32; max_query_len: host int, bounds the grid (a CUDA graph
    captured with it stays valid while no sequence exceeds it). Returns out [T, Hq, D].
    config: (BLOCK_N keys per step, num_warps, num_stages); None: 32 (64 for head dims up to
    64) keys, 4 warps, 2 stages.
    """
    t, hq, d = q.shape
    hkv = kv_layer.shape[3]
    group = hq // hkv
    group_p2 = triton.next_power_of_2(group)
    if out is None:
        out = torch.empty_like(q)
    # At least 16 rows per tile for tl.dot; prefill tiles take 64 rows.
    rows = 16 if max_query_len <= max(1, 16 // group_p2) else 64
    rows = max(rows, group_p2)
    block_t = rows // group_p2
    num_seqs = seq_lens.shape[0]
    block_n, warps, stages = config if config is not None else (32 if d > 64 else 64, 4, 2)
    if t and num_seqs:
        # KV heads vary fastest, so one sequence's heads run side by side and read its pages
        # together (up to 1-2% faster at 64-128 x 1k decodes on an H100 than sequences first).
        # CUDA caps grid z, so a launch takes at most 65535 sequences.
        grid = (hkv, triton.cdiv(max_query_len, block_t), num_seqs)
        _paged_attention_kernel[grid](
            q, out, kv_layer, block_tables, seq_lens, query_start_loc,
            scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
            block_tables.stride(0),
            PAGE=kv_layer.shape[2], GROUP=group, GROUP_P2=group_p2,
            BLOCK_T=block_t, BLOCK_N=block_n,
            D=d, D_P2=max(16, triton.next_power_of_2(d)),
            num_warps=warps, num_stages=stages,
        )
    return out
