"""Which device each spawned worker runs on, and how much of it it may fill.

`pdserve serve` with `--device auto` (or `cuda`) on a host with several GPUs spreads its
workers over them round-robin in plan order (workers of role both, then prefill, then decode),
so `--prefill-workers 1 --decode-workers 1` on two GPUs puts the prefill worker on GPU 0 and
the decode worker on GPU 1. `--gpus 2,3` restricts the spread to those GPUs; `--device cuda:N`
pins every worker to GPU N. Workers that share a GPU split `--gpu-memory-utilization` between
them (each profiles what is free when it starts).

CPU workers on one host split its cores (`cpu_threads`): each worker's torch runs its ops on an
OpenMP pool, and pools that together ask for more threads than there are cores wait on each
other at every parallel region. Measured on a 2-core host with a second busy process: an
`index_select` of 112 KV rows took 8 ms with 2 threads, 61 us with 1.

A spread worker sees only its own GPU (CUDA_VISIBLE_DEVICES narrowed to it, as vLLM and
Dynamo run one worker per GPU), so its device is cuda:0 in its own numbering. This matters for
the KV handoff: NIXL's UCX backend takes the device id of each descriptor as a device of the
calling process, and a prefill worker that saw both GPUs wrote a peer's descriptors (device 1)
through the wrong device context, which ended in an illegal memory access (H200 x2, 2026-11-22).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


def cpu_threads(num_cpu_workers: int, cores: int) -> int:
    """Intra-op threads for each of `num_cpu_workers` CPU workers sharing `cores` cores."""
    return max(1, cores // max(1, num_cpu_workers))


@dataclass(frozen=True)
class Placement:
    device: str  # the worker's EngineConfig.device
    gpu_memory_utilization: float
    visible_devices: str | None = None  # the worker's CUDA_VISIBLE_DEVICES (None: inherit)


def parse_gpus(text: str | None) -> list[int] | None:
    """`--gpus` ("0,1" / "all" / None) -> GPU indices, or None for all visible ones."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        gpus = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--gpus {text!r}: expected comma-separated GPU indices, e.g. 0,1"
        ) from None
    if not gpus or any(g < 0 for g in gpus):
        raise ValueError(f"--gpus {text!r}: expected comma-separated GPU indices, e.g. 0,1")
    return gpus


def place_workers(
    num_workers: int,
    device: str,
    gpu_memory_utilization: float,
    visible_gpus: int,
    gpus: list[int] | None = None,
    parent_visible: str | None = None,
) -> list[Placement]:
    """One Placement per worker, in plan order. `parent_visible` is this process's
    CUDA_VISIBLE_DEVICES (indices refer to its entries). Raises ValueError for a GPU that is
    not there."""
    on_gpu = device.startswith("cuda") or (device == "auto" and visible_gpus > 0)
    if not on_gpu or num_workers == 0:
        return [Placement(device, gpu_memory_utilization)] * num_workers
    if visible_gpus == 0:
        raise ValueError(f"--device {device}: no CUDA device is visible")
    pinned = ":" in device
    if pinned:  # every worker on that one GPU
        devices = [int(device.split(":", 1)[1])] * num_workers
    else:
        pool = gpus if gpus is not None else list(range(visible_gpus))
        devices = [pool[i % len(pool)] for i in range(num_workers)]
    missing = sorted({d for d in devices if d >= visible_gpus})
    if missing:
        raise ValueError(f"GPU(s) {missing} requested but only {visible_gpus} visible")
    sharing = Counter(devices)
    if pinned:
        return [Placement(f"cuda:{d}", gpu_memory_utilization / sharing[d]) for d in devices]
    names = [x.strip() for x in parent_visible.split(",")] if parent_visible else None
    return [
        Placement("cuda:0", gpu_memory_utilization / sharing[d], names[d] if names else str(d))
        for d in devices
    ]
