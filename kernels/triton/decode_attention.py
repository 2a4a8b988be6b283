"""Fused decode attention for small decode batches: ONE kernel launch per layer that rotates q
and the new token's k (RoPE), stores the new k/v into the paged cache, runs split-KV
("flash-decoding") attention and merges the splits.

Why: at batch 1 the 8B model's decode attention reads ~0.1-1 MB of KV a layer, which is pure
latency, yet the FlashInfer path costs three kernels (rope_store 2.8 us + tensor-core decode
9.6 us + its merge 2.4 us on an H200). The previous version of this file (a split kernel and a
merge kernel, after a K/V store kernel, no RoPE) measured 9.2 us/layer at batch 1, context 256,
vs 12.1 us for the K/V store + FlashInfer, also without RoPE
(benchmarks/results/2026-12-02-decode-attention.md); this one folds the rotation, the store and
the merge into the split kernel. Measured on an H200 (forward_rope per layer, inside a CUDA
graph; benchmarks/results/2026-12-02-decode-attention-2.md): 8.1 / 9.9 / 17.8 us at batch 1,
context 256 / 1024 / 4096, vs 12.9 / 14.7 / 18.0 us for rope_store + FlashInfer's tensor-core
decode; at batch 4, 9.5 / 15.0-17.4 vs 15.0 / 18.0. In the batch-1 decode graph of the 8B model
it is launched with programmatic dependent launch (sm90+, see kernels/triton/gemv.py
`pdl_enabled`): everything that does not come from the preceding qkv GEMV (the step's
metadata, the rope tables, the first BLOCK_N cached keys and values of the split) is loaded
before `gdc_wait`, so those loads overlap that GEMV's tail
(benchmarks/results/2026-12-02-gpu-llama8b-b1-5.md). Since 2026-12-06 a sequence uses only the
splits its length fills, the split count follows the batch size (about two programs per SM) and
the loop tile is (64 keys, 4 warps, 2 stages); on an H100 that took batch 1 from 7.3 / 11.8 /
30.4 us to 6.5 / 9.5 / 20.8 us at 256 / 1064 / 8192 tokens, and it beats FlashInfer's
tensor-core decode up to batch 32 at 1k tokens (8 x 1064: 21.9 vs 28.0 us; 32 x 1064: 55.5 vs
62.0), so it now serves pure-decode batches of up to 32 (2026-12-06-decode-attention-5.md);
in the 8B engine's decode step that is 1.03x faster than FlashInfer at batch 8 and 32
(2026-12-06-gpu-llama8b-15.md / -16.md). At 128 sequences (one split, `DEFAULT_CONFIG`) it lost
1.02x to rope_store + the start-up-tuned Triton paged kernel (-14.md).
Tested on the GPU by
tests/test_gpu_kernels.py (eager, CUDA-graph replays, a PDL chain with the GEMVs) and on the CPU
interpreter by tests/test_decode_attention_interpreter.py.

Grid (num_seqs, num_kv_heads, num_splits); num_splits is fixed (from the batch size and the SM
count, `SplitKVWorkspace.splits_for`), never from sequence lengths or a length bound, so a CUDA
graph captured once replays for any lengths. Each sequence splits its cached keys into
`used` <= num_splits shares of a whole number of BLOCK_N keys, computed in the kernel from its
length; programs with split >= used exit before loading anything else. Program (seq, h, split)
with split < used:

1. rotates the GROUP query heads of KV head h and the new token's k exactly as
   `kernels/triton/rope_store.py` does (float32, rounded once: q to q's dtype, k to the cache
   dtype);
2. attends over its contiguous share of the cached keys [0, seq_len - 1) (a run-time range,
   rounded to BLOCK_N keys); split 0 also folds in the new token from registers (other
   programs cannot see a store made in the same launch) and is the only program that stores
   the rotated k and v at slot_mapping[seq] (slot -1: no store, CUDA-graph padding rows);
3. with one split (the grid of a large batch), writes the output itself and ends; otherwise
   writes its partial (unnormalised o, running max m, sum l) to a float32 workspace, then
   bumps an arrival counter per (seq, h); the program that arrives last (the `used`-th)
   merges the used splits,
   writes the output and resets the counter to 0 so the next launch (next layer, next graph
   replay) starts from 0.

Memory ordering of step 3 (not checkable by the CPU interpreter, which runs programs one after
another): every thread's partial stores precede a CTA barrier (`tl.debug_barrier`, bar.sync);
then one thread does the counter increment as an acq_rel atomic at GPU scope. Release is
cumulative over the barrier, so the partials of the whole CTA are visible before its
increment (the CUTLASS semaphore pattern: __syncthreads, then a releasing atomic). The
increments form one release sequence, so the last program's acquire synchronises with every
earlier program's release; Triton broadcasts a scalar atomic's result through shared memory
behind a barrier, which orders the acquire before every thread's merge loads, and those loads
are `volatile` (ld.volatile: never served from a possibly stale L1 line of an earlier replay).
The PTX Triton 3.6 emits for sm90 is exactly that: partial st.global; bar.sync; thread 0's
atom.global.gpu.acq_rel.add; st.shared + bar.sync + ld.shared of its result; branch;
ld.volatile.global of the partials (all issued before the first use). The counter reset and the
next launch's increments are ordered by the kernel boundary (this kernel is launched without
programmatic dependent launch).

Invariant: the new token's slot is never among the cached keys [0, seq_len - 1) of any
sequence in the batch (a block being appended to is not shared), so the in-launch store races
with no read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.attention.split_kv_decode import MAX_SPLITS, split_count
from kernels.triton.gemv import pdl_enabled

Config = tuple[int, int, int]  # (BLOCK_N keys a loop step, warps, pipeline stages)
# The tile and the split rule (`SplitKVWorkspace.splits_for`) from an H100 sweep of split counts
# x tiles at batches 1-32, contexts 256-8192 (benchmarks/results/2026-12-06-decode-attention-5.md).
DEFAULT_CONFIG: Config = (64, 4, 2)


@triton.jit
def _load_kv_tile(Cache, bt_row, n0, end, d, d_ok, head_off, stride_page, stride_kv, stride_entry,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys and values of cached positions [n0, n0 + BLOCK_N) (those below `end`) of one KV
    head through the block table: (valid [BLOCK_N], k [BLOCK_N, D_P2], v [BLOCK_N, D_P2])."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < end
    page = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
    off = page * stride_page + (n % PAGE).to(tl.int64) * stride_entry + head_off
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(Cache + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(Cache + stride_kv + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return n_ok, k, v


@triton.jit
def _fused_decode_kernel(
    Q, K, V, Pos, Cos, Sin, Cache, Slots, BlockTables, SeqLens, Out,
    PartO, PartM, PartL, Counters,
    sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_page, stride_kv, stride_entry, stride_head, stride_bt, stride_ot,
    PAGE: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr,
    GROUP_P2: tl.constexpr, MERGE_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq64 = seq.to(tl.int64)
    d = tl.arange(0, D_P2)
    d_ok = d < D

    # -- first what the preceding kernel (the qkv linear) does not write: the step's metadata,
    # the rope tables and the first tile of this split's share of the cached keys [0, L - 1)
    # (a run-time range, rounded to BLOCK_N keys). With PDL these loads overlap that kernel's
    # tail; q, k and v are read only after gdc_wait.
    # The splits that hold keys: `used` of the grid's NUM_SPLITS, from this sequence's length
    # (a short sequence uses few; the rest exit here, before any other load). Split 0 always
    # runs: it also folds in the new token.
    n_cached = tl.load(SeqLens + seq) - 1
    share = tl.cdiv(tl.cdiv(n_cached, NUM_SPLITS), BLOCK_N) * BLOCK_N
    used = tl.maximum(tl.cdiv(n_cached, tl.maximum(share, 1)), 1)
    if split >= used:
        return
    is_first = split == 0
    start = split * share
    end = tl.minimum(start + share, n_cached)
    bt_row = BlockTables + seq64 * stride_bt
    head_off = kvh * stride_head
    n_ok, k0, v0 = _load_kv_tile(Cache, bt_row, start, end, d, d_ok, head_off,
                                 stride_page, stride_kv, stride_entry, PAGE, BLOCK_N)

    # RoPE (HF rotate_half): x*cos + rotate_half(x)*sin, rotate_half(x)[d] = -x[d+D/2] for
    # d < D/2, x[d-D/2] above; same float32 products as rope_store, rounded once.
    lo = d < D // 2
    partner = tl.where(lo, d + D // 2, d - D // 2)
    pos = tl.load(Pos + seq).to(tl.int64)
    cos = tl.load(Cos + pos * stride_cos + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(Sin + pos * stride_sin + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.where(lo, -sin, sin)

    if PDL:
        gdc_launch_dependents()
        gdc_wait()

    rows = tl.arange(0, ROWS)  # the GROUP query heads of this KV head, padded for tl.dot
    row_ok = rows < GROUP
    head = kvh * GROUP + rows
    qm = row_ok[:, None] & d_ok[None, :]
    q_row = Q + seq64 * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_row + d[None, :], mask=qm, other=0.0).to(tl.float32)
    q_p = tl.load(q_row + partner[None, :], mask=qm, other=0.0).to(tl.float32)
    q = (q * cos[None, :] + q_p * sin[None, :]).to(Q.dtype.element_ty)

    k_row = K + seq64 * stride_kt + kvh * stride_kh
    k_new = tl.load(k_row + d, mask=d_ok, other=0.0).to(tl.float32)
    k_p = tl.load(k_row + partner, mask=d_ok, other=0.0).to(tl.float32)
    k_new = (k_new * cos + k_p * sin).to(Cache.dtype.element_ty)
    v_new = tl.load(V + seq64 * stride_vt + kvh * stride_vh + d, mask=d_ok, other=0.0).to(Cache.dtype.element_ty)

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 below, m in log2 units
    # the first tile (loaded above), then the rest of the share
    s = tl.dot(q, tl.trans(k0), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(n_ok[None, :], s, float("-inf"))
    m_i = tl.maximum(tl.max(s, axis=1), -1.0e30)  # finite: exp2(m - m') never sees inf - inf
    p = tl.exp2(s - m_i[:, None])
    l_i = tl.sum(p, axis=1)
    acc = tl.dot(p.to(v0.dtype), v0, input_precision=DOT_PRECISION)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        n_ok, k, v = _load_kv_tile(Cache, bt_row, n0, end, d, d_ok, head_off,
                                   stride_page, stride_kv, stride_entry, PAGE, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -- the new token (split 0 only), from registers
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale
    s_new = tl.where(is_first, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    p_new = tl.exp2(s_new - m_new)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    m_i = m_new

    if is_first:
        slot = tl.load(Slots + seq).to(tl.int64)
        if slot >= 0:
            dst = Cache + (slot // PAGE) * stride_page + (slot % PAGE) * stride_entry + head_off + d
            tl.store(dst, k_new, mask=d_ok)
            tl.store(dst + stride_kv, v_new, mask=d_ok)

    if NUM_SPLITS == 1:  # one program holds the whole sequence: no partials, no counter
        tl.store(Out + seq64 * stride_ot + head[:, None] * D + d[None, :],
                 (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=qm)
        return

    # -- partials, then the arrival counter; the last program to arrive merges
    pair = seq64 * HKV + kvh
    idx = (pair * NUM_SPLITS + split) * GROUP + rows
    tl.store(PartM + idx, m_i, mask=row_ok)
    tl.store(PartL + idx, l_i, mask=row_ok)
    tl.store(PartO + idx[:, None] * D_P2 + d[None, :], acc, mask=qm)
    tl.debug_barrier()  # every thread's partial stores precede the releasing increment
    arrived = tl.atomic_add(Counters + pair, 1, sem="acq_rel", scope="gpu")
    if arrived == used - 1:
        # The used splits' (m, l, o) in chunks of MERGE_P splits, each chunk's loads issued
        # together: one memory round trip per chunk, not one per split.
        g = tl.arange(0, GROUP_P2)
        g_ok = g < GROUP
        m_run = tl.full([GROUP_P2], -1.0e30, dtype=tl.float32)
        l_tot = tl.zeros([GROUP_P2], dtype=tl.float32)
        o_tot = tl.zeros([GROUP_P2, D_P2], dtype=tl.float32)
        for p0 in range(0, used, MERGE_P):
            sc = p0 + tl.arange(0, MERGE_P)
            cidx = (pair * NUM_SPLITS + sc[:, None]) * GROUP + g[None, :]  # [MERGE_P, GROUP_P2]
            ok = (sc < used)[:, None] & g_ok[None, :]
            m = tl.load(PartM + cidx, mask=ok, other=-1.0e30, volatile=True)
            l_part = tl.load(PartL + cidx, mask=ok, other=0.0, volatile=True)
            o_ok = ok[:, :, None] & d_ok[None, None, :]
            o = tl.load(PartO + cidx[:, :, None] * D_P2 + d[None, None, :], mask=o_ok, other=0.0, volatile=True)
            m_next = tl.maximum(m_run, tl.max(m, axis=0))
            a_run = tl.exp2(m_run - m_next)
            w = tl.exp2(m - m_next[None, :])  # masked rows: m = -1e30, weight 0
            l_tot = l_tot * a_run + tl.sum(l_part * w, axis=0)
            o_tot = o_tot * a_run[:, None] + tl.sum(o * w[:, :, None], axis=0)
            m_run = m_next
        l_tot = tl.where(g_ok, l_tot, 1.0)  # padded rows: 0/0 otherwise (never stored)
        o_ptr = Out + seq64 * stride_ot + (kvh * GROUP + g)[:, None] * D + d[None, :]
        tl.store(o_ptr, (o_tot / l_tot[:, None]).to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        tl.atomic_xchg(Counters + pair, 0, sem="relaxed", scope="gpu")  # ready for the next launch


class SplitKVWorkspace:
    """Partials and arrival counters of `fused_decode_attention`, owned by one attention
    backend and allocated once (fixed addresses, so CUDA graphs may bake them in).

    max_seqs: the largest decode batch it serves; counters [max_seqs * Hkv] int32 start at 0
    and every launch leaves them at 0. Not shareable between streams: launches that use one
    workspace must be ordered (one stream; layers run one after another)."""

    def __init__(
        self,
        max_seqs: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        max_splits: int | None = None,
    ) -> None:
        if num_heads % num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.max_seqs = max_seqs
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.d_p2 = max(16, triton.next_power_of_2(head_dim))
        device = torch.device(device)
        if device.type == "cuda":
            self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            self.sm_count = 132  # the CPU interpreter: H200-like splits
        self.max_splits = min(MAX_SPLITS, max_splits or split_count(1, num_kv_heads, self.sm_count))
        rows = max(1, max_seqs) * num_kv_heads * self.max_splits * self.group
        self.part_o = torch.empty((rows, self.d_p2), dtype=torch.float32, device=device)
        self.part_m = torch.empty(rows, dtype=torch.float32, device=device)
        self.part_l = torch.empty(rows, dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(1, max_seqs) * num_kv_heads, dtype=torch.int32, device=device)

    def splits_for(self, num_seqs: int) -> int:
        """Splits per (sequence, KV head) for a batch of `num_seqs`:
        kernels.attention.split_kv_decode.split_count, capped by this workspace."""
        return split_count(num_seqs, self.num_kv_heads, self.sm_count, self.max_splits)


def fused_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    workspace: SplitKVWorkspace,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """Decode attention (one new token per sequence) with RoPE and the K/V store fused in.

    q: [S, Hq, D], k/v: [S, Hkv, D] the new tokens, unrotated (strided views of the qkv
    projection ok, unit innermost stride); positions: [S] int; cos/sin: [max_positions, D];
    kv_layer: [num_blocks, 2, block_size, Hkv, D] (strided layer view); slot_mapping: [S] int,
    -1 = no store; block_tables: [S, W] int32; seq_lens: [S] int32 >= 1, INCLUDING the new token
    (keys [0, seq_len - 1) are read from the cache, the new one from k/v). q and the cache must
    share a dtype. S <= workspace.max_seqs. num_splits: None = `workspace.splits_for(S)`.
    out: None or [S, Hq * D] with unit stride along a row. config: (BLOCK_N, warps, stages), None =
    DEFAULT_CONFIG. Returns out [S, Hq * D] in q's dtype.
    No host sync and no allocation but `out`: graph-safe for any seq_lens."""
    s, hq, d = q.shape
    hkv = kv_layer.shape[3]
    if hq != hkv * workspace.group or hkv != workspace.num_kv_heads or d % 2:
        raise ValueError(f"heads {hq}/{hkv} x {d} do not match the workspace")
    if kv_layer.dim() != 5 or kv_layer.shape[1] != 2 or kv_layer.stride(-1) != 1:
        raise ValueError(f"expected a layer view [blocks, 2, block_size, heads, dim], got {tuple(kv_layer.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("fused_decode_attention needs unit innermost strides")
    if q.dtype != kv_layer.dtype:
        raise ValueError(f"q dtype {q.dtype} != cache dtype {kv_layer.dtype}")
    if s > workspace.max_seqs:
        raise ValueError(f"{s} sequences exceed the workspace's {workspace.max_seqs}")
    splits = num_splits or workspace.splits_for(s)
    if splits > workspace.max_splits:
        raise ValueError(f"{splits} splits exceed the workspace's {workspace.max_splits}")
    if out is None:
        out = torch.empty((s, hq * d), dtype=q.dtype, device=q.device)
    elif out.shape != (s, hq * d) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{s}, {hq * d}] with unit row stride")
    block_n, warps, stages = config or DEFAULT_CONFIG
    if s:
        pdl = q.is_cuda and pdl_enabled()
        gp2, ns_p2 = triton.next_power_of_2(workspace.group), triton.next_power_of_2(splits)
        _fused_decode_kernel[(s, hkv, splits)](
            q, k, v, positions, cos, sin, kv_layer, slot_mapping, block_tables, seq_lens, out,
            workspace.part_o, workspace.part_m, workspace.part_l, workspace.counters,
            scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
            kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
            block_tables.stride(0), out.stride(0),
            PAGE=kv_layer.shape[2], HKV=hkv, GROUP=workspace.group,
            ROWS=max(16, triton.next_power_of_2(workspace.group)),
            NUM_SPLITS=splits, BLOCK_N=block_n, D=d, D_P2=workspace.d_p2,
            GROUP_P2=gp2, MERGE_P=min(ns_p2, max(1, 64 // gp2)),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
            PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl,
        )  # fmt: skip
    return out
