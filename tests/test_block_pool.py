"""BlockPool (ref counts, free queue, prefix cache, events), block hashes and the event wire
format. The manager-level behaviour is in test_kv_manager.py."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import msgspec
import pytest

from kvcache.block_hash import NONE_HASH, hash_block, hash_prompt_blocks
from kvcache.block_pool import NO_PARENT, BlockPool
from kvcache.events import (
    KV_EVENTS_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_event_batch,
    encode_event_batch,
)

BS = 4


def toks(start: int) -> list[int]:
    """A block's worth of distinct tokens."""
    return list(range(start, start + BS))


def cached_pool(num_blocks: int, num_cached: int) -> tuple[BlockPool, list[int]]:
    """A pool whose first `num_cached` blocks are in use and cached as one chain."""
    pool = BlockPool(num_blocks, BS)
    blocks = pool.get_new_blocks(num_cached)
    parent_hash, parent_entry = None, NO_PARENT
    for i, b in enumerate(blocks):
        h = hash_block(parent_hash, toks(100 * i))
        parent_entry = pool.cache_block(b, h, parent_hash, toks(100 * i), parent_entry)
        parent_hash = h
    return pool, blocks


# ------------------------------------------------------------------ block hashes


def test_hash_matches_documented_encoding_and_is_pinned():
    tokens = [1, 2, 3, 4]
    h = hashlib.blake2b(digest_size=8, person=b"pdserve.kv.v1")
    h.update(NONE_HASH.to_bytes(8, "little") + struct.pack("<4q", *tokens))
    assert hash_block(None, tokens) == int.from_bytes(h.digest(), "little")
    # Pinned: a change here breaks routers and workers of different versions.
    assert NONE_HASH == 15525485361831763794
    assert hash_block(None, tokens) == 16446092858229516282
    assert hash_block(None, tokens) == hash_block(NONE_HASH, tokens)


def test_hash_is_stable_across_processes():
    code = "from kvcache.block_hash import hash_block; print(hash_block(123, [5, 6, 7, 8]))"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = set()
    for seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": repo}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(int(out.stdout))
    assert outs == {hash_block(123, [5, 6, 7, 8])}


def test_hash_depends_on_parent_tokens_and_order():
    a = hash_block(None, [1, 2, 3, 4])
    assert hash_block(a, [1, 2, 3, 4]) != a
    assert hash_block(None, [4, 3, 2, 1]) != a
    assert hash_block(None, [1, 2, 3]) != a
    assert 0 <= a < 2**64


def test_hash_prompt_blocks_full_blocks_only_and_chained():
    tokens = list(range(11))
    hashes = hash_prompt_blocks(tokens, BS)
    assert len(hashes) == 2  # 3 trailing tokens are not a full block
    assert hashes[0] == hash_block(None, tokens[:4])
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])
    # Continuing from a parent gives the same chain as hashing the whole sequence.
    assert hash_prompt_blocks(tokens[4:8], BS, parent=hashes[0]) == hashes[1:]
    assert hash_prompt_blocks([1, 2], BS) == []
    with pytest.raises(ValueError):
        hash_prompt_blocks(tokens, 0)


# ------------------------------------------------------------------ events wire format


def test_event_batch_roundtrip_and_tags():
    batch = KVEventBatch(
        worker_id="w0",
        seq=7,
        ts=1.5,
        events=[
            BlockStored(
                block_hashes=[2**64 - 1, 3], parent_hash=None, token_ids=[1] * 8, block_size=4
            ),
            BlockRemoved(block_hashes=[3]),
            AllBlocksCleared(),
        ],
    )
    data = encode_event_batch(batch)
    assert decode_event_batch(data) == batch
    raw = msgspec.msgpack.decode(data)
    assert raw["version"] == KV_EVENTS_VERSION
    assert [e[0] for e in raw["events"]] == ["stored", "removed", "cleared"]


def test_event_batch_rejects_other_versions_and_garbage():
    batch = KVEventBatch(worker_id="w0", seq=0, ts=0.0, events=[], version=KV_EVENTS_VERSION + 1)
    with pytest.raises(ValueError, match="version"):
        decode_event_batch(encode_event_batch(batch))
    with pytest.raises(ValueError):
        decode_event_batch(b"\x93\x01\x02")


# ------------------------------------------------------------------ allocation and ref counts


def test_fresh_pool_hands_out_consecutive_ids():
    pool = BlockPool(10, BS)
    assert pool.num_free_blocks == 10 and pool.usage == 0.0
    assert pool.get_new_blocks(4) == [0, 1, 2, 3]
    assert pool.get_new_blocks(3) == [4, 5, 6]
    assert [pool.ref_count(b) for b in range(10)] == [1] * 7 + [0] * 3
    assert pool.num_free_blocks == 3 and pool.usage == pytest.approx(0.7)
    pool.check_integrity()


def test_lowest_free_ids_first_after_churn():
    pool = BlockPool(10, BS)
    pool.get_new_blocks(10)
    pool.free_blocks([7, 3, 5, 4, 9])
    assert pool.get_new_blocks(3) == [3, 4, 5]
    assert pool.get_new_blocks(2) == [7, 9]
    pool.check_integrity()


def test_get_new_blocks_beyond_free_raises_and_changes_nothing():
    pool = BlockPool(4, BS)
    pool.get_new_blocks(3)
    with pytest.raises(ValueError, match="only 1"):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1
    assert pool.get_new_blocks(0) == []
    pool.check_integrity()


def test_touch_and_free_ref_counts():
    pool = BlockPool(4, BS)
    [b] = pool.get_new_blocks(1)
    pool.touch([b])
    assert pool.ref_count(b) == 2
    pool.free_blocks([b])
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 3
    pool.free_blocks([b])
    assert pool.ref_count(b) == 0 and pool.num_free_blocks == 4
    pool.check_integrity()


def test_touch_free_uncached_block_removes_it_from_free_set():
    pool = BlockPool(4, BS)
    pool.touch([2])
    assert pool.ref_count(2) == 1 and pool.num_free_blocks == 3
    assert pool.get_new_blocks(3) == [0, 1, 3]  # the stale heap entry for 2 is skipped
    pool.free_blocks([2, 0])
    assert pool.get_new_blocks(2) == [0, 2]
    pool.check_integrity()


def test_double_free_raises_and_changes_nothing():
    pool = BlockPool(4, BS)
    a, b = pool.get_new_blocks(2)
    with pytest.raises(ValueError, match="ref 1"):
        pool.free_blocks([a, b, b])
    assert pool.ref_count(a) == 1 and pool.ref_count(b) == 1
    pool.free_blocks([a])
    with pytest.raises(ValueError):
        pool.free_blocks([a])
    with pytest.raises(IndexError):
        pool.free_blocks([-1])
    with pytest.raises(IndexError):
        pool.touch([4])
    pool.check_integrity()


# ------------------------------------------------------------------ prefix cache


def test_cache_block_records_coalesced_stored_event():
    pool, blocks = cached_pool(8, 3)
    h = hash_prompt_blocks(toks(0) + toks(100) + toks(200), BS)
    assert pool.take_events() == [
        BlockStored(
            block_hashes=h,
            parent_hash=None,
            token_ids=toks(0) + toks(100) + toks(200),
            block_size=BS,
        )
    ]
    assert pool.take_events() == []
    assert [pool.block_hash(b) for b in blocks] == h
    assert pool.hash_to_block == dict(zip(h, blocks, strict=True))
    pool.check_integrity()


def test_cached_block_survives_free_and_is_revived_by_touch():
    pool, [b] = cached_pool(4, 1)
    h = pool.block_hash(b)
    pool.free_blocks([b])
    assert pool.num_free_blocks == 4 and pool.get_cached_block(h, toks(0)) == b
    pool.touch([b])
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 3
    pool.check_integrity()


def test_uncached_free_blocks_are_taken_before_cached_ones():
    pool, blocks = cached_pool(6, 3)  # blocks 0..2 cached
    pool.free_blocks(blocks)
    pool.take_events()
    assert pool.get_new_blocks(3) == [3, 4, 5]
    assert pool.num_cached_blocks == 3 and pool.take_events() == []
    pool.check_integrity()


def test_lru_eviction_least_recently_freed_first():
    pool, blocks = cached_pool(4, 4)
    hashes = [pool.block_hash(b) for b in blocks]
    pool.take_events()
    pool.free_blocks([2, 0, 3, 1])
    assert pool.get_new_blocks(1) == [2]
    assert pool.take_events() == [BlockRemoved(block_hashes=[hashes[2]])]
    # Touching 0 makes it in-use; freeing it again puts it behind 3 and 1.
    pool.touch([0])
    pool.free_blocks([0])
    assert pool.get_new_blocks(2) == [1, 3]  # evicted 3 then 1; returned sorted
    assert pool.take_events() == [BlockRemoved(block_hashes=[hashes[3], hashes[1]])]
    assert pool.get_cached_block(hashes[0], toks(0)) == 0
    assert pool.get_cached_block(hashes[1], toks(100)) is None
    pool.check_integrity()


def test_duplicate_hash_keeps_existing_mapping_without_event():
    pool, [a] = cached_pool(4, 1)
    pool.take_events()
    [b] = pool.get_new_blocks(1)
    h = pool.block_hash(a)
    entry = pool.cache_block(b, h, None, toks(0))
    assert entry == pool.entry_id(a)  # same content: chain on the existing entry
    assert pool.hash_to_block[h] == a and pool.block_hash(b) is None
    assert pool.take_events() == []
    # b was never cached, so freeing it makes it plain free, and a stays cached.
    pool.free_blocks([b])
    assert pool.get_new_blocks(1) == [b]
    assert pool.get_cached_block(h, toks(0)) == a
    pool.check_integrity()


def test_hash_collision_is_a_miss_and_is_not_registered():
    pool, [a] = cached_pool(4, 1)
    h = pool.block_hash(a)
    assert pool.get_cached_block(h, toks(50)) is None  # same hash, other tokens
    [b] = pool.get_new_blocks(1)
    assert pool.cache_block(b, h, None, toks(50)) is None  # collision: caller stops chaining
    assert pool.hash_to_block[h] == a and pool.block_hash(b) is None
    pool.check_integrity()


def test_parent_entry_must_match():
    pool, [a] = cached_pool(4, 1)
    h = pool.block_hash(a)
    assert pool.get_cached_block(h, toks(0), parent_entry=NO_PARENT) == a
    assert pool.get_cached_block(h, toks(0), parent_entry=pool.entry_id(a) + 1) is None
    [b] = pool.get_new_blocks(1)
    assert pool.cache_block(b, h, None, toks(0), parent_entry=99) is None


def test_entry_ids_are_never_reused():
    pool, [a] = cached_pool(1, 1)
    first = pool.entry_id(a)
    h = pool.block_hash(a)
    pool.free_blocks([a])
    assert pool.get_new_blocks(1) == [a]  # evicts a
    assert pool.entry_id(a) == 0
    assert pool.cache_block(a, h, None, toks(0)) not in (0, first)


def test_cache_block_contract_errors():
    pool = BlockPool(4, BS)
    with pytest.raises(ValueError, match="free"):
        pool.cache_block(0, 1, None, toks(0))
    [b] = pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="4 tokens"):
        pool.cache_block(b, 1, None, [1, 2])
    entry = pool.cache_block(b, 1, None, toks(0))
    assert pool.cache_block(b, 1, None, toks(0)) == entry  # idempotent
    with pytest.raises(ValueError, match="other content"):
        pool.cache_block(b, 2, None, toks(0))


def test_caching_disabled_caches_nothing_and_emits_nothing():
    pool = BlockPool(4, BS, enable_caching=False)
    [b] = pool.get_new_blocks(1)
    assert pool.cache_block(b, 1, None, toks(0)) is None
    assert pool.get_cached_block(1, toks(0)) is None
    pool.free_blocks([b])
    assert pool.reset_prefix_cache()
    assert pool.take_events() == []
    pool.check_integrity()


def test_reset_prefix_cache_only_when_idle():
    pool, blocks = cached_pool(4, 2)
    pool.take_events()
    assert not pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 2
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.num_cached_blocks == 0 and pool.hash_to_block == {}
    assert pool.get_new_blocks(4) == [0, 1, 2, 3]
    pool.check_integrity()


def test_check_integrity_detects_corruption():
    pool, blocks = cached_pool(4, 2)
    pool.check_integrity()
    pool._ref[blocks[0]] = 0  # in use per the free queue's view, but ref says free
    with pytest.raises(AssertionError, match="free block 0"):
        pool.check_integrity()
    pool._ref[blocks[0]] = 1
    pool.hash_to_block[12345] = blocks[1]
    with pytest.raises(AssertionError, match="hashes mapped"):
        pool.check_integrity()


def test_stale_heap_entries_stay_bounded():
    pool = BlockPool(4, BS)
    for _ in range(100):
        pool.touch([1])  # leaves a stale heap entry for 1
        pool.free_blocks([1])  # and pushes a new one
    assert len(pool._heap) <= 2 * pool.num_blocks
    assert pool.get_new_blocks(4) == [0, 1, 2, 3]
    pool.check_integrity()
