"""Copies between host and device that never wait for the device.

A copy from pageable host memory waits for all work queued on the stream before it, which
would stall the engine while it prepares the next step during the current one. These go
through pinned memory, non-blocking (torch's pinned allocator keeps the buffer until the copy
has run). The other way, `HostCopy` queues a result's copy at once and waits only when read."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host tensor `t` on `device`."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def device_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` without the wait."""
    return to_device(torch.tensor(values, dtype=dtype), device)


class HostCopy:
    """`t` on the host: on CUDA a non-blocking copy into pinned memory is queued now behind an
    event, and `get()` waits for that event only (not for work queued after it); elsewhere
    `t` itself."""

    def __init__(self, t: torch.Tensor) -> None:
        self._ready: torch.cuda.Event | None = None
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = t

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()  # SYNC: waits for the device up to the copy
        return self._host
