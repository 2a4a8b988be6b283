"""Rotary position embeddings (HF "rotate_half" convention), with llama3 and linear scaling."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, scaled as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r}")


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables; `forward(positions)` gathers rows, no per-step trig."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi] exactly (a sign flip): one
        # roll instead of two slices, a negation and a cat per tensor per layer.
        half = head_dim // 2
        signed = emb.sin()
        signed[:, :half].neg_()
        self.register_buffer("sin_signed", signed.to(dtype), persistent=False)
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64; q [T, Hq, D], k [T, Hkv, D] -> rotated (new tensors).

        Every layer of a forward pass passes the same `positions` tensor, so the gathered
        cos/sin rows are kept for it (keyed by identity; positions are never mutated)."""
        c = self._cached
        if c is None or c[0] is not positions:
            c = self._cached = (
                positions,
                self.cos[positions].unsqueeze(1),
                self.sin_signed[positions].unsqueeze(1),
            )
        _, cos, sin = c
        half = q.shape[-1] // 2
        return (
            torch.addcmul(q * cos, q.roll(half, dims=-1), sin),
            torch.addcmul(k * cos, k.roll(half, dims=-1), sin),
        )
