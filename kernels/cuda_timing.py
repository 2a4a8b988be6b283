"""Device time of a call sequence as the decode CUDA graphs run it: the start-up tuners'
(kernels/blas_plan.py, kernels/triton/skinny_plan.py) one clock."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_us(fn: Callable[[int], object], count: int, reps: int = 10) -> float:
    """Mean device time of fn(i), i = 0..count-1, captured in one CUDA graph (us per call):
    best of three batches of `reps` replays, so another process's burst is not counted."""
    for i in range(count):  # compile, pick cuBLAS heuristics, outside the capture
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(count):
            fn(i)
    g.replay()  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (reps * count))
    del g
    return best
