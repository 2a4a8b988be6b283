"""Decode-batch linears of a Llama-3.1-8B shape on each BLAS choice the engine could make:
torch's cuBLAS path (its default), torch's cuBLASLt path (what kernels/blas_plan.py may pick),
and every algorithm cuBLASLt's heuristic offers for the shape, run by FlashInfer's
mm_bf16_cublaslt module (the search torch does not do: it takes the heuristic's first).
Side by side in one run, against the weight read at the measured copy rate. Each time is a
CUDA graph over 8 distinct weight copies (2 for lm_head), per call.

    python benchmarks/bench_decode_gemm_libs.py [--rows 64,128]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_gpu import copy_bandwidth  # noqa: E402
from benchmarks.common import graph_replay_us, table, write_result  # noqa: E402

SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate|up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096))  # fmt: skip
MAX_ALGOS, ALGO_BYTES = 100, 64  # FlashInfer's buffer for cuBLASLt's heuristic results


def time_shape(lt, workspace: torch.Tensor, rows: int, n: int, k: int) -> tuple[dict[str, float], list[tuple[float, int, float]]]:
    """(torch library -> us, [(us, algorithm index, max rel error vs float32)] per cuBLASLt algorithm)."""
    from kernels import blas_plan

    handle = torch.cuda.current_blas_handle()
    copies = 2 if n > 100_000 else 8
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    outs = [torch.empty(rows, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    pairs = list(zip(ws, outs, strict=True))
    lib_us = {}
    for lib in blas_plan.LIBRARIES:
        with blas_plan.library(lib):
            lib_us[lib] = graph_replay_us(lambda: [torch.matmul(x, w.t(), out=o) for w, o in pairs], copies, rep_ms=100)
    algos = torch.empty(MAX_ALGOS * ALGO_BYTES, dtype=torch.uint8)
    count = lt.mm_bf16_cublaslt_get_algos(x, ws[0], outs[0], workspace, handle, algos)
    ref = x.float() @ ws[0].float().t()
    timed = []
    for t in range(count):
        lt.mm_bf16_cublaslt_run_with_algo(x, ws[0], outs[0], workspace, handle, algos, t)
        err = ((outs[0].float() - ref).abs().max() / ref.abs().max()).item()
        run = lambda t=t: [lt.mm_bf16_cublaslt_run_with_algo(x, w, o, workspace, handle, algos, t) for w, o in pairs]  # noqa: E731
        timed.append((graph_replay_us(run, copies, rep_ms=100), t, err))
    return lib_us, timed


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="64,128")
    args = ap.parse_args()
    from flashinfer.jit.gemm.core import gen_mm_bf16_cublaslt_module

    lt = gen_mm_bf16_cublaslt_module().build_and_load()
    workspace = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    rows_out = []
    for rows in map(int, args.rows.split(",")):
        for name, n, k in SHAPES:
            ideal = n * k * 2 / bw * 1e6
            lib_us, timed = time_shape(lt, workspace, rows, n, k)
            torch.cuda.empty_cache()
            best_us, best_t, best_err = min(timed)
            rows_out.append([
                rows, name, f"{ideal:.1f}", f"{lib_us['cublas']:.1f} ({lib_us['cublas'] / ideal:.2f}x)",
                f"{lib_us['cublaslt']:.1f} ({lib_us['cublaslt'] / ideal:.2f}x)", len(timed),
                f"{best_us:.1f} ({best_us / ideal:.2f}x), #{best_t}, rel err {best_err:.1e}",
                f"{min(lib_us.values()) / best_us:.3f}x",
            ])  # fmt: skip
            print(rows_out[-1], flush=True)
    head = f"D2D copy {bw / 1e12:.2f} TB/s (read+write) measured in this run; weight read = weight bytes / that rate.\n"
    out = table(["rows", "linear", "weight read us", "torch cuBLAS us", "torch cuBLASLt us", "cuBLASLt algos",
                 "best cuBLASLt algo us", "best of torch's two / best algo"], rows_out)  # fmt: skip
    print(head + out)
    cmd = "python benchmarks/bench_decode_gemm_libs.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_result('decode-gemm-libs', head + chr(10) + out, cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
