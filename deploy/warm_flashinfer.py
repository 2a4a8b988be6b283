#!/usr/bin/env python3
"""Warm the FlashInfer JIT cache for the attention kernels pdserve runs, so pods do not compile
on start (first use otherwise costs ~75 s for paged prefill and ~11 s for paged decode on an H200).

What pdserve requests (kernels/attention/flashinfer_backend.py): tensor-core batch decode and
causal paged prefill, both served by FlashInfer's `fa2` batch-prefill JIT module (one module per
head_dim and dtype; head counts are plan-time arguments, not template parameters), plus `fa3`
when PDSERVE_FLASHINFER_PREFILL_BACKEND asks for it.

Modes:
  (default, needs a GPU)  build pdserve's own FlashInfer backend for the model's head config and
                          run one mixed step (two decodes + a chunked prefill) and one CUDA-graph
                          decode plan: compiles, loads and runs exactly what a worker will, the
                          Triton RoPE/KV-store kernels included.
  --compile-only          no GPU needed (`docker build`): compile the same JIT modules for every
                          arch in FLASHINFER_CUDA_ARCH_LIST ("8.0 8.9 9.0"); Triton kernels need
                          a GPU and are left to first use (seconds).
  --check                 compile nothing; exit 1 if a module is missing from the cache.
  --list                  print the modules that would be built (no torch / flashinfer import).

The cache lives in $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/<version>/<archs>/cached_ops: a
pod reuses it only with the same FLASHINFER_CUDA_ARCH_LIST and flashinfer version (the image sets
both), and it must stay writable (FlashInfer takes a file lock and lets ninja confirm it is up to
date on every load).

Head config, first that applies: --model PATH (GGUF or Hugging Face folder, read with pdserve's
own loaders); --preset NAME (server/models/presets.py); --head-dim D (repeatable) with
--num-heads / --num-kv-heads; else the embedded demo model if installed, else head_dim 128.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run from a checkout (python deploy/warm_flashinfer.py) as well as from the installed image.
_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "server").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

DTYPES = ("bfloat16", "float16")
BACKENDS = ("fa2", "fa3", "auto")


@dataclass(frozen=True)
class HeadConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    source: str


@dataclass(frozen=True)
class KernelSpec:
    """One FlashInfer JIT module: gen_batch_prefill_module(backend, dtype, dtype, dtype, int32,
    head_dim, head_dim, pos_encoding NONE, no sliding window, no soft cap, no fp16 qk reduction)."""

    backend: str
    dtype: str
    head_dim: int

    def describe(self) -> str:
        return f"batch_prefill backend={self.backend} dtype={self.dtype} head_dim={self.head_dim} idx=int32"


def arch_list() -> list[str]:
    """FLASHINFER_CUDA_ARCH_LIST (space separated), else TORCH_CUDA_ARCH_LIST (';' or ' ')."""
    raw = os.environ.get("FLASHINFER_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    return [a.removesuffix("+PTX") for a in raw.replace(";", " ").split() if a]


def kernel_specs(
    head_dims: list[int], dtypes: list[str], backend: str, archs: list[str]
) -> list[KernelSpec]:
    """The modules pdserve's FlashInfer backend requests. Tensor-core decode always uses fa2 (for
    non-fp8 dtypes FlashInfer's decode wrapper picks fa2); prefill uses `backend`, where "auto"
    means fa3 on Hopper (9.x) and fa2 elsewhere, so both are built when the list mixes them."""
    backends = ["fa2"]
    if backend == "fa3" or (backend == "auto" and any(a.startswith("9.") for a in archs)):
        backends.append("fa3")
    return [
        KernelSpec(b, dt, hd) for hd in sorted(set(head_dims)) for dt in dtypes for b in backends
    ]


def _from_hf_folder(path: Path) -> HeadConfig:
    cfg = json.loads((path / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return HeadConfig(
        heads,
        cfg.get("num_key_value_heads") or heads,
        cfg.get("head_dim") or cfg["hidden_size"] // heads,
        str(path),
    )


def _from_gguf(path: Path) -> HeadConfig:
    from server.models.gguf_loader import gguf_config, open_gguf

    cfg = gguf_config(open_gguf(path), path.stem)
    return HeadConfig(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, str(path))


def resolve_head_configs(args: argparse.Namespace) -> list[HeadConfig]:
    if args.model:
        path = Path(args.model)
        return [_from_hf_folder(path) if path.is_dir() else _from_gguf(path)]
    if args.preset:
        from server.models.presets import PRESETS

        c = PRESETS[args.preset]
        return [HeadConfig(c.num_heads, c.num_kv_heads, c.head_dim, f"preset {args.preset}")]
    if args.head_dim:
        return [
            HeadConfig(args.num_heads, args.num_kv_heads, d, f"--head-dim {d}")
            for d in sorted(set(args.head_dim))
        ]
    try:
        from server.models.loader import embedded_model_path

        return [_from_gguf(embedded_model_path())]
    except (ImportError, OSError):
        return [HeadConfig(args.num_heads, args.num_kv_heads, 128, "default head_dim 128")]


# -- compile-only / check ------------------------------------------------------------------------


def _jit_spec(k: KernelSpec):
    import torch
    from flashinfer.jit.attention import gen_batch_prefill_module

    dt = getattr(torch, k.dtype)
    return gen_batch_prefill_module(
        k.backend, dt, dt, dt, torch.int32, k.head_dim, k.head_dim, 0, False, False, False
    )


def compile_only(specs: list[KernelSpec]) -> int:
    if not os.environ.get("FLASHINFER_CUDA_ARCH_LIST"):
        archs = arch_list()
        if not archs:
            print(
                "set FLASHINFER_CUDA_ARCH_LIST (e.g. '8.0 8.9 9.0') to compile without a GPU",
                file=sys.stderr,
            )
            return 2
        os.environ["FLASHINFER_CUDA_ARCH_LIST"] = " ".join(archs)
    for k in specs:
        if k.backend == "fa3" and not any(a.startswith("9.") for a in arch_list()):
            print(f"skip  {k.describe()}: fa3 needs a 9.x arch", flush=True)
            continue
        t0 = time.perf_counter()
        spec = _jit_spec(k)
        spec.build(verbose=False, need_lock=True)
        print(
            f"built {k.describe()} in {time.perf_counter() - t0:.0f} s -> {spec.get_library_path()}",
            flush=True,
        )
    return 0


def check(specs: list[KernelSpec]) -> int:
    missing = 0
    for k in specs:
        spec = _jit_spec(k)
        ok = spec.is_compiled
        missing += not ok
        print(f"{'ok     ' if ok else 'MISSING'} {k.describe()} ({spec.get_library_path()})")
    return 1 if missing else 0


# -- on a GPU: run the real backend --------------------------------------------------------------


def _metadata(query_lens: list[int], context_lens: list[int], block_size: int, device):
    """Decodes first, then prefill chunks; block ids handed out in order (no sharing)."""
    import torch

    from kernels.attention.base import AttentionMetadata

    seq_lens = [q + c for q, c in zip(query_lens, context_lens, strict=True)]
    tables, slots, starts, nxt = [], [], [0], 1  # block 0 stays free (padding target)
    for q, s in zip(query_lens, seq_lens, strict=True):
        n = -(-s // block_size)
        table = list(range(nxt, nxt + n))
        nxt += n
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
        starts.append(starts[-1] + q)
    width = max(len(t) for t in tables)
    num_decode = sum(1 for q in query_lens if q == 1)
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        num_seqs=len(query_lens),
        num_decode_seqs=num_decode,
        num_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
        query_start_loc_cpu=starts,
        block_size=block_size,
    ), nxt


def run_pdserve_backend(hc: HeadConfig, dtype_name: str, block_size: int) -> str:
    import types

    import torch

    from kernels.attention.flashinfer_backend import FlashInferAttentionBackend

    dev, dt = torch.device("cuda"), getattr(torch, dtype_name)
    h, hkv, d = hc.num_heads, hc.num_kv_heads, hc.head_dim
    meta, used = _metadata([1, 1, 40], [32, 16, 20], block_size, dev)
    kv = torch.zeros(used + 1, 1, 2, block_size, hkv, d, dtype=dt, device=dev)
    backend = FlashInferAttentionBackend(kv, h, hkv, d)
    t = meta.num_tokens
    q = torch.randn(t, h, d, dtype=dt, device=dev)
    k = torch.randn(t, hkv, d, dtype=dt, device=dev)
    v = torch.randn(t, hkv, d, dtype=dt, device=dev)
    positions = torch.cat(
        [
            torch.arange(s - ql, s)
            for s, ql in zip(meta.seq_lens_cpu, meta.query_lens_cpu, strict=True)
        ]
    ).to(dev)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(4096, device=dev, dtype=torch.float32), inv)
    rope = types.SimpleNamespace(
        cos=torch.cat([ang.cos()] * 2, -1), sin=torch.cat([ang.sin()] * 2, -1)
    )
    backend.plan(meta)
    out = backend.forward_rope(0, q, k, v, positions, rope)  # fused RoPE + KV store (Triton)
    backend.plan(meta)
    out = backend.forward(0, q, k, v)  # plain KV store (Triton)
    dmeta, _ = _metadata([1, 1], [32, 16], block_size, dev)
    backend.plan_cuda_graph(dmeta)  # use_cuda_graph decode wrapper
    backend.forward(0, q[:2], k[:2], v[:2])
    torch.cuda.synchronize()
    if not torch.isfinite(out).all():
        raise RuntimeError("non-finite attention output")
    return "pdserve FlashInferAttentionBackend (decode + prefill + CUDA-graph decode, Triton store)"


def run_flashinfer_wrappers(hc: HeadConfig, dtype_name: str, block_size: int, backend: str) -> str:
    """Fallback when pdserve's backend cannot be imported: the same two wrappers, directly."""
    import flashinfer
    import torch

    dev, dt = torch.device("cuda"), getattr(torch, dtype_name)
    h, hkv, d = hc.num_heads, hc.num_kv_heads, hc.head_dim
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
    pages = 8
    cache = torch.randn(pages, 2, block_size, hkv, d, dtype=dt, device=dev)
    indptr = torch.tensor([0, 4, 8], dtype=torch.int32)
    indices = torch.arange(pages, dtype=torch.int32, device=dev)
    last = torch.tensor([block_size, block_size], dtype=torch.int32)
    dec = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    dec.plan(indptr, indices, last, h, hkv, d, block_size, q_data_type=dt, kv_data_type=dt)
    dec.run(torch.randn(2, h, d, dtype=dt, device=dev), cache)
    pre = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    qo = torch.tensor([0, 8, 16], dtype=torch.int32)
    pre.plan(
        qo,
        indptr,
        indices,
        last,
        h,
        hkv,
        d,
        block_size,
        causal=True,
        q_data_type=dt,
        kv_data_type=dt,
    )
    pre.run(torch.randn(16, h, d, dtype=dt, device=dev), cache)
    torch.cuda.synchronize()
    return "flashinfer wrappers (fallback)"


def run_on_gpu(configs: list[HeadConfig], dtypes: list[str], block_size: int, backend: str) -> int:
    os.environ.setdefault("PDSERVE_FLASHINFER_PREFILL_BACKEND", backend)
    for hc in configs:
        for dt in dtypes:
            t0 = time.perf_counter()
            try:
                how = run_pdserve_backend(hc, dt, block_size)
            except (ImportError, TypeError) as exc:  # not installed, or its interface moved on
                print(f"pdserve backend unusable ({exc!r}); using flashinfer directly", flush=True)
                how = run_flashinfer_wrappers(hc, dt, block_size, backend)
            print(
                f"warmed heads={hc.num_heads}/{hc.num_kv_heads} head_dim={hc.head_dim} {dt} "
                f"({hc.source}) via {how} in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("head configuration")
    src.add_argument("--model", help="GGUF file or Hugging Face folder")
    src.add_argument("--preset", help="a name from server/models/presets.py")
    src.add_argument("--head-dim", type=int, action="append", help="repeatable")
    src.add_argument("--num-heads", type=int, default=32, help="with --head-dim (GPU run only)")
    src.add_argument("--num-kv-heads", type=int, default=8, help="with --head-dim (GPU run only)")
    p.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="repeatable; default bfloat16 (what --dtype auto gives on CUDA)",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--prefill-backend",
        choices=BACKENDS,
        default=os.environ.get("PDSERVE_FLASHINFER_PREFILL_BACKEND", "fa2"),
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compile-only", action="store_true", help="no GPU: compile, do not run")
    mode.add_argument("--check", action="store_true", help="exit 1 if a module is not cached")
    mode.add_argument("--list", action="store_true", help="print the modules, import nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtypes = args.dtype or ["bfloat16"]
    configs = resolve_head_configs(args)
    specs = kernel_specs([c.head_dim for c in configs], dtypes, args.prefill_backend, arch_list())
    for c in configs:
        print(
            f"head config: {c.num_heads} q / {c.num_kv_heads} kv heads, head_dim {c.head_dim} "
            f"({c.source})",
            flush=True,
        )
    if args.list:
        for k in specs:
            print(k.describe())
        return 0
    if args.check:
        return check(specs)
    if args.compile_only:
        return compile_only(specs)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: use --compile-only (or --list)", file=sys.stderr)
        return 2
    return run_on_gpu(configs, dtypes, args.block_size, args.prefill_backend)


if __name__ == "__main__":
    sys.exit(main())
