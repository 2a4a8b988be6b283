"""The router's prefix index: events applied in order, gaps detected and repaired by resync."""

from __future__ import annotations

from kvcache.block_hash import hash_prompt_blocks
from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvcache.manager import KVCacheManager
from router.prefix_index import PrefixIndex


def batch(seq, *events, wid="w0"):
    return KVEventBatch(worker_id=wid, seq=seq, ts=0.0, events=list(events))


def stored(*hashes):
    return BlockStored(block_hashes=list(hashes), parent_hash=None, token_ids=[], block_size=4)


def test_match_counts_leading_blocks_only():
    idx = PrefixIndex()
    assert idx.apply(batch(0, stored(1, 2, 3)))
    assert idx.match("w0", [1, 2, 3, 4]) == 3
    assert idx.match("w0", [1, 9, 3]) == 1
    assert idx.match("w1", [1]) == 0
    assert idx.apply(batch(1, BlockRemoved(block_hashes=[2])))
    assert idx.match("w0", [1, 2, 3]) == 1
    assert idx.apply(batch(2, AllBlocksCleared()))
    assert idx.match("w0", [1]) == 0


def test_gap_is_detected_and_resync_repairs():
    idx = PrefixIndex()
    idx.apply(batch(0, stored(1)))
    assert not idx.apply(batch(2, stored(2)))  # seq 1 was lost
    assert idx.needs_resync("w0") and idx.gaps == 1
    assert idx.match("w0", [1]) == 0  # stale: not trusted
    assert not idx.apply(batch(3, stored(3)))  # still waiting for the snapshot
    idx.resync("w0", [1, 2, 3], next_seq=4)
    assert idx.apply(batch(4, stored(4)))
    assert idx.match("w0", [1, 2, 3, 4]) == 4


def test_duplicate_batches_are_ignored():
    idx = PrefixIndex()
    idx.apply(batch(0, stored(1)))
    idx.apply(batch(1, BlockRemoved(block_hashes=[1])))
    assert idx.apply(batch(0, stored(1)))  # replayed old batch
    assert idx.match("w0", [1]) == 0


def test_index_fed_by_a_real_kv_manager_matches_router_side_hashes():
    mgr = KVCacheManager(32, 4, worker_id="w0")
    prompt = list(range(100, 118))  # 4 full blocks + 2 tokens
    mgr.allocate("a", len(prompt))
    mgr.commit("a", prompt, len(prompt))
    idx = PrefixIndex()
    assert idx.apply(mgr.take_events())
    hashes = hash_prompt_blocks(prompt, 4)
    assert idx.match("w0", hashes) == 4
    assert idx.match("w0", hash_prompt_blocks([7] + prompt[1:], 4)) == 0
    idx.remove_worker("w0")
    assert idx.match("w0", hashes) == 0
