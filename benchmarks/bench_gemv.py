"""Small-M linear layers of a Llama-3.1-8B shape (qkv, o, gate_up, down, lm_head) at M = 1 and 4:
cuBLAS (torch.nn.functional.linear, what the model runs today) side by side with the Triton
GEMV of kernels/triton/gemv.py over a sweep of its block sizes, warps and stages; each time
as a CUDA graph of 32 back-to-back calls (as the decode graph runs them: weights no longer in
L2) / 32, against the weight bytes at the D2D copy rate measured in the same run.

    python benchmarks/bench_gemv.py [--ms 1,2,4]
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

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # fmt: skip
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
    from kernels.triton.gemv import gemv

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,4")
    ap.add_argument("--write-configs", default=None,
                    help="JSON file of the best config per weight shape at the first M")
    args = ap.parse_args()
    best_configs: dict[str, list[int]] = {}
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    configs = list(itertools.product((4, 8, 16), (256, 512), (4, 8), (3, 4)))
    rows = []
    for name, (n, k) in SHAPES.items():
        # CALLS distinct weights (lm_head: 4), so each call streams its weight from HBM.
        count = 4 if name == "lm_head" else CALLS
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
        floor = n * k * 2 / bw * 1e6
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            it = itertools.cycle(ws)
            ref = torch.nn.functional.linear(x, ws[0])
            cublas = graph_us(lambda: torch.nn.functional.linear(x, next(it)))  # noqa: B023
            best = None
            for bn, bk, nw, ns in configs:
                try:
                    err = (gemv(x, ws[0], bn, bk, nw, ns).float() - ref.float()).abs().max().item()
                    it = itertools.cycle(ws)
                    us = graph_us(lambda: gemv(x, next(it), bn, bk, nw, ns))  # noqa: B023
                except Exception as e:  # a config Triton cannot build (registers, shared memory)
                    print(f"  {name} m={m} {bn}/{bk}/{nw}/{ns}: {type(e).__name__}", flush=True)
                    continue
                if best is None or us < best[0]:
                    best = (us, (bn, bk, nw, ns), err)
            assert best is not None
            best_configs.setdefault(f"{n}x{k}", list(best[1]))
            rows.append([
                name, m, f"{n}x{k}", f"{cublas:.1f}", f"{100 * floor / cublas:.0f}%",
                f"{best[0]:.1f}", f"{100 * floor / best[0]:.0f}%", "/".join(map(str, best[1])),
                f"{best[2]:.2g}", f"{cublas / best[0]:.2f}x",
            ])  # fmt: skip
            print(table(["layer", "M", "N x K", "cuBLAS us", "of copy rate", "Triton us",
                         "of copy rate", "BN/BK/warps/stages", "max |diff|", "Triton speed-up"],
                        rows[-1:]), flush=True)  # fmt: skip
        del ws
        torch.cuda.empty_cache()
    out = table(["layer", "M", "N x K", "cuBLAS us", "of copy rate", "Triton us", "of copy rate",
                 "BN/BK/warps/stages", "max |diff|", "Triton speed-up"], rows)  # fmt: skip
    head = f"D2D copy {bw / 1e12:.2f} TB/s (read+write) measured in this run; bf16 weights.\n"
    print(head + out)
    cmd = "python benchmarks/bench_gemv.py " + " ".join(sys.argv[1:])
    print(f"wrote {write_result('gemv', head + chr(10) + out, cmd)}")
    if args.write_configs:
        import json

        with open(args.write_configs, "w") as f:
            json.dump(best_configs, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
