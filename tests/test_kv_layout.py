"""KV tensor layout: sizes, budget, the FlashInfer per-layer view, contiguity of block runs,
size parsing and run coalescing."""

from __future__ import annotations

import pytest
import torch

from kvcache.layout import (
    KVCacheSpec,
    allocate_kv_cache,
    contiguous_runs,
    layer_view,
    num_blocks_for_budget,
    run_byte_range,
)
from kvcache.sizes import parse_size

SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)


def test_spec_sizes():
    assert SPEC.bytes_per_token == 3 * 2 * 2 * 8 * 2
    assert SPEC.bytes_per_block == SPEC.bytes_per_token * 4
    f32 = KVCacheSpec(3, 2, 8, 4, torch.float32)
    assert f32.bytes_per_block == 2 * SPEC.bytes_per_block
    with pytest.raises(ValueError, match="head_dim"):
        KVCacheSpec(3, 2, 0, 4, torch.float16)


def test_num_blocks_for_budget():
    bpb = SPEC.bytes_per_block
    assert num_blocks_for_budget(SPEC, 10 * bpb) == 10
    assert num_blocks_for_budget(SPEC, 10 * bpb + bpb - 1) == 10
    assert num_blocks_for_budget(SPEC, 10 * bpb, max_model_len=40) == 10
    with pytest.raises(ValueError, match=rf"budget of {bpb - 1} bytes .* one block \({bpb} bytes"):
        num_blocks_for_budget(SPEC, bpb - 1)
    with pytest.raises(ValueError, match=r"holds 10 blocks .* max_model_len 41 needs 11 blocks"):
        num_blocks_for_budget(SPEC, 10 * bpb, max_model_len=41)


def test_allocate_shape_dtype_and_zeros():
    kv = allocate_kv_cache(SPEC, 5, "cpu")
    assert kv.shape == (5, 3, 2, 4, 2, 8)
    assert kv.dtype == torch.float16 and kv.device.type == "cpu"
    assert kv.is_contiguous() and not kv.any()
    assert kv.untyped_storage().nbytes() == 5 * SPEC.bytes_per_block


def test_layer_view_is_flashinfer_nhd_with_block_stride():
    num_blocks = 5
    kv = allocate_kv_cache(SPEC, num_blocks, "cpu")
    page_elems = SPEC.num_layers * 2 * SPEC.block_size * SPEC.num_kv_heads * SPEC.head_dim
    for layer in range(SPEC.num_layers):
        view = layer_view(kv, layer)
        # FlashInfer NHD paged KV: [num_pages, 2, page_size, num_kv_heads, head_dim]
        assert view.shape == (num_blocks, 2, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
        assert view.stride() == (page_elems, *kv.stride()[2:])
        assert view.stride()[1:] == torch.empty(view.shape[1:]).stride()  # each page dense
        assert (
            view.data_ptr()
            == kv.data_ptr() + layer * (page_elems // SPEC.num_layers) * kv.element_size()
        )
    # Writes through a layer view land in the shared tensor (a view, not a copy).
    layer_view(kv, 1)[2, 1, 3, 0, 5] = 7.0  # block 2, V, slot 3, head 0, dim 5
    assert kv[2, 1, 1, 3, 0, 5] == 7.0 and kv.count_nonzero() == 1


def test_consecutive_blocks_are_one_contiguous_region():
    kv = allocate_kv_cache(SPEC, 8, "cpu")
    base = kv.data_ptr()
    for start, length in [(0, 8), (2, 3), (5, 1)]:
        region = kv[start : start + length]
        assert region.is_contiguous()
        offset, nbytes = run_byte_range(SPEC, start, length)
        assert region.data_ptr() == base + offset
        assert region.numel() * region.element_size() == nbytes
    # Every layer's K and V of blocks 2..4 lie inside that one byte range and nowhere else.
    kv[2:5] = 1
    flat = kv.view(-1).view(torch.uint8)
    offset, nbytes = run_byte_range(SPEC, 2, 3)
    assert flat[offset : offset + nbytes].count_nonzero() > 0
    assert flat[:offset].count_nonzero() == 0 and flat[offset + nbytes :].count_nonzero() == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1e9", 10**9),
        ("2G", 2 * 10**9),
        ("2gb", 2 * 10**9),
        ("1.5 GiB", 3 * 2**29),
        ("64Ki", 64 * 1024),
        ("1024", 1024),
        ("100B", 100),
        (" 3T ", 3 * 10**12),
        ("0.5k", 500),
        (12345, 12345),
    ],
)
def test_parse_size(text: str | int, expected: int):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "4 GiBs", "-1G", "1e", "4XB", "1..5G", -5, True, 1.5])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("ids", "runs"),
    [
        ([], []),
        ([5], [(5, 1)]),
        ([0, 1, 2, 3], [(0, 4)]),
        ([3, 4, 5, 9, 2], [(3, 3), (9, 1), (2, 1)]),
        ([3, 2, 1], [(3, 1), (2, 1), (1, 1)]),  # order is kept, never sorted
        ([1, 1, 2], [(1, 1), (1, 2)]),
    ],
)
def test_contiguous_runs(ids: list[int], runs: list[tuple[int, int]]):
    assert contiguous_runs(ids) == runs
    assert [b for s, n in runs for b in range(s, s + n)] == ids
