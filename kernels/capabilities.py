"""Runtime capability checks: what this process can run on this device, decided when the
engine starts (never from compile-time flags), with the reason for each decision.

- FlashInfer attention needs a CUDA device of compute capability sm80+ and an importable
  `flashinfer` (it needs Triton too: K/V are stored by a Triton kernel).
- Triton kernels (fused RMSNorm / SiLU·mul / RoPE + K/V store, and the Triton attention) need
  sm75+ and an importable `triton`.
- Everything else falls back to the torch references.

The attention backend is chosen from the first usable entry of flashinfer → triton → torch,
starting at the requested one (`--attention-backend`, else env `PDSERVE_ATTENTION_BACKEND`,
else "auto" = the top), and logged in ONE line naming the backend and why.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import time
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from kernels.attention.base import AttentionBackend

log = logging.getLogger(__name__)

ATTENTION_CHAIN = ("flashinfer", "triton", "torch")
# Defaults of `triton_decode_batches` (benchmarks/results/2026-12-06-decode-attention*.md):
# the batch sizes where the Triton paged kernel may replace FlashInfer's decode, and its tiles,
# timed against FlashInfer at engine start (`tune_decode_attention`); the first tile is the one
# used where nothing was timed.
TRITON_DECODE_BATCHES = "33-128"
TRITON_DECODE_TILES = ((32, 4, 2), (64, 4, 3), (32, 4, 3), (16, 2, 3))
MIN_CAPABILITY = {"flashinfer": (8, 0), "triton": (7, 5)}
ENV_ATTENTION_BACKEND = "PDSERVE_ATTENTION_BACKEND"


class Choice(NamedTuple):
    name: str
    why: str


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@functools.cache
def module_version(name: str) -> str | None:
    """The imported module's version, None when it cannot be imported (any error counts:
    a broken install must fall back, not crash the engine)."""
    try:
        mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - ImportError, OSError from a missing .so, CUDA errors...
        return None
    return str(getattr(mod, "__version__", "unknown"))


def module_available(name: str) -> bool:
    return module_version(name) is not None


def _sm(cap: tuple[int, int]) -> str:
    return f"sm{cap[0]}{cap[1]}"


def why_not(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    cap = device_capability(device)
    if cap is None:
        return f"{backend} needs a CUDA device, this one is {device.type}"
    need = MIN_CAPABILITY[backend]
    if cap < need:
        return f"{backend} needs {_sm(need)}+, this device is {_sm(cap)}"
    if not module_available("triton"):
        return f"{backend} needs triton, which cannot be imported"
    if backend == "flashinfer" and not module_available("flashinfer"):
        return "flashinfer cannot be imported"
    return None


def choose_attention_backend(requested: str, device: torch.device) -> Choice:
    """Resolve a requested backend name ("auto", "flashinfer", "triton", "torch") to the one
    that will run, falling down the chain from the request. Raises ValueError for an unknown
    name. Pure apart from the capability/import probes above (tests monkeypatch those)."""
    if requested == "auto":
        requested = os.environ.get(ENV_ATTENTION_BACKEND, "auto") or "auto"
    if requested != "auto" and requested not in ATTENTION_CHAIN:
        raise ValueError(
            f"unknown attention backend {requested!r}; choose from auto, {', '.join(ATTENTION_CHAIN)}"
        )
    if requested == "auto" and device.type != "cuda":
        return Choice("torch", f"the only backend for device {device.type}")
    start = 0 if requested == "auto" else ATTENTION_CHAIN.index(requested)
    reasons: list[str] = []
    for name in ATTENTION_CHAIN[start:]:
        reason = why_not(name, device)
        if reason is None:
            if requested == "auto":
                head = "fastest available" if not reasons else "; ".join(reasons)
            else:
                head = "requested" if not reasons else f"{requested} requested, but " + "; ".join(reasons)
            return Choice(name, head)
        reasons.append(reason)
    raise AssertionError("the torch backend always runs")  # pragma: no cover


def triton_ops_usable(device: torch.device) -> Choice:
    """Whether the fused Triton ops (RMSNorm, SiLU·mul, the batch-1 GEMV) can replace the torch
    references."""
    reason = why_not("triton", device)
    return Choice("triton" if reason is None else "torch", reason or "sm75+ with triton")


def fused_gemv_enabled() -> bool:
    """Whether batch-1 decode runs its layers as fused one-row GEMVs where the Triton ops run
    (kernels/triton/gemv.py); PDSERVE_FUSED_GEMV=0 turns that off."""
    return os.environ.get("PDSERVE_FUSED_GEMV", "1") != "0"


def split_kv_decode_max_batch() -> int:
    """Largest pure-decode batch that the FlashInfer and Triton attention backends run as one
    fused Triton kernel per layer (RoPE + K/V store + split-KV attention + merge,
    kernels/triton/decode_attention.py); env PDSERVE_SPLIT_KV_DECODE_MAX_BATCH, default 32,
    0 = never."""
    return int(os.environ.get("PDSERVE_SPLIT_KV_DECODE_MAX_BATCH", "32"))


def triton_decode_batches() -> tuple[int, int, tuple[int, int, int]]:
    """(min, max, tile): pure-decode batches of min..max sequences that the FlashInfer backend
    may attend with the Triton paged kernel (rope_store first) and its (BLOCK_N, warps, stages)
    decode tile instead of FlashInfer's decode: all of them with `tile` unless
    `tune_decode_attention` timed them. Env PDSERVE_TRITON_DECODE_BATCHES="min-max"
    ("0-0" = never), PDSERVE_TRITON_DECODE_TILE="BLOCK_N,warps,stages" (one fixed tile for the
    whole range, nothing timed)."""
    lo, _, hi = os.environ.get("PDSERVE_TRITON_DECODE_BATCHES", TRITON_DECODE_BATCHES).partition("-")
    fixed = os.environ.get("PDSERVE_TRITON_DECODE_TILE")
    tile = TRITON_DECODE_TILES[0] if fixed is None else tuple(int(v) for v in fixed.split(","))
    if len(tile) != 3:
        raise ValueError(f"PDSERVE_TRITON_DECODE_TILE takes BLOCK_N,warps,stages, got {tile}")
    return int(lo), int(hi or lo), tile


def triton_decode_tuned() -> bool:
    """Whether the engine times FlashInfer's decode against the Triton tiles per batch size at
    start-up: yes unless PDSERVE_TRITON_DECODE_TILE fixes the tile."""
    return "PDSERVE_TRITON_DECODE_TILE" not in os.environ


def tune_decode_attention(attn: AttentionBackend, sizes: list[int], max_context: int) -> None:
    """Let the attention backend time its decode kernels for the CUDA-graph batch sizes
    `sizes` (`AttentionBackend.tune_decode`) unless the tile is fixed; logs what was picked."""
    if not triton_decode_tuned():
        return
    t0 = time.perf_counter()
    lines = attn.tune_decode(sizes, max_context, list(TRITON_DECODE_TILES))
    for line in lines:
        log.info("%s", line)
    if lines:
        torch.cuda.empty_cache()  # the timing buffers: the KV cache was sized before this ran
        log.info("decode attention timed in %.1f s", time.perf_counter() - t0)


def pdl_choice(device: torch.device) -> Choice:
    """Whether the one-row decode kernels (the fused GEMVs, the fused decode attention) launch
    with programmatic dependent launch on `device`: sm90+, unless PDSERVE_PDL=0 (the kernels
    ask kernels/triton/gemv.py `pdl_enabled`, which applies this rule)."""
    if os.environ.get("PDSERVE_PDL", "1") == "0":
        return Choice("off", "PDSERVE_PDL=0")
    if device.type != "cuda":
        return Choice("off", "not a CUDA device")
    major, minor = torch.cuda.get_device_capability(device)
    return Choice("on", "sm90+") if major >= 9 else Choice("off", f"needs sm90+, this is sm{major}{minor}")


def install_fused_ops(device: torch.device) -> str:
    """Route `kernels.ops` to the Triton kernels when they can run on `device`; logs one line
    and returns the implementation name ("triton" or "torch")."""
    choice = triton_ops_usable(device)
    if choice.name == "triton":
        from kernels.triton import install

        install()
    log.info("fused ops: %s (%s); batch-1 fused GEMVs %s", choice.name, choice.why,
             "on" if choice.name == "triton" and fused_gemv_enabled() else "off")
    return choice.name


def skinny_gemm_enabled() -> bool:
    """Whether decode-batch linears may run on the skinny GEMM where start-up timing picks it
    (kernels/triton/skinny_plan.py); PDSERVE_SKINNY_GEMM=0 keeps cuBLAS everywhere."""
    return os.environ.get("PDSERVE_SKINNY_GEMM", "1") != "0"


def fold_norms(model: torch.nn.Module) -> None:
    """On CUDA: fold the layers' RMSNorm weights into qkv and gate|up (`DecoderLayer.fold_norms`)
    so the decode batches that take the rotate-and-store kernel run without norm kernels;
    PDSERVE_FOLD_NORMS=0 leaves the weights as loaded. Logs what it did."""
    if os.environ.get("PDSERVE_FOLD_NORMS", "1") == "0":
        log.info("RMSNorm folding off (PDSERVE_FOLD_NORMS=0): every layer runs its two norm kernels")
        return
    folded = model.fold_norms()  # type: ignore[operator]
    if folded:
        log.info("RMSNorm weights folded into qkv and gate|up in %d layers: batches on the rotate-and-store "
                 "kernel skip both norm kernels (PDSERVE_FOLD_NORMS=0 keeps them)", folded)
    else:
        log.info("RMSNorm weights not folded: the model has a qkv bias")


def blas_plan_enabled() -> bool:
    """Whether decode linears may run on cuBLASLt where start-up timing picks it
    (kernels/blas_plan.py); PDSERVE_BLAS_PLAN=0 keeps torch's default library everywhere."""
    return os.environ.get("PDSERVE_BLAS_PLAN", "1") != "0"


def tune_decode_blas(model: torch.nn.Module, rows: list[int]) -> None:
    """On CUDA: time cuBLAS against cuBLASLt for each decode linear at the decode batches of
    `rows` rows (one row only when the fused GEMVs are off: they serve it otherwise) and plan
    the winners; logs what was picked and how long it took."""
    from kernels import blas_plan

    if not blas_plan_enabled():
        blas_plan.set_plan({})
        log.info("BLAS plan off (PDSERVE_BLAS_PLAN=0): decode linears use torch's default library")
        return
    rows = [r for r in rows if r > 1 or not fused_gemv_enabled()]
    if not rows or blas_plan.plan_linears(model) == 0:
        return
    t0 = time.perf_counter()
    for line in blas_plan.tune(model, rows):
        log.info("%s", line)
    log.info("BLAS plan tuned in %.1f s", time.perf_counter() - t0)


def tune_decode_linears(model: torch.nn.Module, rows: list[int], folded_rows: list[int]) -> None:
    """With the Triton ops installed: time the skinny GEMM against cuBLAS for the decode
    batches of `rows` rows and plan the winners, against the folded block (no norm kernels)
    for those of `folded_rows`; logs what was picked and how long it took."""
    from kernels import ops

    if ops.fused_linear is ops.fused_linear_ref:  # the Triton ops are not installed
        return
    from kernels.triton import skinny_plan

    if not skinny_gemm_enabled():
        skinny_plan.set_plan({})
        log.info("skinny GEMM off (PDSERVE_SKINNY_GEMM=0): decode batches use cuBLAS")
        return
    t0 = time.perf_counter()
    for line in skinny_plan.tune(model.layers, rows, folded_rows):
        log.info("%s", line)
    log.info("skinny GEMM tuned in %.1f s", time.perf_counter() - t0)
