"""The Llama block family (Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM2), written against the
attention-backend interface: the model never sees block tables or where KV lives.

Weights are stored fused (q|k|v and gate|up) so each projection is one matmul; `load_weights`
takes Hugging Face tensor names and slices them into place.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kernels import ops
from kernels.attention.base import AttentionBackend
from kernels.blas_plan import linear_add_
from server.models.config import ModelConfig
from server.models.rope import RotaryEmbedding

# Batches of up to this many rows run `DecoderLayer._forward_folded` once the norms are folded.
# Its SiLU·mul re-reads each row's hidden state once per column block: from L2 at decode batch
# sizes, where dropping two norm launches a layer is the gain, but at thousands of prefill rows
# those re-reads come from HBM and cost more than the norm kernel (Llama-3.1-8B shape, two H100s
# of the same copy rate: 1x8192 prefill 254.6 ms on the folded block, 246.4 ms on the norm
# kernels; 2026-12-06-gpu-llama8b-20.md's notes).
FOLDED_MAX_ROWS = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); without a residual, (norm(x), x)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.norms_folded = False  # see fold_norms

    def fold_norms(self) -> None:
        """Fold the two RMSNorm weights into the linears that read the normed rows: column j of
        qkv (gate|up) is scaled by the input (post-attention) norm's weight j, and the norm
        weights become ones. Every path computes the same function after this; the numerics
        move by one bf16 rounding per weight instead of one per normed activation. Batches of up
        to FOLDED_MAX_ROWS rows whose attention backend `fuses_row_scale` then run
        `_forward_folded`, which has no norm kernels at all. Models with a qkv bias are left as
        they are (the factor would have to reach the GEMM's output before the bias)."""
        if self.qkv_proj.bias is not None or self.norms_folded:
            return
        with torch.no_grad():
            for norm, linear in ((self.input_layernorm, self.qkv_proj),
                                 (self.post_attention_layernorm, self.gate_up_proj)):
                linear.weight.mul_(norm.weight.to(linear.weight.dtype))
                norm.weight.fill_(1.0)
        self.norms_folded = True

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, q|k|v] -> q [T, Hq, D], k and v [T, Hkv, D] (views)."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim),
                v.view(t, self.num_kv_heads, self.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual carried separately (x, residual) so each norm
        fuses the preceding add: the hidden state is read once per norm, not twice."""
        if ops.fuses_linears(x):
            return self._forward_fused(x, residual, positions, rope, attn)
        if self.norms_folded and x.shape[0] <= FOLDED_MAX_ROWS and attn.fuses_row_scale():
            return self._forward_folded(x, residual, positions, rope, attn)
        q, k, v, residual = self.attn_in(x, residual)
        # Rotary embedding is applied by the backend: fast ones fuse it with the K/V store.
        return self.attn_out(attn.forward_rope(self.layer_id, q, k, v, positions, rope), residual)

    def attn_in(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block up to attention: (q, k, v, residual) from the previous block's output."""
        h, residual = self.input_layernorm(x, residual)
        q, k, v = self._heads(self.qkv_proj(h))
        return q, k, v, residual

    def attn_out(self, a: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block after attention: attention output a [T, Hq * D] -> (x, residual)."""
        x = self.o_proj(a)
        h, residual = self.post_attention_layernorm(x, residual)
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(h))), residual

    def _forward_fused(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, None]:
        """Small batches (decode at batch 1): the same block as four fused linears. The norms
        run inside the qkv and gate|up linears, SiLU·mul after gate|up, and the residual adds
        after o and down, so the layer returns the summed hidden state and no residual (the
        next layer's norm of (s, None) is norm(s), as in `forward`)."""
        t = x.shape[0]
        s = x if residual is None else x + residual
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        q, k, v = self._heads(ops.fused_linear(s, self.qkv_proj.weight, self.qkv_proj.bias,
                                               norm_weight=ln1.weight, eps=ln1.eps))
        a = attn.forward_rope(self.layer_id, q, k, v, positions, rope).reshape(t, -1)
        s = ops.fused_linear(a, self.o_proj.weight, residual=s)
        act = ops.fused_linear(s, self.gate_up_proj.weight, norm_weight=ln2.weight, eps=ln2.eps,
                               silu_mul=True)
        return ops.fused_linear(act, self.down_proj.weight, residual=s), None

    def _forward_folded(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, None]:
        """The block after `fold_norms`, for batches whose backend `fuses_row_scale`: qkv and
        gate|up read the un-normalised sum s, and each row's RMSNorm factor is applied after
        the GEMM (the factor is a per-row scalar, so it commutes with it) inside the kernels
        that read their outputs: the rotate-and-store and SiLU·mul. The residual adds run in
        the o and down GEMMs (beta = 1), in place: with no residual, `x` (the embedding's
        output or the previous layer's sum, which nothing else reads) is updated. Seven kernels
        a layer instead of nine; returns the summed hidden state and no residual, as
        `_forward_fused` does."""
        t = x.shape[0]
        s = x if residual is None else x + residual
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        q, k, v = self._heads(self.qkv_proj(s))
        a = attn.forward_rope(self.layer_id, q, k, v, positions, rope, norm_of=s, eps=ln1.eps).reshape(t, -1)
        linear_add_(s, a, self.o_proj.weight)
        act = ops.silu_and_mul(self.gate_up_proj(s), norm_of=s, eps=ln2.eps)
        return linear_add_(s, act, self.down_proj.weight), None


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        # `_weight` skips nn.Embedding's random init: every load writes the table, and that
        # init on the meta device (the loader's) imports torch._dynamo: 1.9 s a process.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # The tables are computed on the CPU even under the loader's meta-device context (math
        # on meta tensors goes through torch._refs, whose first use imports torch._dynamo:
        # 1.6 s a process), then follow the weights' device.
        with torch.device("cpu"):
            rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype)
        self.rope = rope.to(self.embed_tokens.weight.device)

    def _layers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last layer's (x, residual): the final norm's input is x + residual."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rope, attn)
        return x, residual

    def fold_norms(self) -> int:
        """`DecoderLayer.fold_norms` on every layer; returns how many were folded."""
        for layer in self.layers:
            layer.fold_norms()
        return sum(layer.norms_folded for layer in self.layers)

    def folded_decode_rows(self, rows: Iterable[int], attn: AttentionBackend) -> list[int]:
        """The decode batch sizes among `rows` whose layers run `_forward_folded`, unless the
        skinny-GEMM plan puts them on the fused layer path (`DecoderLayer.forward`): what that
        plan must time its fused path against."""
        if not all(layer.norms_folded for layer in self.layers):
            return []
        return [m for m in rows if m <= FOLDED_MAX_ROWS and attn.decode_fuses_row_scale(m)]

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final-normed hidden states [T, hidden]."""
        return self.norm(*self._layers(input_ids, positions, attn))[0]

    @torch.inference_mode()
    def forward_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """Every row's logits: compute_logits(forward(...)), what the decode CUDA graphs capture.
        A one-row batch on the fused path runs the final norm inside lm_head's GEMV: one kernel
        after the last layer, not two."""
        x, residual = self._layers(input_ids, positions, attn)
        if residual is None and ops.fuses_linears(x):
            return ops.fused_linear(x, self.lm_head.weight, norm_weight=self.norm.weight, eps=self.norm.eps)
        return self.compute_logits(self.norm(x, residual)[0])

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (normed) -> logits [N, vocab] in the model's dtype, as the linear
        layer rounds them (one-row batches use the fused GEMV). Not widened here: the sampler
        widens only what it changes, and a float32 copy of a batch-128 Llama-3 lm_head output
        costs a 66 MB write per step (and the decode graphs' output buffers twice the memory)."""
        if ops.fuses_linears(hidden):
            return ops.fused_linear(hidden, self.lm_head.weight)
        return self.lm_head(hidden)

    # -- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the fused parameters. Every parameter must be
        written exactly once (checked), so a truncated or mismatched checkpoint fails loudly."""
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        inter = cfg.intermediate_size
        # (suffix in HF name, fused param suffix, row offset, rows)
        fused = {
            "self_attn.q_proj": ("qkv_proj", 0, q),
            "self_attn.k_proj": ("qkv_proj", q, kv),
            "self_attn.v_proj": ("qkv_proj", q + kv, kv),
            "mlp.gate_proj": ("gate_up_proj", 0, inter),
            "mlp.up_proj": ("gate_up_proj", inter, inter),
        }
        renamed = {"self_attn.o_proj": "o_proj", "mlp.down_proj": "down_proj"}
        params = dict(self.named_parameters(remove_duplicate=False))
        written: dict[str, int] = {}
        expected_rows = {name: p.shape[0] for name, p in params.items()}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name.startswith("lm_head") and cfg.tie_word_embeddings:
                continue
            target, offset, rows = name, 0, None
            if name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                module, _, kind = rest.rpartition(".")
                if module in fused:
                    fused_name, offset, rows = fused[module]
                    target = f"layers.{idx}.{fused_name}.{kind}"
                elif module in renamed:
                    target = f"layers.{idx}.{renamed[module]}.{kind}"
            if target not in params:
                if "rotary_emb" in name:
                    continue
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target]
            rows = param.shape[0] if rows is None else rows
            dst = param.data[offset : offset + rows]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                    f"model {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            written[target] = written.get(target, 0) + rows
        missing = [
            n
            for n, p in params.items()
            if written.get(n, 0) != expected_rows[n]
            and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
        ]
        if missing:
            raise ValueError(f"checkpoint is missing tensors for: {', '.join(missing[:8])}")
