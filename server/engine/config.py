"""`EngineConfig`: what an engine is built from (a plain dataclass; no torch import, so the
router can build its workers' configs without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass


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
