"""Which pure-decode batch sizes the FlashInfer backend attends with the Triton paged kernel
(kernels/triton/paged_attention.py) instead of FlashInfer's decode, and with which tile: timed
per CUDA-graph batch size at engine start on the engine's own KV cache.

Why at start-up and not a table: the winner moves with the GPU. At 64 sequences x 1k tokens
the Triton kernel won 1.07-1.15x on an H200 and tied on an H100; at 128 sequences it lost 5%
on the H200 with the (32, 4, 2) tile and won 1.05x on the H100 with (64, 4, 3)
(benchmarks/results/2026-12-0[26]-decode-attention*.md). Where it runs, FlashInfer's
per-step plan (a page-table gather and pinned copies on the host) is skipped as well.

A batch size takes the Triton kernel only if its best tile beats FlashInfer by `MIN_GAIN`.
Timed at `TUNE_CONTEXT` tokens a sequence (the context of the decode benchmarks), each
candidate called once per layer over every layer's slice of the cache (as a decode step reads
it: nothing stays in L2). The cache is only read.

FlashInfer is timed through a CUDA-graph decode wrapper like the ones the decode graphs replay
(its plan differs from an eager wrapper's: on an H100 at 128 x 1024 the eager wrapper ran 183 us
a layer, the graphs' 200 us). `tile_for` is the rule the backend applies per batch: pure
Python, tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Tile = tuple[int, int, int]  # BLOCK_N keys a step, warps, pipeline stages

MIN_GAIN = 1.02
TUNE_CONTEXT = 1024


def tile_for(n: int, lo: int, hi: int, default: Tile, tuned: dict[int, Tile | None] | None) -> Tile | None:
    """The Triton tile for a pure-decode batch of `n` sequences, or None: FlashInfer.

    Batches outside lo..hi take FlashInfer. Untuned (`tuned` None), every batch in the range
    takes `default`. Tuned (batch size -> tile or None, for the CUDA-graph batch sizes), a
    batch takes the choice of the smallest tuned size that holds it (the graph it pads into);
    larger than every tuned size: FlashInfer."""
    if not lo <= n <= hi:
        return None
    if tuned is None:
        return default
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


def _time_size(backend, b: int, ctx: int, tiles: list[Tile], gen: torch.Generator) -> dict[Tile | None, float]:
    """us a layer of FlashInfer's decode (key None) and of the Triton kernel with each tile
    that fits the device, for `b` sequences of `ctx` tokens on distinct blocks of the backend's
    cache, over every layer."""
    from triton.runtime.errors import OutOfResources

    from kernels.triton.paged_attention import paged_attention

    cache = backend.kv_cache  # [blocks, layers, 2, block_size, Hkv, D]
    num_blocks, num_layers, _, block_size = cache.shape[:4]
    dev = cache.device
    pages = -(-ctx // block_size)
    tables = (torch.arange(b * pages, device=dev, dtype=torch.int32) % num_blocks).view(b, pages)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
    q = torch.randn(b, backend.num_heads, backend.head_dim, generator=gen, device=dev).to(cache.dtype)
    out = torch.empty_like(q)
    wrapper = backend.graph_decode_wrapper(b, pages)  # as the decode graphs run it
    last = torch.full((b,), ctx - (pages - 1) * block_size, dtype=torch.int32)
    backend._plan_decode(wrapper, torch.arange(b + 1, dtype=torch.int32) * pages, tables.flatten(), last)
    times: dict[Tile | None, float] = {
        None: _events_us(lambda i: wrapper.run(q, cache[:, i], out=out), num_layers)
    }
    for tile in tiles:
        try:
            times[tile] = _events_us(lambda i, tile=tile: paged_attention(
                q, cache[:, i], tables, seq_lens, qsl, 1, backend.scale, out=out, config=tile), num_layers)
        except OutOfResources:  # the tile's pipeline does not fit this device's shared memory
            continue
    return times


@torch.inference_mode()
def tune(backend, sizes: Iterable[int], max_context: int, tiles: Iterable[Tile]) -> tuple[dict[int, Tile | None], list[str]]:
    """Time FlashInfer's decode against the Triton kernel with each of `tiles` for every batch
    size in `sizes` within the backend's Triton range; returns (batch size -> winning tile or
    None for FlashInfer, one log line per size)."""
    cache = backend.kv_cache
    num_blocks, block_size = cache.shape[0], cache.shape[3]
    tiles = list(tiles)
    gen = torch.Generator(device=cache.device).manual_seed(0)
    chosen: dict[int, Tile | None] = {}
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
        times = _time_size(backend, b, ctx, tiles, gen)
        fits = [t for t in tiles if t in times]
        best = min(fits, key=lambda t: times[t], default=None)
        pick = best if best is not None and times[best] * MIN_GAIN < times[None] else None
        chosen[b] = pick
        tried = ", ".join(f"{t} {times[t]:.1f}" if t in times else f"{t} does not fit" for t in tiles)
        lines.append(f"decode attention at {b} sequences x {ctx} tokens: "
                     f"{'FlashInfer' if pick is None else f'Triton {pick}'}; us a layer: FlashInfer "
                     f"{times[None]:.1f}, Triton {tried}")
    return chosen, lines
