"""Host -> device copies that never wait for the device.

A copy from pageable host memory waits for all work queued on the stream before it, which
would stall the engine while it prepares the next step during the current one. These go
through pinned memory, non-blocking (torch's pinned allocator keeps the buffer until the copy
has run)."""

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
