"""`EngineCore`: one worker's engine. `add_request` / `abort` / `step` — step is
schedule → run model → sample → update, and returns token deltas for the requests that moved."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import msgspec
import torch

from kernels.attention.selector import select_backend
from kernels.capabilities import (
    fold_norms,
    install_fused_ops,
    tune_decode_attention,
    tune_decode_blas,
    tune_decode_linears,
)
from kvcache.layout import KVCacheSpec, allocate_kv_cache, num_blocks_for_budget
from kvcache.manager import KVCacheManager
from kvcache.sizes import parse_size
from server.engine.config import DTYPES, EngineConfig
from server.engine.cuda_graphs import BUCKETS, CudaGraphRunner, bucket_sizes
from server.engine.gpu_memory import profile_kv_cache_bytes
from server.engine.model_runner import ModelRunner, PendingStep
from server.engine.outputs import EngineStats, RequestOutput
from server.engine.piecewise_graphs import PiecewiseGraphRunner
from server.engine.prompt_logprobs import logit_slice_rows
from server.engine.request import Request
from server.engine.sampler import Sampler
from server.engine.sampling_params import SamplingParams, check_token_ids
from server.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput
from server.models.loader import load_model

log = logging.getLogger(__name__)

_DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPES.items()}


def _samples_without_history(req: Request) -> bool:
    """The request's next token can be sampled before the current one is known: no penalty
    reads its output tokens and min_tokens no longer masks EOS."""
    p = req.sampling_params
    return (
        p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and req.num_output_tokens >= p.min_tokens
    )


def resolve_device(name: str) -> torch.device:
    """"auto" -> the current CUDA device if there is one, else the CPU; a CUDA device always
    comes back with its index (cuda -> cuda:<current>)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            # Everything that allocates or launches on "the current device" (Triton kernels,
            # FlashInfer workspaces, CUDA graph capture, streams) must agree with the engine's.
            torch.cuda.set_device(self.device)
            install_fused_ops(self.device)
        loaded = load_model(config.model, self.dtype, self.device, config.max_model_len,
                            progress=config.progress, seed=config.seed)
        self.model = loaded.model
        if on_cuda:
            fold_norms(self.model)
        if self.device.type == "cpu":
            from kernels import cpu_ops
            from kernels.cpu_linear import pack_linears

            cpu_ops.install()
            pack_linears(self.model)
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.kv_spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size, self.dtype)
        max_len = config.max_model_len or cfg.max_position_embeddings
        backend_cls = select_backend(config.attention_backend, self.device)
        use_graphs = on_cuda and not config.enforce_eager and backend_cls.supports_cuda_graphs
        graph_sizes = min(config.max_num_seqs, max(BUCKETS))
        piecewise_tokens = min(config.max_piecewise_tokens, config.max_num_batched_tokens)
        if not (use_graphs and backend_cls.supports_piecewise_graphs):
            piecewise_tokens = 0
        if on_cuda and config.gpu_memory_utilization > 0:
            reserve = CudaGraphRunner.output_bytes(graph_sizes, cfg.vocab_size, self.dtype) if use_graphs else 0
            if piecewise_tokens:
                reserve += PiecewiseGraphRunner.reserve_bytes(self.model, piecewise_tokens)
            budget = profile_kv_cache_bytes(
                self.model, backend_cls, self.kv_spec, cfg.num_heads, cfg.vocab_size,
                config.max_num_batched_tokens, config.max_num_seqs, max_len,
                config.gpu_memory_utilization, self.device, extra_reserve=reserve,
            )
        else:
            budget = parse_size(config.kv_cache_memory)
        num_blocks = num_blocks_for_budget(self.kv_spec, budget)
        if use_graphs:
            num_blocks -= 1  # one block stays out of the pool: CUDA-graph padding rows use it
            if num_blocks < 1:
                raise ValueError("the KV cache budget holds no block besides the CUDA-graph dummy")
        capacity = num_blocks * config.block_size
        if max_len > capacity:
            # One sequence must always fit in the cache, or preemption could loop forever.
            log.warning("max_model_len %d exceeds the KV cache capacity (%d tokens); capping it",
                        max_len, capacity)
            max_len = capacity
        self.max_model_len = max_len
        self.kv_cache = allocate_kv_cache(self.kv_spec, num_blocks + int(use_graphs), self.device)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 worker_id=config.worker_id)
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
        sizes = bucket_sizes(graph_sizes)
        if on_cuda:
            tune_decode_attention(self.attn, sizes, max_len)
        graphs = None
        if use_graphs:
            tune_decode_blas(self.model, sizes)  # first: the skinny GEMM is timed against it
            tune_decode_linears(self.model, sizes, self.model.folded_decode_rows(sizes, self.attn))
            graphs = CudaGraphRunner(self.model, self.attn, config.block_size, graph_sizes, max_len,
                                     dummy_block=num_blocks, device=self.device)
            graphs.capture()
        piecewise = None
        if piecewise_tokens:
            piecewise = PiecewiseGraphRunner(self.model, self.attn, piecewise_tokens, self.device)
            piecewise.capture()
        if on_cuda and not use_graphs:
            log.info("CUDA graphs off (%s)", "--enforce-eager" if config.enforce_eager
                     else f"the {backend_cls.name} backend cannot be captured")
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None  # see `step`
        self.runner = ModelRunner(self.model, self.attn, self.kv, Sampler(seed=config.seed),
                                  self.device, cuda_graphs=graphs, piecewise=piecewise,
                                  max_logit_rows=logit_slice_rows(
                                      config.max_num_seqs, config.max_num_batched_tokens,
                                      cfg.intermediate_size, cfg.vocab_size))
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
        req = self._validated_request(request_id, prompt_token_ids, params)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        self.scheduler.add(req)

    def abort(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort(request_ids)

    def step(self) -> list[RequestOutput]:
        """Run one step; returns its outputs.

        Step overlap: when the scheduler can predict the next step (a pure decode of the
        running requests) and no row's sampling depends on the token being sampled now, the
        next step is launched on the device before this one's tokens are read back, and the
        next call returns its outputs. Its rows of requests that finish meanwhile (EOS, stop
        token, abort) are computed and dropped; their blocks stay allocated until it has run.
        """
        launched_ahead = self._in_flight is not None
        if self._in_flight is not None:
            out, pending = self._in_flight
            self._in_flight = None
        else:
            out = self.scheduler.schedule()
            if not out.scheduled:
                return []
            pending = self.runner.launch(out)
        if self.config.step_lookahead and self.runner.can_prepare_ahead:
            rows = self.scheduler.lookahead(out)
            if rows:
                if self.config.step_overlap and all(_samples_without_history(r.request) for r in rows):
                    launched = self.runner.launch_ahead(rows, pending)
                    if launched is not None:
                        nxt = SchedulerOutput([ScheduledRequest(r.request, 1) for r in rows])
                        self.scheduler.step_launched(nxt)
                        self._in_flight = (nxt, launched)
                else:
                    self.runner.prepare_ahead(rows, pending)
        sampled = pending.result()
        prompt_logprobs = pending.prompt_logprobs()
        if launched_ahead:
            self.scheduler.step_synced()  # `out` has run: blocks only it held can go
        return self.scheduler.update(out, sampled, prompt_logprobs)

    def has_unfinished_requests(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_unfinished()

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
            num_remote_waiting=len(s.remote),
            remote_reserved_blocks=s.num_remote_reserved_blocks,
            num_lease_expiries=s.num_lease_expiries,
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity()

    # -- disaggregation ------------------------------------------------------------------------

    def _validated_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        params.validate(self.vocab_size)
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but this model's context is {self.max_model_len} "
                "tokens (prompt plus at least one generated token must fit)"
            )
        check_token_ids("prompt token ids", prompt_token_ids, self.vocab_size)
        return Request(request_id, prompt_token_ids, params, self.tokenizer.eos_token_ids, time.monotonic())

    def reserve_remote(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        lease_s: float, grace_s: float = 5.0,
    ) -> tuple[int, list[int]] | None:
        """Decode side of a remote prefill: reserve blocks for the prompt, reusing this worker's
        cached prefix. Returns (first block index the prefill worker must write, destination
        block ids from there on), or None when the blocks are not available now. The request
        starts decoding at `remote_kv_arrived`; if that has not happened `lease_s` from now it
        is prefilled here instead (its blocks stay quarantined for `grace_s` more)."""
        req = self._validated_request(request_id, prompt_token_ids, params)
        if req.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs need the prompt computed where the request decodes")
        match = self.scheduler.reserve_remote(req, lease_s, grace_s)
        if match is None:
            return None
        first = match.num_tokens // self.kv.block_size
        return first, self.kv.block_table(request_id)[first:]

    def remote_kv_arrived(self, request_id: str, token_id: int, logprobs=None) -> list[RequestOutput]:
        req = self.scheduler.remote.get(request_id)
        if req is not None and req.generator is not None and not req.sampling_params.greedy:
            # The prefill worker drew the first token's noise from this seed: skip that draw,
            # so a seeded request samples the same tokens as it would on one worker.
            torch.empty(self.vocab_size).uniform_(generator=req.generator)
        return self.scheduler.remote_arrived(request_id, token_id, logprobs)

    def remote_prefill_failed(self, request_id: str) -> bool:
        """Prefill the prompt here: the remote prefill is gone (worker died, transfer failed)."""
        return self.scheduler.remote_failed(request_id)

    def waiting_for_remote_kv(self, request_id: str) -> bool:
        return request_id in self.scheduler.remote

    def remote_prefill_retried(self, request_id: str) -> bool:
        """Another prefill worker will write the KV; False if the request no longer waits."""
        return self.scheduler.remote_retry(request_id)

    def remote_writer_gone(self, request_id: str) -> None:
        """No KV write for this request is in flight or will start: its blocks need no
        quarantine (freed now if the request already ended)."""
        self.scheduler.remote_writer_gone(request_id)

    def add_prefill_only(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Prefill side: compute the prompt and sample the first token (with the request's own
        sampling parameters), then keep the KV blocks until `release_held`."""
        # One token; min_tokens capped at 1 keeps EOS masked for the first token when it must be.
        one = msgspec.structs.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
        req = self._validated_request(request_id, prompt_token_ids, one)
        req.keep_kv_on_finish = True
        self.scheduler.add(req)

    def held_blocks(self, request_id: str) -> list[int]:
        return self.kv.block_table(request_id) if request_id in self.scheduler.held else []

    def release_held(self, request_id: str) -> None:
        self.scheduler.release_held(request_id)

    def tick(self) -> list[str]:
        """Time-based housekeeping while idle: lease expiries (ids returned), deferred frees."""
        return self.scheduler.tick()
