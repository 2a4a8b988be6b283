"""`EngineConfig`: what an engine is built from (a plain dataclass; no torch import, so the
router can build its workers' configs without loading torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvcache.sizes import parse_size

# --dtype names (aliases included) -> the torch dtype's name.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
# --attention-backend names: auto and kernels.capabilities.ATTENTION_CHAIN (a test keeps them equal;
# importing that module here would import torch into the router).
ATTENTION_BACKENDS = ("auto", "flashinfer", "triton", "torch")


@dataclass
class EngineConfig:
    model: str | None = None  # GGUF file or HF folder; None = embedded SmolLM2-135M-Instruct
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory: str | int = "1GiB"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    seed: int = 0
    worker_id: str = "worker-0"
    num_threads: int | None = None  # CPU intra-op threads (None: torch's default)
    progress: bool = True
    # On CUDA: fraction of the GPU's memory this engine may fill (weights, activations, KV);
    # the KV cache gets what the others leave. 0 = use the kv_cache_memory byte budget.
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    # With CUDA graphs: stage the predicted next decode step while the current one runs.
    step_lookahead: bool = True
    # With step lookahead: launch the predicted next decode step before the current one's
    # tokens reach the host (the device runs step N+1 while the host finishes step N).
    step_overlap: bool = True
    # With CUDA graphs: prefill / mixed steps of up to this many tokens (capped at
    # max_num_batched_tokens) replay piecewise CUDA graphs split at attention; 0 = eager.
    max_piecewise_tokens: int = 2048

    def __post_init__(self) -> None:
        """Reject a config that would build an engine which never schedules anything (a
        max_num_seqs of 0 used to do exactly that: requests waited forever) or fails deep inside
        a kernel, naming the field and its command-line flag."""
        at_least = {
            "block_size": 1, "max_num_seqs": 1, "max_num_batched_tokens": 1,
            "long_prefill_token_threshold": 0, "max_piecewise_tokens": 0,
        }  # fmt: skip
        for name, lo in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"{_flag(name)} must be an integer of at least {lo}, got {value!r}")
        if self.max_num_seqs > MAX_NUM_SEQS:
            raise ValueError(f"{_flag('max_num_seqs')} must be at most {MAX_NUM_SEQS} (a CUDA grid "
                             f"dimension bounds the sequences of one attention launch), got {self.max_num_seqs}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"{_flag('max_model_len')} must be an integer of at least 2 (a prompt token "
                             f"and a generated one), got {self.max_model_len!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"{_flag('dtype')} must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"{_flag('device')} must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{_flag('attention_backend')} must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        try:
            parse_size(self.kv_cache_memory)
        except ValueError as e:
            raise ValueError(f"{_flag('kv_cache_memory')}: {e}") from None
        if not 0 <= self.gpu_memory_utilization <= 1:
            raise ValueError(f"{_flag('gpu_memory_utilization')} must be in [0, 1] (0: use "
                             f"--kv-cache-memory), got {self.gpu_memory_utilization}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"{_flag('num_threads')} must be at least 1, got {self.num_threads}")


# The Triton paged-attention kernel puts a step's sequences on CUDA grid dimension z.
MAX_NUM_SEQS = 65535


def _flag(name: str) -> str:
    """The field's name and its command-line flag (fields without one: the name alone)."""
    if name == "long_prefill_token_threshold":  # the Python API's only
        return name
    flag = "--worker-threads" if name == "num_threads" else "--" + name.replace("_", "-")
    return f"{name} ({flag})"
