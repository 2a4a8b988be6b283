"""Which pure-decode batch sizes the FlashInfer backend attends with a Triton kernel instead of
FlashInfer's decode, which kernel and with which tile: timed per CUDA-graph batch size at engine
start on the engine's own KV cache. The Triton kernels (`DecodeKernel`):
- rope_store, then the paged kernel (kernels/triton/paged_attention.py), as FlashInfer runs;
- the fused decode kernel unsplit (kernels/triton/decode_attention.py, one split): RoPE, the
  K/V store and the attention in one launch a layer. On an H100 at 64 x 1k tokens it ran
  90.5 us a layer against 95.3 for rope_store + the best paged tile and 95.8 for rope_store +
  FlashInfer; at 128 x 1k 178.7 against 180.3 and 188.1
  (benchmarks/results/2026-12-06-decode-attention-3.md).

Why at start-up and not a table: the winner moves with the GPU. At 64 sequences x 1k tokens
the Triton kernel won 1.07-1.15x on an H200 and tied on an H100; at 128 sequences it lost 5%
on the H200 with the (32, 4, 2) tile and won 1.05x on the H100 with (64, 4, 3)
(benchmarks/results/2026-12-0[26]-decode-attention*.md). Where it runs, FlashInfer's
per-step plan (a page-table gather and pinned copies on the host) is skipped as well.

A batch size takes a Triton kernel only if its best tile beats FlashInfer by `MIN_GAIN`.
Timed at `TUNE_CONTEXT` tokens a sequence (the context of the decode benchmarks), each
candidate called once per layer over every layer's slice of the cache (as a decode step reads
it: nothing stays in L2), RoPE included as `forward_rope` runs it (rope_store before FlashInfer
and the paged kernel). The new tokens' slots are -1, so the cache is only read.

FlashInfer is timed through a CUDA-graph decode wrapper like the ones the decode graphs replay
(its plan differs from an eager wrapper's: on an H100 at 128 x 1024 the eager wrapper ran 183 us
a layer, the graphs' 200 us). `tile_for` is the rule the backend applies per batch: pure
Python, tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

Tile = tuple[int, int, int]  # BLOCK_N keys a step, warps, pipeline stages

MIN_GAIN = 1.02
TUNE_CONTEXT = 1024


class DecodeKernel(NamedTuple):
    """A Triton decode attention for a pure-decode batch: `fused`, the one-launch decode kernel
    unsplit (RoPE + K/V store + attention); otherwise rope_store, then the paged kernel."""

    tile: Tile
    fused: bool = False

    def __str__(self) -> str:
        return f"{'fused' if self.fused else 'paged'} {self.tile}"


def tile_for(n: int, lo: int, hi: int, default: Tile,
             tuned: dict[int, DecodeKernel | None] | None) -> DecodeKernel | None:  # fmt: skip
    """The Triton decode kernel for a pure-decode batch of `n` sequences, or None: FlashInfer.

    Batches outside lo..hi take FlashInfer. Untuned (`tuned` None), every batch in the range
    takes the paged kernel with `default`. Tuned (batch size -> kernel or None, for the
    CUDA-graph batch sizes), a batch takes the choice of the smallest tuned size that holds it
    (the graph it pads into); larger than every tuned size: FlashInfer."""
    if not lo <= n <= hi:
        return None
    if tuned is None:
        return DecodeKernel(default)
    size = min((b for b in tuned if b >= n), default=None)
    return None if size is None else tuned[size]


def _events_us(fn: Callable[[int], object], count: int, reps: int = 3) -> float:
    """Best-of-`reps` mean device time of fn(0..count-1) queued back to back (us per call)."""
    for i in range(count):  # compile / warm
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        for i in range(count):
            fn(i)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / count)
    return best


def _time_size(backend, b: int, ctx: int, kernels: list[DecodeKernel],
               gen: torch.Generator) -> dict[DecodeKernel | None, float]:  # fmt: skip
    """us a layer of `forward_rope`'s work with FlashInfer's decode (key None) and with each of
    `kernels` that fits the device, for `b` sequences of `ctx` tokens on distinct blocks of the
    backend's cache, over every layer."""
    from triton.runtime.errors import OutOfResources

    from kernels.triton.decode_attention import fused_decode_attention
    from kernels.triton.paged_attention import paged_attention
    from kernels.triton.rope_store import rope_and_store

    cache = backend.kv_cache  # [blocks, layers, 2, block_size, Hkv, D]
    num_blocks, num_layers, _, block_size = cache.shape[:4]
    dev, hq, hkv, d = cache.device, backend.num_heads, backend.num_kv_heads, backend.head_dim
    pages = -(-ctx // block_size)
    tables = (torch.arange(b * pages, device=dev, dtype=torch.int32) % num_blocks).view(b, pages)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
    positions = torch.full((b,), ctx - 1, dtype=torch.int64, device=dev)
    slots = torch.full((b,), -1, dtype=torch.int64, device=dev)  # no store: the cache is only read
    cos, sin = (torch.randn(ctx, d, generator=gen, device=dev) for _ in range(2))
    # q, k, v as the model passes them: views of one qkv projection output
    qkv = torch.randn(b, (hq + 2 * hkv) * d, generator=gen, device=dev).to(cache.dtype)
    q, k, v = (t.view(b, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    q_rot, out = torch.empty_like(q), torch.empty(b, hq * d, dtype=q.dtype, device=dev)
    wrapper = backend.graph_decode_wrapper(b, pages)  # as the decode graphs run it
    last = torch.full((b,), ctx - (pages - 1) * block_size, dtype=torch.int32)
    backend._plan_decode(wrapper, torch.arange(b + 1, dtype=torch.int32) * pages, tables.flatten(), last)

    def rope(i: int) -> torch.Tensor:
        return rope_and_store(q, k, v, positions, cos, sin, cache[:, i], slots, out=q_rot)

    def run(i: int, kern: DecodeKernel | None) -> object:
        if kern is None:
            return wrapper.run(rope(i), cache[:, i], out=out.view(b, hq, d))
        if kern.fused:
            return fused_decode_attention(q, k, v, positions, cos, sin, cache[:, i], slots, tables, seq_lens,
                                          backend.scale, backend.unsplit_workspace(), num_splits=1,
                                          out=out, config=kern.tile, pdl=False)  # fmt: skip
        return paged_attention(rope(i), cache[:, i], tables, seq_lens, qsl, 1, backend.scale,
                               out=out.view(b, hq, d), config=kern.tile)  # fmt: skip

    times: dict[DecodeKernel | None, float] = {None: _events_us(lambda i: run(i, None), num_layers)}
    for kern in kernels:
        try:
            times[kern] = _events_us(lambda i, kern=kern: run(i, kern), num_layers)
        except OutOfResources:  # the tile's pipeline does not fit this device's shared memory
            continue
    return times


@torch.inference_mode()
def tune(backend, sizes: Iterable[int], max_context: int, tiles: Iterable[Tile],
         fused_tiles: Iterable[Tile] = ()) -> tuple[dict[int, DecodeKernel | None], list[str]]:  # fmt: skip
    """Time FlashInfer's decode against the paged kernel with each of `tiles` and the unsplit
    fused kernel with each of `fused_tiles` for every batch size in `sizes` within the
    backend's Triton range; returns (batch size -> winning kernel or None for FlashInfer, one
    log line per size)."""
    cache = backend.kv_cache
    num_blocks, block_size = cache.shape[0], cache.shape[3]
    kernels = [DecodeKernel(t) for t in tiles] + [DecodeKernel(t, True) for t in fused_tiles]
    gen = torch.Generator(device=cache.device).manual_seed(0)
    chosen: dict[int, DecodeKernel | None] = {}
    lines = []
    for b in sorted(set(sizes)):
        if not backend._triton_lo <= b <= backend._triton_hi:
            continue
        ctx = min(TUNE_CONTEXT, max_context, num_blocks // b * block_size)
        if ctx < 1:
            chosen[b] = None
            lines.append(f"decode attention at {b} sequences: FlashInfer (nothing to time: "
                         "the KV cache holds no block per sequence)")
            continue
        times = _time_size(backend, b, ctx, kernels, gen)
        fits = [t for t in kernels if t in times]
        best = min(fits, key=lambda t: times[t], default=None)
        pick = best if best is not None and times[best] * MIN_GAIN < times[None] else None
        chosen[b] = pick
        tried = ", ".join(f"{t} {times[t]:.1f}" if t in times else f"{t} does not fit" for t in kernels)
        lines.append(f"decode attention at {b} sequences x {ctx} tokens: "
                     f"{'FlashInfer' if pick is None else f'Triton {pick}'}; us a layer with RoPE: "
                     f"FlashInfer {times[None]:.1f}, Triton {tried}")
    return chosen, lines
