"""Batch-1 decode linears of a Llama-3.1-8B shape, as the model runs them, side by side:

- unfused: what the model runs at batch > 1 (cuBLAS `F.linear` plus the Triton norm / SiLU·mul
  kernels the fused kernel takes in): qkv = add+RMSNorm then linear, o = linear, gate_up =
  add+RMSNorm, linear, SiLU·mul, down = linear (the residual adds after o and down are the
  next norms' adds);
- fused: the one-row Triton GEMV of kernels/triton/gemv.py with that work inside
  (norm prologue for qkv and gate_up, SiLU·mul epilogue for gate_up, residual epilogue for o
  and down), best of a sweep of BLOCK_N / BLOCK_K / warps per shape;
- plain: the same GEMV with no prologue or epilogue against plain cuBLAS, to see the GEMV
  itself; and fused with programmatic dependent launch (default on sm90+: each call may start while the
  last one finishes).

Each time is a CUDA graph of 32 back-to-back calls over 32 distinct weights (as the decode
graph streams them from HBM, not from L2) / 32, against the weight bytes at the D2D copy rate
measured in the same run.

    python benchmarks/bench_gemv.py [--quick]
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

# layer: (N, K, fusion)
LAYERS = {"qkv": (6144, 4096, "norm"), "o": (4096, 4096, "residual"),
          "gate_up": (28672, 4096, "norm+silu"), "down": (4096, 14336, "residual")}  # fmt: skip
# Outside the layers (--lm-head): the final norm + lm_head (1.05 GB; 4 copies cycled, not 32).
LM_HEAD = {"lm_head": (128256, 4096, "norm")}
CALLS = 32


def graph_us(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    return do_bench(g.replay, warmup=5, rep=60, return_mode="median") * 1e3 / CALLS


@torch.inference_mode()
def main() -> int:
    import kernels.triton.gemv as gemv_mod
    from kernels import ops
    from kernels.triton.gemv import gemv
    from kernels.triton.rms_norm import add_rms_norm
    from kernels.triton.silu_mul import silu_and_mul

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sweep only the shapes that won the full sweep")
    ap.add_argument("--lm-head", action="store_true", help="also the final norm + lm_head (vocab 128256)")
    args = ap.parse_args()
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    bns, bks, warps = ((2, 4, 8), (1024, 2048), (4,)) if args.quick else ((2, 4, 8, 16), (512, 1024, 2048), (4, 8))
    # at most 8192 float32 accumulators a program (64 a thread at 4 warps): more spills
    configs = [c for c in itertools.product(bns, bks, warps) if c[0] * c[1] <= 8192]
    dt = torch.bfloat16
    rows, best_configs = [], {}
    shapes = {**LAYERS, **(LM_HEAD if args.lm_head else {})}
    for name, (n, k, fusion) in shapes.items():
        copies = CALLS if n * k * 2 * CALLS < 2**32 else 4  # distinct weights (all far above L2)
        ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(copies)]
        floor = n * k * 2 / bw * 1e6
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(1, k, device="cuda", dtype=dt, generator=gen)
        res_in = torch.randn(1, k, device="cuda", dtype=dt, generator=gen)  # the pending residual (norm cases)
        nw = torch.randn(k, device="cuda", dtype=dt, generator=gen) * 0.1 + 1
        res_out = torch.randn(1, n, device="cuda", dtype=dt, generator=gen)
        kw = {}
        if fusion.startswith("norm"):
            kw = dict(norm_weight=nw, eps=1e-5, silu_mul=fusion == "norm+silu")
        elif fusion == "residual":
            kw = dict(residual=res_out)

        def unfused(w, x=x, fusion=fusion, res_in=res_in, nw=nw):
            if fusion.startswith("norm"):
                h, _ = add_rms_norm(x, res_in, nw, 1e-5)
                y = torch.nn.functional.linear(h, w)
                return silu_and_mul(y) if fusion == "norm+silu" else y
            return torch.nn.functional.linear(x, w)

        it = itertools.cycle(ws)
        t_unfused = graph_us(lambda: unfused(next(it)))  # noqa: B023
        it = itertools.cycle(ws)
        t_cublas = graph_us(lambda: torch.nn.functional.linear(x, next(it)))  # noqa: B023
        xin = x  # for the norm cases: the summed residual stream
        ref = ops.fused_linear_ref(xin.double(), ws[0].double(), **{a: v.double() if torch.is_tensor(v) else v for a, v in kw.items()})
        best = None
        for cfg in configs:
            try:
                err = ((gemv(xin, ws[0], config=cfg, **kw).double() - ref).norm() / ref.norm()).item()
                it = itertools.cycle(ws)
                us = graph_us(lambda: gemv(xin, next(it), config=cfg, **kw))  # noqa: B023
            except Exception as e:  # a config Triton cannot build (registers, shared memory)
                print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            print(f"  {name} {cfg}: {us:.1f} us ({100 * floor / us:.0f}% of copy rate)", flush=True)
            if best is None or us < best[0]:
                best = (us, cfg, err)
        assert best is not None
        gemv_mod.USE_PDL = torch.cuda.get_device_capability()[0] >= 9
        it = itertools.cycle(ws)
        t_pdl = graph_us(lambda: gemv(xin, next(it), config=best[1], **kw))  # noqa: B023
        gemv_mod.USE_PDL = None
        it = itertools.cycle(ws)
        plain_cfg = best[1] if fusion != "norm+silu" else (2 * best[1][0], *best[1][1:])
        t_plain = graph_us(lambda: gemv(x, next(it), config=plain_cfg))  # noqa: B023
        best_configs[(n, k, fusion)] = best[1]
        rows.append([
            name, f"{n}x{k}", fusion,
            f"{t_unfused:.1f}", f"{best[0]:.1f}", f"{t_pdl:.1f}", f"{t_unfused / best[0]:.2f}x",
            f"{t_cublas:.1f} ({100 * floor / t_cublas:.0f}%)", f"{t_plain:.1f} ({100 * floor / t_plain:.0f}%)",
            "/".join(map(str, best[1])), f"{best[2]:.1e}",
        ])  # fmt: skip
        del ws
        torch.cuda.empty_cache()
    header = ["layer", "N x K", "fused in", "unfused us", "fused us", "fused us, PDL", "fused speed-up",
              "cuBLAS plain us (of copy rate)", "Triton plain us (of copy rate)",
              "BN/BK/warps", "rel err"]  # fmt: skip
    out = table(header, rows)
    layer_rows = [r for r in rows if r[0] in LAYERS]
    total_u = sum(float(r[3]) for r in layer_rows)
    total_f = sum(float(r[4]) for r in layer_rows)
    total_pdl = sum(float(r[5]) for r in layer_rows)
    out += (f"\n\nPer layer: unfused {total_u:.1f} us, fused {total_f:.1f} us ({total_u / total_f:.2f}x); "
            f"x32 layers: {32 * (total_u - total_f) / 1e3:.2f} ms saved per token. With PDL "
            f"(programmatic dependent launch between the 32 calls) fused is {total_pdl:.1f} us.\n"
            f"Best configs: {best_configs}\n")  # fmt: skip
    head = f"D2D copy {bw / 1e12:.2f} TB/s (read+write) measured in this run; bf16, one row.\n"
    print(head + out)
    cmd = "python benchmarks/bench_gemv.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_result('gemv', head + chr(10) + out, cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
