"""`EngineCore`: one worker's engine. `add_request` / `abort` / `step` — step is
schedule → run model → sample → update, and returns token deltas for the requests that moved."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kernels.attention.selector import select_backend
from kvcache.layout import KVCacheSpec, allocate_kv_cache, num_blocks_for_budget, parse_size
from kvcache.manager import KVCacheManager
from server.engine.model_runner import ModelRunner
from server.engine.outputs import EngineStats, RequestOutput
from server.engine.request import Request
from server.engine.sampler import Sampler
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.models.loader import load_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)} or auto")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    # bf16 halves the bytes a CPU decode step streams; use it where the CPU has bf16 dot
    # products (AVX512-BF16 / AMX), else float32.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        loaded = load_model(config.model, self.dtype, self.device, config.max_model_len,
                            progress=config.progress)
        self.model = loaded.model
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.kv_spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size, self.dtype)
        budget = parse_size(config.kv_cache_memory)
        num_blocks = num_blocks_for_budget(self.kv_spec, budget)
        max_len = config.max_model_len or cfg.max_position_embeddings
        capacity = num_blocks * config.block_size
        if max_len > capacity:
            # One sequence must always fit in the cache, or preemption could loop forever.
            log.warning("max_model_len %d exceeds the KV cache capacity (%d tokens); capping it",
                        max_len, capacity)
            max_len = capacity
        self.max_model_len = max_len
        self.kv_cache = allocate_kv_cache(self.kv_spec, num_blocks, self.device)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 worker_id=config.worker_id)
        backend_cls = select_backend(config.attention_backend, self.device)
        self.attn = backend_cls(self.kv_cache, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=max_len,
                long_prefill_token_threshold=config.long_prefill_token_threshold,
            ),
            self.kv,
        )
        self.runner = ModelRunner(self.model, self.attn, self.kv, Sampler(seed=config.seed), self.device)
        log.info("engine ready: %s, %s, %d KV blocks of %d tokens (%.1f MiB), max_model_len %d",
                 self.device, self.dtype, num_blocks, config.block_size,
                 num_blocks * self.kv_spec.bytes_per_block / 2**20, max_len)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (a user error: HTTP 400) for invalid parameters,
        empty prompts, out-of-vocabulary ids or a prompt that does not fit the context."""
        params.validate(self.vocab_size)
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but this model's context is {self.max_model_len} "
                "tokens (prompt plus at least one generated token must fit)"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        self.scheduler.add(
            Request(request_id, prompt_token_ids, params, self.tokenizer.eos_token_ids,
                    arrival_time if arrival_time is not None else time.monotonic())
        )

    def abort(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort(request_ids)

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        sampled = self.runner.execute(out)
        return self.scheduler.update(out, sampled)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_cache_usage=kv.usage,
            num_blocks=kv.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            prompt_tokens=s.prompt_tokens,
            generation_tokens=s.generation_tokens,
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity()
