"""Pull the first bytes of a tensor into the GPU's L2 cache ahead of the kernel that reads it.

Why: at 128 decode rows the batched step's o projection runs ~1.7-1.9x its weight read and
its small kernels (norms, SiLU·mul, RoPE + store) hardly touch HBM, so for tens of
microseconds a layer the memory system idles while the next GEMM's weights wait in HBM. A
prefetch launched beside such a kernel (a forked stream inside the decode graph) reads the
head of the next weight into L2 in that idle time, and the GEMM then finds it there.

Modes (all sm90 unless noted):
- "bulk": each lane issues one `cp.async.bulk.prefetch.L2` (the TMA unit fetches the range;
  nothing waits, the program exits at once);
- "line": one `prefetch.global.L2` per 128-byte line (sm80+);
- "load": plain loads (sm80+), kept alive by a per-program checksum written to `scratch`.
`evict_last` asks L2 to keep the lines over ordinary traffic (PTX L2::evict_last).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODES = ("bulk", "line", "load")
LINE_BYTES = 128


@triton.jit
def _bulk_prefetch(ptrs, size, EVICT_LAST: tl.constexpr):
    if EVICT_LAST:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
            "cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1,
        )
    return tl.inline_asm_elementwise(
        "{ cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _line_prefetch(ptrs, EVICT_LAST: tl.constexpr):
    if EVICT_LAST:
        return tl.inline_asm_elementwise(
            "{ prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
            "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1,
        )
    return tl.inline_asm_elementwise(
        "{ prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _l2_prefetch_kernel(
    Src, Scratch,
    CHUNK: tl.constexpr, LANES: tl.constexpr, MODE: tl.constexpr, EVICT_LAST: tl.constexpr,
):
    """Program p covers bytes [p * CHUNK, (p + 1) * CHUNK) of Src (a uint8 view)."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, LANES)
    base = Src + pid.to(tl.int64) * CHUNK
    if MODE == 0:  # bulk: lane i fetches its CHUNK / LANES bytes
        PER: tl.constexpr = CHUNK // LANES
        r = _bulk_prefetch(base + lanes * PER, tl.full([LANES], PER, tl.int32), EVICT_LAST)
        tl.store(Scratch + pid * LANES + lanes, r, mask=r == 1)
    elif MODE == 1:  # line: LANES lines a step
        acc = tl.zeros([LANES], dtype=tl.int32)
        for start in range(0, CHUNK, LANES * 128):
            acc |= _line_prefetch(base + start + lanes * 128, EVICT_LAST)
        tl.store(Scratch + pid * LANES + lanes, acc, mask=acc == 1)
    else:  # load: LANES int32 words a step, xor-summed
        words = base.to(tl.pointer_type(tl.int32))
        acc = tl.zeros([LANES], dtype=tl.int32)
        for start in range(0, CHUNK // 4, LANES):
            if EVICT_LAST:
                acc ^= tl.load(words + start + lanes, eviction_policy="evict_last")
            else:
                acc ^= tl.load(words + start + lanes)
        tl.store(Scratch + pid, tl.xor_sum(acc, axis=0))


# mode: (bytes a program, lanes, warps)
_CONFIG = {
    "bulk": (1 << 20, 32, 1),  # 32 lanes x 32 KiB
    "line": (1 << 19, 256, 4),
    "load": (1 << 18, 2048, 8),  # 8 int32 a thread a step: 32-byte vector loads
}


def chunk_bytes(mode: str) -> int:
    """Bytes one program covers: `l2_prefetch` rounds down to a multiple of it."""
    return _CONFIG[mode][0]


def scratch_for(nbytes: int, mode: str, device: torch.device | str) -> torch.Tensor:
    """The scratch buffer `l2_prefetch` writes into (never read back; allocate once, before a
    CUDA graph capture)."""
    chunk, lanes, _ = _CONFIG[mode]
    return torch.empty(max(1, nbytes // chunk) * lanes, dtype=torch.int32, device=device)


def l2_prefetch(
    t: torch.Tensor, nbytes: int, scratch: torch.Tensor, mode: str = "bulk", evict_last: bool = False
) -> int:
    """Prefetch the first `nbytes` of contiguous tensor `t` into L2 (rounded down to whole
    programs' chunks); returns the bytes covered. A hint: correctness never depends on it."""
    if mode not in MODES:
        raise ValueError(f"unknown prefetch mode {mode!r}; expected one of {MODES}")
    if not t.is_contiguous():
        raise ValueError("l2_prefetch needs a contiguous tensor")
    chunk, lanes, warps = _CONFIG[mode]
    programs = min(nbytes, t.numel() * t.element_size()) // chunk
    if programs:
        if scratch.numel() < programs * lanes:
            raise ValueError(f"scratch too small: {scratch.numel()} < {programs * lanes} int32")
        _l2_prefetch_kernel[(programs,)](
            t.view(-1).view(torch.uint8), scratch,
            CHUNK=chunk, LANES=lanes, MODE=MODES.index(mode), EVICT_LAST=evict_last,
            num_warps=warps,
        )
    return programs * chunk
