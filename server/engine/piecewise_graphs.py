"""Piecewise CUDA graphs for the steps the decode graphs do not cover: prefill chunks and mixed
prefill + decode batches of up to `max_tokens` tokens.

Why: launched from Python, such a step costs host time that does not shrink with the batch
(~10 kernels a layer, FlashInfer's run wrappers, cuBLAS dispatch). Measured with
`benchmarks/bench_gpu_throughput.py --profile-steps` on an H200, Llama-3.1-8B shape: 16 ms of
host time to launch a 512-token mixed step whose kernels run for 12.5 ms, so the device idled
and every short prefill (a chat turn's TTFT, a prefill worker's step) took the host's time.

Attention cannot be captured once for all such batches (its plan depends on every sequence's
length), so the forward pass is captured in pieces split at attention, as vLLM's piecewise
graphs are:

    piece 0      embedding, layer 0 up to its rotary embedding + K/V store
    piece i      layer i-1 after attention, layer i up to its K/V store
    piece L      layer L-1 after attention, the final norm

A step copies its ids / positions / slots into static buffers (padding rows: slot -1, so
nothing is stored for them), plans attention for its real batch, and runs piece 0,
attend(layer 0), piece 1, ..., attend(layer L-1), piece L. Each `attend` reads the real rows of
the rotated-q buffer that the piece before it wrote and writes the attention buffer that the
piece after it reads; both buffers are static and shared by all layers and buckets. Padding
rows carry finite garbage that nothing reads: every captured op works row by row.

One graph per piece per bucket (token counts 16, 32, ..., `max_tokens`), captured largest
first into one private memory pool: a tensor that crosses pieces (the residual stream) stays
allocated while later pieces are captured, intermediates are reused, as replays always run
the pieces of one bucket in capture order. The pool holds about one forward pass of
`max_tokens` tokens (`reserve_bytes`).

`capture=False` runs the same pieces and buffers eagerly (no graphs): the CPU tests check the
splitting, padding and buffer logic against the plain forward with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator

import torch

from kernels.attention.base import AttentionBackend, AttentionMetadata
from server.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def bucket_sizes(max_tokens: int) -> list[int]:
    return [b for b in BUCKETS if b < max_tokens] + [max_tokens]


class PiecewiseGraphRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        attn: AttentionBackend,
        max_tokens: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        if not attn.supports_piecewise_graphs or (capture and not attn.supports_cuda_graphs):
            raise ValueError(f"attention backend {attn.name!r} cannot run piecewise CUDA graphs")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model = model
        self.attn = attn
        self.device = device
        self.capture_graphs = capture
        self.sizes = bucket_sizes(max_tokens)
        n = self.max_tokens = self.sizes[-1]
        cfg = model.config
        dtype = model.embed_tokens.weight.dtype
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.q = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.a = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.layer_ids = [layer.layer_id for layer in model.layers]
        # bucket -> (its L + 1 piece graphs, its final hidden states [bucket, hidden])
        self._graphs: dict[int, tuple[list[torch.cuda.CUDAGraph], torch.Tensor]] = {}
        self.steps = 0  # steps run through this runner

    @staticmethod
    def reserve_bytes(model: LlamaForCausalLM, max_tokens: int) -> int:
        """Device memory the runner keeps: its static buffers, the pool (the live activations
        of one forward pass of `max_tokens` tokens, with margin) and each bucket's output."""
        cfg = model.config
        elt = model.embed_tokens.weight.element_size()
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        per_token = 4 * hidden + qkv + 3 * inter  # residual, x, h, out; qkv; gate|up, act
        static = 2 * cfg.num_heads * cfg.head_dim * elt + 3 * 8
        outputs = sum(bucket_sizes(max_tokens)) * hidden * elt
        workspaces = 64 << 20  # cuBLAS(Lt) workspaces of the capture stream, kept by torch
        return int(1.25 * per_token * elt * max_tokens) + static * max_tokens + outputs + workspaces

    def bucket(self, n: int) -> int:
        for b in self.sizes:
            if b >= n:
                return b
        raise ValueError(f"{n} tokens exceed the largest piecewise bucket {self.max_tokens}")

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def _pieces(self, t: int) -> Generator[None, None, torch.Tensor]:
        """The forward pass of a `t`-token bucket over the static buffers; yields where each
        layer's attention goes and returns the final normed hidden states [t, hidden]."""
        model = self.model
        ids, positions, slots = self.ids[:t], self.positions[:t], self.slots[:t]
        q_out, a = self.q[:t], self.a[:t].view(t, -1)
        x, residual = model.embed_tokens(ids), None
        for layer in model.layers:
            q, k, v, residual = layer.attn_in(x, residual)
            self.attn.store_rope(layer.layer_id, q, k, v, positions, model.rope, slots, q_out)
            del q, k, v, x  # free in the pool for the next pieces
            yield
            x, residual = layer.attn_out(a, residual)
        return model.norm(x, residual)[0]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, into one pool."""
        if not self.capture_graphs:
            return
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for t in reversed(self.sizes):
                # Eagerly first: compiles the Triton kernels for these shapes, picks cuBLAS
                # algorithms; the attention buffer holds whatever it holds (no plan needed).
                for _ in self._pieces(t):
                    pass
                torch.cuda.synchronize(self.device)
                graphs: list[torch.cuda.CUDAGraph] = []
                pieces = self._pieces(t)
                while True:
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=pool)
                    try:
                        next(pieces)
                        hidden = None
                    except StopIteration as stop:
                        hidden = stop.value
                    finally:
                        graph.capture_end()
                    graphs.append(graph)
                    if hidden is not None:
                        break
                self._graphs[t] = (graphs, hidden)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        # The eager warm-ups' activations sit cached for the capture stream, where no later
        # step can reuse them: give them back (the graphs' pool is not touched).
        torch.cuda.empty_cache()
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        reserved = self.reserve_bytes(self.model, self.max_tokens)
        log.info("captured piecewise CUDA graphs for prefill / mixed steps (%d pieces each; token "
                 "buckets %s) in %.1f s, %.0f MiB (%.0f MiB reserved for them)",
                 len(self.layer_ids) + 1, ",".join(map(str, self.sizes)), time.perf_counter() - t0,
                 used / 2**20, reserved / 2**20)
        if used > reserved:
            log.warning("the piecewise graphs took %.0f MiB, more than the %.0f MiB the KV budget "
                        "left them: lower --gpu-memory-utilization if memory runs out",
                        used / 2**20, reserved / 2**20)

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The step's final normed hidden states [num_tokens, hidden] (a view of a graph's
        output, valid until that bucket runs again). input_ids / positions [T] int64 on the
        device; `meta` is the real batch's metadata (its slot_mapping is copied in)."""
        t = meta.num_tokens
        tb = self.bucket(t)
        self.ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.slots[:t].copy_(meta.slot_mapping)
        self.slots[t:tb].fill_(-1)  # padding rows store nothing
        self.attn.plan(meta)
        q, a = self.q[:t], self.a[:t]
        self.steps += 1
        if not self.capture_graphs:
            pieces = self._pieces(tb)
            for layer in self.layer_ids:
                next(pieces)
                self.attn.attend(layer, q, a)
            try:
                next(pieces)
            except StopIteration as stop:
                return stop.value[:t]
            raise AssertionError("the forward pass has more pieces than layers + 1")
        graphs, hidden = self._graphs[tb]
        for layer, graph in zip(self.layer_ids, graphs, strict=False):
            graph.replay()
            self.attn.attend(layer, q, a)
        graphs[-1].replay()
        return hidden[:t]
