"""`pdserve env`: what this host can run. Versions of torch / CUDA / driver / triton /
flashinfer / nixl, each CUDA device's name, capability and memory, and the attention backend
and fused-op implementation the engine would choose there (with the reason)."""

from __future__ import annotations

import argparse
import platform
import subprocess

import torch

from kernels.capabilities import (
    TRITON_DECODE_TILES,
    blas_plan_enabled,
    choose_attention_backend,
    fused_gemv_enabled,
    module_version,
    pdl_choice,
    skinny_gemm_enabled,
    split_kv_decode_max_batch,
    triton_decode_batches,
    triton_decode_tuned,
    triton_ops_usable,
)


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def report() -> list[tuple[str, str]]:
    """(key, value) lines of the report."""
    cuda = torch.cuda.is_available()
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
        ("CUDA available", str(cuda)),
        ("driver", (_driver_version() or "n/a") if cuda else "n/a"),
    ]
    for name in ("triton", "flashinfer", "nixl"):
        # triton/flashinfer are GPU-only: probed only where CUDA is (nixl also moves host memory).
        probe = cuda or name == "nixl"
        rows.append((name, (module_version(name) or "not importable") if probe else "not probed (no CUDA)"))
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if cuda else []
    for dev in devices or [torch.device("cpu")]:
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            cap = torch.cuda.get_device_capability(dev)
            rows.append((str(dev), f"{props.name}, sm{cap[0]}{cap[1]}, {props.total_memory / 2**30:.1f} GiB, "
                                   f"{props.multi_processor_count} SMs"))
        attn = choose_attention_backend("auto", dev)
        ops = triton_ops_usable(dev)
        rows.append((f"{dev} attention", f"{attn.name} ({attn.why})"))
        rows.append((f"{dev} fused ops", f"{ops.name} ({ops.why})"))
        if attn.name in ("flashinfer", "triton"):
            n = split_kv_decode_max_batch()
            rows.append((f"{dev} small decode batches", f"fused Triton split-KV kernel up to batch {n}" if n > 0
                         else "backend kernels (PDSERVE_SPLIT_KV_DECODE_MAX_BATCH=0)"))
        if attn.name == "flashinfer":
            lo, hi, tile = triton_decode_batches()
            if hi < max(lo, 1):
                what = "FlashInfer (PDSERVE_TRITON_DECODE_BATCHES)"
            elif triton_decode_tuned():
                what = (f"FlashInfer or the Triton paged kernel (tiles {', '.join(map(str, TRITON_DECODE_TILES))}) "
                        f"for batches {lo}-{hi}, timed per batch size at engine start; FlashInfer otherwise")
            else:
                what = f"Triton paged kernel, tile {tile}, for batches {lo}-{hi}; FlashInfer otherwise"
            rows.append((f"{dev} decode attention", what))
        if ops.name == "triton":
            rows.append((f"{dev} batch-1 GEMV", "fused Triton GEMVs" if fused_gemv_enabled()
                         else "cuBLAS + norm/SiLU kernels (PDSERVE_FUSED_GEMV=0)"))
            rows.append((f"{dev} decode-batch linears", decode_linears_line(blas_plan_enabled(), skinny_gemm_enabled())))
            pdl = pdl_choice(dev)
            rows.append((f"{dev} programmatic dependent launch", f"{pdl.name} ({pdl.why})"))
    return rows


def decode_linears_line(blas_plan: bool, skinny: bool) -> str:
    """What may run a decode batch's linears, as `pdserve env` says it."""
    kinds = ["cuBLAS or cuBLASLt" if blas_plan else "torch's default BLAS library"]
    if skinny:
        kinds.append("the skinny GEMM")
    off = [flag for flag, on in (("PDSERVE_BLAS_PLAN=0", blas_plan), ("PDSERVE_SKINNY_GEMM=0", skinny)) if not on]
    line = " or ".join(kinds)
    if blas_plan or skinny:
        line += ", timed per batch size at engine start"
    return line + (f" ({', '.join(off)})" if off else "")


def cmd_env(args: argparse.Namespace) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0
