"""Which device each spawned worker runs on, and how much of it it may fill.

`pdserve serve` with `--device auto` (or `cuda`) on a host with several GPUs spreads its
workers over them round-robin in plan order (workers of role both, then prefill, then decode),
so `--prefill-workers 1 --decode-workers 1` on two GPUs puts the prefill worker on GPU 0 and
the decode worker on GPU 1. `--gpus 2,3` restricts the spread to those GPUs; `--device cuda:N`
pins every worker to GPU N. Workers that share a GPU split `--gpu-memory-utilization` between
them (each profiles what is free when it starts). Every worker sees every GPU (no
CUDA_VISIBLE_DEVICES narrowing): CUDA IPC between two GPUs of one host, which the KV handoff
uses, needs both devices visible in both processes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    device: str  # the worker's EngineConfig.device
    gpu_memory_utilization: float


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
) -> list[Placement]:
    """One Placement per worker, in plan order. Raises ValueError for a GPU that is not there."""
    on_gpu = device.startswith("cuda") or (device == "auto" and visible_gpus > 0)
    if not on_gpu or num_workers == 0:
        return [Placement(device, gpu_memory_utilization)] * num_workers
    if visible_gpus == 0:
        raise ValueError(f"--device {device}: no CUDA device is visible")
    if ":" in device:  # pinned: every worker on that one GPU
        index = int(device.split(":", 1)[1])
        devices = [index] * num_workers
    else:
        pool = gpus if gpus is not None else list(range(visible_gpus))
        devices = [pool[i % len(pool)] for i in range(num_workers)]
    missing = sorted({d for d in devices if d >= visible_gpus})
    if missing:
        raise ValueError(f"GPU(s) {missing} requested but only {visible_gpus} visible")
    sharing = Counter(devices)
    return [Placement(f"cuda:{d}", gpu_memory_utilization / sharing[d]) for d in devices]
