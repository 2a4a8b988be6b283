"""The decode-batch linears of a Llama-3.1-8B layer at 64 / 128 rows: cuBLAS (what the batch-128
decode graph runs now: `F.linear`, then the SiLU·mul kernel or a residual add) side by side with
kernels/triton/streamk_gemm.py (TMA-fed, stream-K split over a fixed number of programs) over a
sweep of its configs, each against the weight-read time at the copy rate measured in the same
run. Timing as bench_skinny_gemm.py: a replayed CUDA graph of the call over LAYERS distinct
weight copies, per call; every config's output checked against cuBLAS's before it is timed.

    python benchmarks/bench_streamk_gemm.py [--rows 64,128] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_gpu import copy_bandwidth  # noqa: E402
from benchmarks.bench_skinny_gemm import HIDDEN, LAYER_BYTES, LAYERS, SHAPES, _cublas, graph_time_us  # noqa: E402
from benchmarks.common import table, write_result  # noqa: E402

SMEM_BYTES = 227 * 1024  # Hopper: the most dynamic shared memory one block may take


def configs(silu: bool, m: int, quick: bool) -> list:
    """(BLOCK_N, BLOCK_K, warps, stages, programs a SM) candidates within shared memory."""
    from kernels.triton.streamk_gemm import StreamKConfig

    block_m = max(16, 1 << (m - 1).bit_length())
    out = []
    for bn, bk, stages, per_sm in itertools.product((64, 128, 256), (64, 128), (3, 4, 5, 6), (1, 2)):
        w_rows = bn * (2 if silu else 1)
        if w_rows > 256:
            continue
        if stages * (w_rows + block_m) * bk * 2 > SMEM_BYTES // per_sm - 8 * 1024:
            continue
        acc_regs = w_rows * block_m // 128  # float32 accumulator registers a thread at 4 warps
        for warps in (4, 8):
            if acc_regs // (warps // 4) > 128 or (per_sm == 2 and warps == 8 and acc_regs < 64):
                continue
            out.append(StreamKConfig(bn, bk, warps, stages, per_sm))
    if quick:
        out = out[::2]
    return out


def sweep(rows: list[int], quick: bool, bw: float) -> tuple[list[list], dict]:
    from kernels.triton.streamk_gemm import streamk_linear

    dev, dt = torch.device("cuda"), torch.bfloat16
    table_rows, best_cfg = [], {}
    for name, (wrows, k, silu, res) in SHAPES.items():
        ws = [(torch.randn(wrows, k, device=dev) / k**0.5).to(dt) for _ in range(LAYERS)]
        n = wrows // 2 if silu else wrows
        roof_us = wrows * k * 2 / bw * 1e6
        for m in rows:
            x = torch.randn(m, k, device=dev).to(dt)
            r = torch.randn(m, n, device=dev).to(dt) if res else None
            ref = _cublas(x, ws[0], r, silu).float()
            t_cublas = graph_time_us(lambda i, x=x, ws=ws, r=r, silu=silu: _cublas(x, ws[i], r, silu))
            best, tried = None, 0
            for cfg in configs(silu, m, quick):
                try:
                    out = streamk_linear(x, ws[0], silu_mul=silu, residual=r, config=cfg)
                    out = streamk_linear(x, ws[0], silu_mul=silu, residual=r, config=cfg)  # counters reset
                except Exception as exc:  # noqa: BLE001  (a config the compiler rejects: skip it)
                    print(f"{name} M={m} {tuple(cfg)}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    raise AssertionError(f"{name} M={m} config {cfg}: relative error {err:.3g}")
                t = graph_time_us(lambda i, cfg=cfg, x=x, ws=ws, r=r, silu=silu: streamk_linear(
                    x, ws[i], silu_mul=silu, residual=r, config=cfg))
                tried += 1
                print(f"  {name} M={m} {tuple(cfg)} {t:.1f} us (cuBLAS {t_cublas:.1f})", flush=True)
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best:
                best_cfg[(name, m)] = best[1]
            table_rows.append([
                name, m, f"{roof_us:.1f}", f"{t_cublas:.1f}", f"{t_cublas / roof_us:.2f}x", tried,
                f"{best[0]:.1f}" if best else "-", str(tuple(best[1])) if best else "-",
                f"{t_cublas / best[0]:.3f}x" if best else "-", f"{best[0] / roof_us:.2f}x" if best else "-",
            ])  # fmt: skip
            print(table_rows[-1], flush=True)
        del ws
    return table_rows, best_cfg


def layer_rows(best_cfg: dict, rows: list[int], bw: float) -> list[list]:
    """Per M: a layer's four linears back to back, cuBLAS path vs stream-K with the best configs."""
    from kernels.triton.streamk_gemm import streamk_linear

    dev, dt = torch.device("cuda"), torch.bfloat16
    ws = [{name: (torch.randn(wrows, k, device=dev) / k**0.5).to(dt) for name, (wrows, k, _, _) in SHAPES.items()}
          for _ in range(LAYERS)]  # fmt: skip
    out = []
    for m in rows:
        if any((name, m) not in best_cfg for name in SHAPES):
            continue
        cfg = {name: best_cfg[(name, m)] for name in SHAPES}
        h, a, res = (torch.randn(m, HIDDEN, device=dev).to(dt) for _ in range(3))

        def cublas_layer(i, h=h, a=a, res=res):
            w = ws[i]
            _cublas(h, w["qkv"], None, False)
            s2 = _cublas(a, w["o + residual"], res, False)
            act = _cublas(h, w["gate|up + SiLU·mul"], None, True)
            _cublas(act, w["down + residual"], s2, False)

        def streamk_layer(i, h=h, a=a, res=res, cfg=cfg):
            w = ws[i]
            streamk_linear(h, w["qkv"], config=cfg["qkv"])
            s2 = streamk_linear(a, w["o + residual"], residual=res, config=cfg["o + residual"])
            act = streamk_linear(h, w["gate|up + SiLU·mul"], silu_mul=True, config=cfg["gate|up + SiLU·mul"])
            streamk_linear(act, w["down + residual"], residual=s2, config=cfg["down + residual"])

        t0, t1 = graph_time_us(cublas_layer), graph_time_us(streamk_layer)
        roof = LAYER_BYTES / bw * 1e6
        out.append([m, f"{roof:.1f}", f"{t0:.1f}", f"{t0 / roof:.2f}x", f"{t1:.1f}", f"{t1 / roof:.2f}x",
                    f"{t0 / t1:.3f}x"])  # fmt: skip
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64,128")
    ap.add_argument("--quick", action="store_true", help="every other candidate config")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    bw = copy_bandwidth()
    sweep_rows, best_cfg = sweep(rows, args.quick, bw)
    layers = layer_rows(best_cfg, rows, bw)
    body = (
        f"D2D copy {bw / 1e12:.2f} TB/s (read+write) measured in this run; weight-read time = weight "
        "bytes / that rate (bench_gpu's roofline). Times: a CUDA graph of the call over "
        f"{LAYERS} distinct weight copies, per call.\n\n"
        + table(["linear", "M", "weight read us", "cuBLAS + epilogue us", "cuBLAS vs weight read",
                 "configs", "stream-K us (best)", "best (BLOCK_N, BLOCK_K, warps, stages, per SM)",
                 "cuBLAS / stream-K", "stream-K vs weight read"], sweep_rows)
        + f"\n\nA layer's four linears back to back ({LAYERS} layers' distinct weights, "
        f"{LAYERS * LAYER_BYTES / 1e9:.1f} GB, in one graph), per layer: cuBLAS + the SiLU·mul kernel "
        "+ residual adds vs the stream-K kernel with each shape's best config above.\n\n"
        + table(["M", "weight read us", "cuBLAS path us", "vs weight read", "stream-K us", "vs weight read",
                 "cuBLAS / stream-K"], layers)
    )  # fmt: skip
    print(body)
    cmd = "python benchmarks/bench_streamk_gemm.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_result('streamk-gemm', body, cmd)}")


if __name__ == "__main__":
    main()
