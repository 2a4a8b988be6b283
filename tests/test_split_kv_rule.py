"""The fused decode kernel's split rule (kernels.attention.split_kv_decode.split_count), pure
Python: about two programs per SM, a power of two, halving as the batch doubles."""

from __future__ import annotations

import pytest

from kernels.attention.split_kv_decode import MAX_SPLITS, PROGRAMS_PER_SM, split_count


def test_llama8b_on_an_h100():
    """8 KV heads, 132 SMs: 32 splits at batch 1, one from batch 24."""
    got = [split_count(b, 8, 132) for b in (1, 2, 3, 4, 8, 16, 24, 32, 128)]
    assert got == [32, 16, 8, 8, 4, 2, 1, 1, 1]


@pytest.mark.parametrize("sm_count", [1, 78, 108, 132, 170])
@pytest.mark.parametrize("heads", [1, 3, 8, 32])
def test_rule_bounds(sm_count, heads):
    for b in range(1, 129):
        p = split_count(b, heads, sm_count)
        assert 1 <= p <= MAX_SPLITS and p & (p - 1) == 0
        # within the program budget, and the next power of two would exceed it (unless capped)
        assert p == 1 or b * heads * p <= PROGRAMS_PER_SM * sm_count
        assert p == MAX_SPLITS or b * heads * 2 * p > PROGRAMS_PER_SM * sm_count
        assert split_count(b, heads, sm_count, cap=4) == min(p, 4)
        if b > 1:
            assert p <= split_count(b - 1, heads, sm_count)  # never more splits for more rows
