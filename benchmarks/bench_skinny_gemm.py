"""The decode-batch linears of a Llama-3.1-8B layer at M = 32 / 64 / 128 rows: cuBLAS (what the
batch-64/128 decode graphs run now: `F.linear`, then the Triton SiLU·mul kernel or a residual
add) side by side with kernels/triton/skinny_gemm.py over a sweep of its configs, each against
the weight-read time at the device-to-device copy rate measured in the same run. Every config's
output is checked against cuBLAS's (bf16 tolerance) before it is timed. L2 is flushed before
every timed call (triton.testing.do_bench).

    python benchmarks/bench_skinny_gemm.py [--rows 32,64,128] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_gpu import copy_bandwidth  # noqa: E402
from benchmarks.common import table, write_result  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 4096 + 2 * 1024
SHAPES = {  # name: (weight rows, K, silu_mul, residual)
    "qkv": (QKV, HIDDEN, False, False),
    "o + residual": (HIDDEN, HIDDEN, False, True),
    "gate|up + SiLU·mul": (2 * INTER, HIDDEN, True, False),
    "down + residual": (HIDDEN, INTER, False, True),
}


def configs(quick: bool) -> list[tuple[int, int, int, int]]:
    if quick:
        return [(32, 128, 4, 4), (64, 128, 4, 4), (16, 256, 4, 4), (32, 256, 8, 3), (64, 64, 4, 5)]
    return list(itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4, 5)))


def main() -> None:
    from triton.testing import do_bench

    from kernels.triton.silu_mul import silu_and_mul
    from kernels.triton.skinny_gemm import skinny_linear

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="32,64,128")
    ap.add_argument("--quick", action="store_true", help="5 configs instead of 54")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows_out = []
    for name, (wrows, k, silu, res) in SHAPES.items():
        w = (torch.randn(wrows, k, device=dev) / k**0.5).to(dt)
        n = wrows // 2 if silu else wrows
        roof_us = wrows * k * 2 / bw * 1e6  # as bench_gpu's roofline: weight bytes / copy rate
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=dev).to(dt)
            r = torch.randn(m, n, device=dev).to(dt) if res else None

            def cublas(x=x, w=w, r=r, silu=silu):
                y = torch.nn.functional.linear(x, w)
                if silu:
                    y = silu_and_mul(y)
                return y if r is None else y + r

            ref = cublas()
            t_cublas = do_bench(cublas, warmup=10, rep=50, return_mode="median") * 1e3
            t_gemm = do_bench(lambda x=x, w=w: torch.nn.functional.linear(x, w), warmup=10, rep=50,
                              return_mode="median") * 1e3
            best = None
            for cfg in configs(args.quick):
                try:
                    out = skinny_linear(x, w, silu_mul=silu, residual=r, config=cfg)
                except Exception as exc:  # noqa: BLE001  (a config the compiler rejects: skip it)
                    print(f"{name} M={m} {cfg}: {type(exc).__name__}")
                    continue
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                if err > 2e-2:
                    raise AssertionError(f"{name} M={m} config {cfg}: relative error {err:.3g}")
                t = do_bench(lambda cfg=cfg, x=x, w=w, r=r, silu=silu: skinny_linear(
                    x, w, silu_mul=silu, residual=r, config=cfg), warmup=10, rep=50, return_mode="median") * 1e3
                if best is None or t < best[0]:
                    best = (t, cfg)
            rows_out.append([
                name, m, f"{roof_us:.1f}", f"{t_gemm:.1f}", f"{t_cublas:.1f}",
                f"{best[0]:.1f}" if best else "-", str(best[1]) if best else "-",
                f"{t_cublas / best[0]:.2f}x" if best else "-",
                f"{best[0] / roof_us:.2f}x" if best else "-",
            ])
            print(rows_out[-1], flush=True)
    body = (f"D2D copy {bw / 1e12:.2f} TB/s (read+write) measured in this run; weight-read time = "
            "weight bytes / that rate (bench_gpu's roofline).\n\n" + table(
                ["linear", "M", "weight read us", "cuBLAS GEMM us", "cuBLAS + epilogue us",
                 "skinny us (best)", "best (BLOCK_N, BLOCK_K, warps, stages)", "skinny vs cuBLAS+epi",
                 "skinny vs weight read"], rows_out))
    print(body)
    print(f"wrote {write_result('skinny-gemm', body, 'python benchmarks/bench_skinny_gemm.py ' + ' '.join(sys.argv[1:]))}")


if __name__ == "__main__":
    main()
