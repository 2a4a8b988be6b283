"""Synthetic serving workloads: per-request prompt and output lengths, as token-id prompts.

Prompts are random token ids below the borrowed SmolLM2 tokenizer's vocabulary (every id has
text), so every prompt is distinct and no two share a prefix block: what a workload measures
is compute and transfer, not the prefix cache. Output lengths are exact (`ignore_eos`).

  long   long-document summarisation: prompt 2048-8192 tokens, output 64-256, both uniform
  chat   ShareGPT-like chat: log-normal lengths with ShareGPT's shape (heavy right tail),
         prompt median 128 (mean ~210) clipped to 4-2048, output median 128 (mean ~175)
         clipped to 4-512
  mix    each request is `long` with probability 0.25, else `chat`

Deterministic in (name, n, seed). `scale` shrinks every length (a CPU smoke run of the same
shapes: scale 0.02 makes `long` 41-164 prompt tokens).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

TOKEN_VOCAB = 49152  # ids drawn below the borrowed tokenizer's vocabulary: all have text

WORKLOADS = {
    "long": "long-document summarisation: prompt 2048-8192 tokens, output 64-256 (uniform)",
    "chat": "ShareGPT-like chat: log-normal prompt (median 128, sigma 1.0, 4-2048 tokens) "
    "and output (median 128, sigma 0.8, 4-512 tokens)",
    "mix": "25% long-document requests, 75% chat requests",
}
MIX_LONG_FRACTION = 0.25


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int
    cls: str  # "long" | "short": which distribution the request came from


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def _lengths(kind: str, rng: random.Random) -> tuple[int, int]:
    if kind == "long":
        return rng.randint(2048, 8192), rng.randint(64, 256)
    return _lognormal(rng, 128, 1.0, 4, 2048), _lognormal(rng, 128, 0.8, 4, 512)


def make_workload(name: str, n: int, seed: int = 0, scale: float = 1.0) -> list[RequestSpec]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    rng = random.Random(f"{name}-{seed}")
    specs = []
    for _ in range(n):
        kind = name
        if name == "mix":
            kind = "long" if rng.random() < MIX_LONG_FRACTION else "chat"
        prompt_len, output_len = _lengths(kind, rng)
        if scale != 1.0:
            prompt_len, output_len = (
                max(4, round(prompt_len * scale)),
                max(2, round(output_len * scale)),
            )
        prompt = [rng.randrange(TOKEN_VOCAB) for _ in range(prompt_len)]
        specs.append(RequestSpec(prompt, output_len, "long" if kind == "long" else "short"))
    return specs


def max_model_len(name: str) -> int:
    """The longest prompt + output a workload can produce."""
    return 2048 + 512 if name == "chat" else 8192 + 256 if name == "long" else 8192 + 512
