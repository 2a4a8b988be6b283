"""GPU linears that take the Triton GEMV (`kernels/triton/gemv.py`) for decode batches of up to
`MAX_M` rows and cuBLAS otherwise.

Swapped in at load time like the CPU's packed linears (`kernels/cpu_linear.py`): the module
keeps the original weight tensor (no copy), so nothing else about the model changes. The
choice between the two kernels is made per call from the row count, so a CUDA graph captures
whichever its batch size takes. Env PDSERVE_SMALL_M_GEMV=1 / 0 turns it on / off.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
ENV = "PDSERVE_SMALL_M_GEMV"
ENV_CONFIGS = "PDSERVE_GEMV_CONFIGS"  # JSON file {"NxK": [BLOCK_N, BLOCK_K, warps, stages]}
DEFAULT_ON = False

# (BLOCK_N, BLOCK_K, warps, stages) by weight shape "NxK"; from benchmarks/bench_gemv.py.
CONFIGS: dict[str, tuple[int, int, int, int]] = {}
DEFAULT_CONFIG = (16, 256, 4, 3)


def config_for(n: int, k: int) -> tuple[int, int, int, int]:
    path = os.environ.get(ENV_CONFIGS)
    table = CONFIGS
    if path:
        with open(path) as f:
            table = {key: tuple(v) for key, v in json.load(f).items()}
    return table.get(f"{n}x{k}", DEFAULT_CONFIG)


class SmallBatchLinear(nn.Module):
    """Inference-only stand-in for an `nn.Linear` (no bias) on CUDA."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from kernels.triton.gemv import MAX_M, gemv

        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self._gemv = gemv
        self._max_m = MAX_M
        self._config = config_for(linear.out_features, linear.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self._max_m and x.stride(-1) == 1:
            return self._gemv(x, self.weight, *self._config)
        return F.linear(x, self.weight)


def enabled() -> bool:
    return os.environ.get(ENV, "1" if DEFAULT_ON else "0") != "0"


def use_small_batch_gemv(model: nn.Module) -> int:
    """Replace every bias-free bf16/fp16 CUDA `nn.Linear` under `model` with a
    `SmallBatchLinear`; returns how many (0 when disabled by the env)."""
    if not enabled():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, nn.Linear)
                and child.bias is None
                and child.weight.is_cuda
                and child.weight.dtype in (torch.bfloat16, torch.float16)
            ):
                setattr(parent, name, SmallBatchLinear(child))
                count += 1
    log.info("small-batch GEMV (Triton) for %d linears at <= 4 rows", count)
    return count
