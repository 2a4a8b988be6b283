"""kernels/cpu_linear.py: oneDNN-prepacked CPU linears give F.linear's numbers, and a dtype this
CPU's oneDNN cannot pack (bf16 without AVX512 / AVX-NE-CONVERT) leaves the linears as they
are instead of failing the engine's start. Which branch a machine takes depends on its CPU
(`packable` probes it); both assert the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.cpu_linear import PackedLinear, available, pack_linears, packable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_linears_keeps_the_numbers(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=True), nn.ReLU(), nn.Linear(96, 32, bias=False)).to(dtype)
    x = torch.randn(3, 64, dtype=dtype)
    with torch.inference_mode():
        ref = model(x)
        n = pack_linears(model)
        out = model(x)
    can = available() and packable(dtype)
    assert n == (2 if can else 0)
    assert isinstance(model[0], PackedLinear if can else nn.Linear)
    if dtype == torch.bfloat16:
        assert torch.equal(out, ref)  # bit-identical (the module's docstring)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # accumulation order only


def test_a_bf16_engine_starts_on_any_cpu():
    """The embedded model in bf16 on this CPU, packed or not: it generates."""
    from server.engine.engine import EngineConfig
    from server.engine.llm import LLM
    from server.engine.sampling_params import SamplingParams

    llm = LLM(EngineConfig(dtype="bfloat16", kv_cache_memory="64MiB", max_num_seqs=2, progress=False))
    out = llm.generate([llm.encode("The ocean is")], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    llm.engine.check_integrity()
