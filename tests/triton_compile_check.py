"""Compile every Triton kernel the engine launches, for a CUDA target, on a host without a GPU
(run by tests/test_triton_compile.py in a subprocess: `python -m tests.triton_compile_check 90`).

Why: the CPU interpreter (the *_interpreter tests) runs a kernel's Python, not Triton's
compiler, so it misses what only the compiler rejects. 31fca22 passed the interpreter tests and
then failed to compile on the H100 (a name given another block shape inside a constexpr `if`),
costing a GPU call. Triton's wheel carries its own ptxas, so the whole pipeline (TTIR, TTGIR,
LLVM IR, PTX, cubin) runs here.

How: each case calls the kernel's real launch wrapper (kernels/triton/*.py) with CPU tensors of
the engine's shapes and dtypes. Triton binds and specialises the arguments as for a launch;
`knobs.runtime.jit_cache_hook` then compiles the kernel for the target with the launch's
options and returns True, which tells Triton to skip its own compile and the launch. The only
stand-in is `CompileOnly`, the three answers JITFunction.run asks of a GPU driver before that
hook (device 0, stream 0, the target); nothing is launched and no output is checked: the GPU
tests (tests/test_gpu_kernels.py) check the results. Wrappers launch with PDL only on CUDA
tensors, so for sm90 a kernel with a `PDL` constexpr that came in off is compiled a second time
with it on (the `gdc_wait` / `gdc_launch_dependents` path the GPU runs by default on sm90+).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

if os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("run without TRITON_INTERPRET: the interpreter never calls the compiler")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# (Hq, Hkv, D): the 8B model, SmolLM2-135M
SHAPES = [(32, 8, 128), (9, 3, 64)]


class CompileOnly:
    """What JITFunction.run asks of the active driver before `jit_cache_hook` (see above)."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def _zeros(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


def _cache(hkv: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return _zeros(6, 3, 2, 16, hkv, d, dtype=dtype)[:, 1]  # one layer's strided view, as the engine


def fused_decode() -> None:
    from kernels.triton.decode_attention import SplitKVWorkspace, fused_decode_attention

    s = 4
    for (hq, hkv, d), dtype in [(SHAPES[0], BF16), (SHAPES[1], BF16), (SHAPES[1], F16), (SHAPES[1], F32)]:
        q, k, v = _zeros(s, hq, d, dtype=dtype), _zeros(s, hkv, d, dtype=dtype), _zeros(s, hkv, d, dtype=dtype)
        ws = SplitKVWorkspace(8, hq, hkv, d, "cpu", max_splits=64)
        for splits, cfg in [(1, None), (2, None), (64, None), (4, (32, 4, 2)), (4, (128, 8, 2)), (1, (16, 2, 3))]:
            fused_decode_attention(
                q, k, v, _zeros(s, dtype=torch.int64), _zeros(64, d, dtype=F32), _zeros(64, d, dtype=F32),
                _cache(hkv, d, dtype), _zeros(s, dtype=torch.int64), _zeros(s, 4, dtype=torch.int32),
                torch.ones(s, dtype=torch.int32), d**-0.5, ws, num_splits=splits, config=cfg,
            )  # fmt: skip


def paged_attention() -> None:
    from kernels.capabilities import TRITON_DECODE_TILES
    from kernels.triton.paged_attention import paged_attention as attend

    for hq, hkv, d in SHAPES:
        for dtype in (BF16, F32):
            cache = _cache(hkv, d, dtype)
            for t, max_q, tiles in ((4, 1, [None, *TRITON_DECODE_TILES]), (12, 9, [None])):  # decode, prefill
                for tile in tiles:
                    attend(_zeros(t, hq, d, dtype=dtype), cache, _zeros(2, 4, dtype=torch.int32),
                           torch.ones(2, dtype=torch.int32), torch.tensor([0, t // 2, t], dtype=torch.int32),
                           max_q, d**-0.5, config=tile)  # fmt: skip


def rope_store() -> None:
    from kernels.triton.rope_store import rope_and_store, store_kv

    for hq, hkv, d in SHAPES:
        for dtype in (BF16, F32):
            q, k, v = _zeros(3, hq, d, dtype=dtype), _zeros(3, hkv, d, dtype=dtype), _zeros(3, hkv, d, dtype=dtype)
            cache, slots = _cache(hkv, d, dtype), _zeros(3, dtype=torch.int64)
            for norm_of in (None, _zeros(3, hq * d, dtype=dtype)):  # the folded-norm factor variant
                rope_and_store(q, k, v, _zeros(3, dtype=torch.int64), _zeros(64, d, dtype=F32),
                               _zeros(64, d, dtype=F32), cache, slots, norm_of=norm_of, eps=1e-5)  # fmt: skip
            store_kv(k, v, cache, slots)


def norms_and_activations() -> None:
    from kernels.triton.rms_norm import add_rms_norm, rms_norm
    from kernels.triton.silu_mul import silu_and_mul

    for hidden, inter in ((4096, 14336), (576, 1536)):
        for dtype in (BF16, F32):
            x = _zeros(3, hidden, dtype=dtype)
            rms_norm(x, _zeros(hidden, dtype=dtype), 1e-5)
            add_rms_norm(x, _zeros(3, hidden, dtype=dtype), _zeros(hidden, dtype=dtype), 1e-5)
            silu_and_mul(_zeros(3, 2 * inter, dtype=dtype))
            silu_and_mul(_zeros(3, 2 * inter, dtype=dtype), norm_of=x, eps=1e-5)


def gemv() -> None:
    from kernels.triton.gemv import gemv as run

    for n, k in ((6144, 4096), (4096, 14336), (1000, 576)):
        x, w = _zeros(1, k), _zeros(n, k)
        run(x, w)
        run(x, w, _zeros(n), norm_weight=_zeros(k), eps=1e-5, out_dtype=F32)
        run(x, w, silu_mul=True, norm_weight=_zeros(k), eps=1e-5)
        run(x, w, residual=_zeros(1, n))


def skinny_gemm() -> None:
    from kernels.triton.skinny_gemm import DEFAULT_CONFIG, skinny_linear
    from kernels.triton.skinny_plan import CANDIDATES

    for m in (2, 64, 128):
        x, w = _zeros(m, 4096), _zeros(2 * 4096, 4096)
        for cfg in (DEFAULT_CONFIG, *CANDIDATES["gated"]):
            skinny_linear(x, w, silu_mul=True, config=cfg)
        for cfg in (DEFAULT_CONFIG, *CANDIDATES["residual"]):
            skinny_linear(x, w, residual=_zeros(m, 2 * 4096), config=cfg)


def sampling_and_staging() -> None:
    from kernels.triton.argmax import argmax
    from kernels.triton.stage_decode import stage_decode

    for dtype in (BF16, F32):
        argmax(_zeros(3, 128256, dtype=dtype))
    for tokens in (None, _zeros(8, dtype=torch.int64)):
        stage_decode(_zeros(256, dtype=torch.int64), tokens, 3, 4, 5, 4, 8, 16,
                     _zeros(4, dtype=torch.int32), _zeros(4, 5, dtype=torch.int32))  # fmt: skip


CASES: dict[str, Callable[[], None]] = {
    f.__name__: f
    for f in (fused_decode, paged_attention, rope_store, norms_and_activations, gemv, skinny_gemm, sampling_and_staging)
}


def main(capability: int) -> int:
    target = GPUTarget("cuda", capability, 32)
    compiled: list[str] = []
    pdl_target = capability >= 90  # griddepcontrol is sm90+; the wrappers' rule as well

    def compile_for_target(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        variants = [compile["constants"]]
        names = fn.jit_function.arg_names
        if pdl_target and "PDL" in names and compile["constants"].get((names.index("PDL"),)) is False:
            variants.append({**compile["constants"], (names.index("PDL"),): True})
        for constants in variants:
            src = ASTSource(fn.jit_function, compile["signature"], constants, compile["configs"][0])
            triton.compile(src, target=target, options=options)
            compiled.append(repr.split("[", 1)[0] + (" (PDL)" if constants is not variants[0] else ""))
        return True  # compiled here: Triton skips its own compile and the launch

    driver.set_active(CompileOnly(target))
    knobs.runtime.jit_cache_hook = compile_for_target
    failed = []
    for name, case in CASES.items():
        before = len(compiled)
        try:
            case()
        except Exception:
            failed.append(name)
            print(f"FAILED {name} (sm{capability}):\n{traceback.format_exc()}")
            continue
        if len(compiled) == before:  # a wrapper that no longer launches would pass silently
            failed.append(name)
            print(f"FAILED {name} (sm{capability}): compiled nothing")
            continue
        kernels = sorted(set(compiled[before:]))
        print(f"{name}: {len(compiled) - before} compiles for sm{capability} ({', '.join(kernels)})")
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
