"""The decode-batch linears of a Llama-3.1-8B layer at M = 32 / 64 / 128 rows: cuBLAS (what the
batch-64/128 decode graphs run now: `F.linear`, then the Triton SiLU·mul kernel or a residual
add) side by side with kernels/triton/skinny_gemm.py over a sweep of its configs, each against
the weight-read time at the device-to-device copy rate measured in the same run.

Every time here is a replayed CUDA graph of the call over LAYERS distinct copies of the weight
(no L2 reuse of weights, no launch gaps: as in the decode graphs), divided by LAYERS. Every
config's output is checked against cuBLAS's (bf16 tolerance) before it is timed. The last table
runs a layer's four linears back to back, both ways, with each shape's best config.

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
LAYERS = 8
LAYER_BYTES = sum(wrows * k * 2 for wrows, k, _, _ in SHAPES.values())
SMEM_BYTES = 220 * 1024  # Hopper: 227 KB a block; leave room for the epilogue's scratch


def configs(wrows: int, k: int, silu: bool, m: int, quick: bool) -> list:
    """(BLOCK_N, BLOCK_K, warps, stages, split_k, swap) candidates for one shape: the plain
    first guess, then swapped tiles of 64-256 weight rows with the split counts that put
    ~100-400 programs on the device, within shared memory."""
    from kernels.triton.skinny_gemm import DEFAULT_CONFIG, SkinnyConfig

    n = wrows // 2 if silu else wrows
    block_m = max(16, 1 << (m - 1).bit_length())
    out = [DEFAULT_CONFIG]
    for bn, bk, stages, split in itertools.product((64, 128, 256), (64, 128), (3, 4), (1, 2, 4, 8, 16)):
        w_rows = bn * (2 if silu else 1)
        if w_rows > 256 or not 96 <= -(-n // bn) * split <= 400 or k // split < 2 * bk:
            continue
        if stages * (w_rows + block_m) * bk * 2 > SMEM_BYTES:
            continue
        for warps in (4, 8) if w_rows >= 128 else (4,):
            out.append(SkinnyConfig(bn, bk, warps, stages, split, True))
    if quick:  # every other candidate
        out = out[:1] + out[1::2]
    return out


def graph_time_us(fn, copies: int = LAYERS) -> float:
    """Median time of one call of fn(i) for copies i = 0..copies-1 captured in one CUDA graph."""
    from triton.testing import do_bench

    for i in range(copies):  # compile / pick cuBLAS heuristics outside the capture
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    us = do_bench(g.replay, warmup=5, rep=40, return_mode="median") * 1e3 / copies
    del g
    return us


def _cublas(x, w, r, silu):
    from kernels.triton.silu_mul import silu_and_mul

    y = torch.nn.functional.linear(x, w)
    if silu:
        y = silu_and_mul(y)
    return y if r is None else y + r


def sweep(rows: list[int], quick: bool, bw: float) -> tuple[list[list], dict]:
    from kernels.triton.skinny_gemm import skinny_linear

    dev, dt = torch.device("cuda"), torch.bfloat16
    table_rows, best_cfg = [], {}
    for name, (wrows, k, silu, res) in SHAPES.items():
        ws = [(torch.randn(wrows, k, device=dev) / k**0.5).to(dt) for _ in range(LAYERS)]
        n = wrows // 2 if silu else wrows
        roof_us = wrows * k * 2 / bw * 1e6  # as bench_gpu's roofline: weight bytes / copy rate
        for m in rows:
            x = torch.randn(m, k, device=dev).to(dt)
            r = torch.randn(m, n, device=dev).to(dt) if res else None
            ref = _cublas(x, ws[0], r, silu).float()
            t_cublas = graph_time_us(lambda i, x=x, ws=ws, r=r, silu=silu: _cublas(x, ws[i], r, silu))
            best, tried = None, 0
            for cfg in configs(wrows, k, silu, m, quick):
                try:
                    out = skinny_linear(x, ws[0], silu_mul=silu, residual=r, config=cfg)
                except Exception as exc:  # noqa: BLE001  (a config the compiler rejects: skip it)
                    print(f"{name} M={m} {tuple(cfg)}: {type(exc).__name__}")
                    continue
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    raise AssertionError(f"{name} M={m} config {cfg}: relative error {err:.3g}")
                t = graph_time_us(lambda i, cfg=cfg, x=x, ws=ws, r=r, silu=silu: skinny_linear(
                    x, ws[i], silu_mul=silu, residual=r, config=cfg))
                tried += 1
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
    """Per M: a layer's four linears back to back, cuBLAS path vs skinny with the best configs."""
    from kernels.triton.skinny_gemm import skinny_linear

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

        def skinny_layer(i, h=h, a=a, res=res, cfg=cfg):
            w = ws[i]
            skinny_linear(h, w["qkv"], config=cfg["qkv"])
            s2 = skinny_linear(a, w["o + residual"], residual=res, config=cfg["o + residual"])
            act = skinny_linear(h, w["gate|up + SiLU·mul"], silu_mul=True, config=cfg["gate|up + SiLU·mul"])
            skinny_linear(act, w["down + residual"], residual=s2, config=cfg["down + residual"])

        t0, t1 = graph_time_us(cublas_layer), graph_time_us(skinny_layer)
        roof = LAYER_BYTES / bw * 1e6
        out.append([m, f"{roof:.1f}", f"{t0:.1f}", f"{t0 / roof:.2f}x", f"{t1:.1f}", f"{t1 / roof:.2f}x",
                    f"{t0 / t1:.3f}x"])  # fmt: skip
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="32,64,128")
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
                 "configs", "skinny us (best)", "best (BLOCK_N, BLOCK_K, warps, stages, split_k, swap)",
                 "cuBLAS / skinny", "skinny vs weight read"], sweep_rows)
        + f"\n\nA layer's four linears back to back ({LAYERS} layers' distinct weights, "
        f"{LAYERS * LAYER_BYTES / 1e9:.1f} GB, in one graph), per layer: cuBLAS + the SiLU·mul kernel "
        "+ residual adds vs the skinny kernel with each shape's best config above.\n\n"
        + table(["M", "weight read us", "cuBLAS path us", "vs weight read", "skinny us", "vs weight read",
                 "cuBLAS / skinny"], layers)
    )  # fmt: skip
    print(body)
    cmd = "python benchmarks/bench_skinny_gemm.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_result('skinny-gemm', body, cmd)}")


if __name__ == "__main__":
    main()
