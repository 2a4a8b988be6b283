"""The decode CUDA graphs' input staging after the one host->device copy, as ONE kernel.

`CudaGraphRunner._stage` copies a packed int64 buffer [ids | positions | slots | seq_lens |
token rows | block tables] to the device, then fills the graph's static inputs from it: the
input ids gathered from the previous step's sampled tokens (step lookahead), seq_lens and the
block tables converted to int32. In torch that is an index_select, a copy and two conversion
kernels, ~8 us of device time with the gaps between them at batch 1 on an H200
(benchmarks/results/2026-12-02-gpu-llama8b-b1-9.md, the step timeline); here one program per
row does all of it.

Program r (grid (bs,)): ids[r] = tokens[rows[r]] when r < n and tokens are given (the ids the
copy brought stay otherwise); seq_lens[r] = int32(lens[r]); tables[r, :w] = int32(packed row r).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stage_kernel(Dev, Tokens, SeqLens, Tables, n, w, stride_tab,
                  O_LEN, O_SRC, O_TAB, HAS_TOKENS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    if HAS_TOKENS:
        real = r < n  # padding rows keep the id the copy brought (0)
        src = tl.load(Dev + O_SRC + r, mask=real, other=0)
        tl.store(Dev + r, tl.load(Tokens + src, mask=real, other=0), mask=real)
    tl.store(SeqLens + r, tl.load(Dev + O_LEN + r).to(tl.int32))
    row = Dev + O_TAB + r.to(tl.int64) * w
    for c0 in range(0, w, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < w
        tl.store(Tables + r.to(tl.int64) * stride_tab + c, tl.load(row + c, mask=ok).to(tl.int32), mask=ok)


def stage_decode(
    dev: torch.Tensor,
    tokens: torch.Tensor | None,
    n: int,
    bs: int,
    w: int,
    o_len: int,
    o_src: int,
    o_tab: int,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
) -> None:
    """dev: the int64 device buffer (ids at [0, bs), seq_lens at o_len, token rows at o_src, a
    [bs, w] table at o_tab); tokens: int64 ids to gather rows [0, n) from, or None; seq_lens:
    int32 [>= bs]; block_tables: int32 [>= bs, >= w], unit column stride."""
    if dev.dtype != torch.int64 or seq_lens.dtype != torch.int32 or block_tables.dtype != torch.int32:
        raise ValueError("stage_decode takes an int64 buffer and int32 seq_lens / block tables")
    if block_tables.stride(1) != 1 or block_tables.shape[1] < w or block_tables.shape[0] < bs:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} cannot take [{bs}, {w}]")
    _stage_kernel[(bs,)](
        dev, tokens if tokens is not None else dev, seq_lens, block_tables, n, w, block_tables.stride(0),
        o_len, o_src, o_tab, HAS_TOKENS=tokens is not None, BLOCK=min(1024, triton.next_power_of_2(max(w, 1))),
        num_warps=1,
    )  # fmt: skip
