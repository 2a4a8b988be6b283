"""kernels/blas_plan.py: the per-shape choice between cuBLAS and cuBLASLt for decode linears.

On the CPU: `PlannedLinear` is the module it replaces (same parameter objects, same state-dict
keys, same output), CPU linears are never swapped, and a plan names only real libraries. On a
GPU: `tune` times both libraries on a Llama-shaped model and plans only its decode shapes; a
planned linear runs on the library the plan names (checked by the kernel the profiler sees),
gives F.linear's result within bf16 tolerance, and leaves torch's preferred library as it was,
in eager mode and inside a CUDA graph capture."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import blas_plan
from server.models.llama import LlamaForCausalLM
from server.models.presets import PRESETS, init_random_weights


@pytest.fixture(autouse=True)
def empty_plan():
    blas_plan.set_plan({})
    yield
    blas_plan.set_plan({})


def test_planned_linear_is_the_linear_it_replaces():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=True), nn.Linear(8, 4, bias=False))
    before = dict(model.state_dict())
    params = [model[0].weight, model[0].bias, model[1].weight]
    x = torch.randn(3, 16)
    want = model(x)
    swapped = [blas_plan.PlannedLinear(m) for m in model]
    model[0], model[1] = swapped
    assert [model[0].weight, model[0].bias, model[1].weight] == params  # the same objects
    assert model[1].bias is None
    assert dict(model.state_dict()).keys() == before.keys()
    assert torch.equal(model(x), want)
    assert (model[0].in_features, model[0].out_features) == (16, 8)


def test_cpu_linears_are_not_swapped():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    assert blas_plan.plan_linears(model) == 0
    assert all(type(m) is not blas_plan.PlannedLinear for m in model)


def test_plan_names_real_libraries_and_cpu_calls_ignore_it():
    with pytest.raises(ValueError, match="unknown BLAS library"):
        blas_plan.set_plan({(4, 8, 16): "cutlass"})
    blas_plan.set_plan({(3, 8, 16): "cublaslt"})
    w = torch.randn(8, 16)
    assert blas_plan.lookup(3, w) == "cublaslt" and blas_plan.lookup(4, w) is None
    x = torch.randn(3, 16)
    assert torch.equal(blas_plan.linear(x, w), F.linear(x, w))  # CPU tensors: torch's default


def llama_8b_layers(layers: int):
    cfg = dataclasses.replace(PRESETS["llama-3.1-8b"], num_layers=layers, vocab_size=32000, name="8b-shaped")
    model = LlamaForCausalLM(cfg, torch.bfloat16, 256).to("cuda", torch.bfloat16)
    init_random_weights(model, seed=0)
    return model


def kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


@pytest.mark.gpu
def test_tune_plans_decode_shapes_and_runs_them_on_the_planned_library():
    model = llama_8b_layers(2)
    assert blas_plan.plan_linears(model) == 2 * 4 + 1
    default = torch.backends.cuda.preferred_blas_library()
    lines = blas_plan.tune(model, [2, 64, 128])
    assert [line.split(":")[0] for line in lines] == [f"BLAS plan at {m} rows" for m in (2, 64, 128)]
    assert torch.backends.cuda.preferred_blas_library() == default
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "lm_head.weight"}
    for m, n, k in blas_plan._PLAN:
        assert m in (2, 64, 128) and (n, k) in shapes
    assert set(blas_plan._PLAN.values()) <= set(blas_plan.LIBRARIES) - {blas_plan.default_library()}

    # Every shape forced onto the other library: the result is F.linear's, the preferred library
    # is restored, and the profiler sees a different kernel set for a shape the libraries split.
    other = next(lib for lib in blas_plan.LIBRARIES if lib != blas_plan.default_library())
    gen = torch.Generator(device="cuda").manual_seed(1)
    down = model.layers[0].down_proj.weight
    x = torch.randn(128, down.shape[1], generator=gen, device="cuda").to(torch.bfloat16)
    want = F.linear(x, down)
    default_kernels = kernel_names(lambda: F.linear(x, down))
    blas_plan.set_plan({(128, *down.shape): other})
    got = model.layers[0].down_proj(x)
    assert torch.backends.cuda.preferred_blas_library() == default
    assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
    with blas_plan.library(other):
        other_kernels = kernel_names(lambda: F.linear(x, down))
    assert kernel_names(lambda: model.layers[0].down_proj(x)) == other_kernels
    assert kernel_names(lambda: model.layers[0].down_proj(x[:64])) == kernel_names(lambda: F.linear(x[:64], down))
    print("down projection at 128 rows:", default_kernels, "->", other_kernels)


@pytest.mark.gpu
def test_planned_library_inside_a_cuda_graph():
    """The decode graphs capture the planned library's kernels: a captured call on a forced
    plan replays to F.linear's result, with torch's preference untouched afterwards."""
    model = llama_8b_layers(1)
    blas_plan.plan_linears(model)
    other = next(lib for lib in blas_plan.LIBRARIES if lib != blas_plan.default_library())
    default = torch.backends.cuda.preferred_blas_library()
    proj = model.layers[0].gate_up_proj
    blas_plan.set_plan({(128, *proj.weight.shape): other})
    x = torch.randn(128, proj.weight.shape[1], device="cuda").to(torch.bfloat16)
    proj(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = proj(x)
    assert torch.backends.cuda.preferred_blas_library() == default
    x.copy_(torch.randn_like(x))
    g.replay()
    want = F.linear(x, proj.weight)
    assert (y.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
