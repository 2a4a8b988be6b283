"""KVCacheManager: block tables, prefix sharing, commit/events, atomic allocation, and a
stateful property test that simulates KV writes and checks every prefix hit's content."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.block_hash import hash_block, hash_prompt_blocks
from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvcache.manager import KVCacheManager, PrefixMatch

BS = 4


def run_prefill(mgr: KVCacheManager, rid: str, tokens: list[int]) -> PrefixMatch:
    """Schedule and 'compute' a whole prompt the way the scheduler would."""
    match = mgr.match_prefix(tokens)
    assert mgr.allocate(rid, len(tokens), match) is not None
    mgr.commit(rid, tokens, len(tokens))
    return match


SYSTEM = list(range(100, 108))  # two full blocks shared by every "chat" below


def test_allocate_grows_table_and_returns_new_ids():
    mgr = KVCacheManager(8, BS)
    assert mgr.allocate("a", 5) == [0, 1]
    assert mgr.allocate("a", 8) == []  # still covered
    assert mgr.allocate("a", 9) == [2]
    assert mgr.block_table("a") == [0, 1, 2]
    assert mgr.blocks_needed("a", 16) == 1 and mgr.blocks_needed("new", 5) == 2
    assert mgr.num_requests == 1 and mgr.num_free_blocks == 5
    assert mgr.usage == pytest.approx(3 / 8)
    mgr.check_integrity()


def test_shared_system_prompt_hits_across_requests():
    mgr = KVCacheManager(16, BS)
    run_prefill(mgr, "a", SYSTEM + [1, 2, 3])
    a_table = mgr.block_table("a")
    match = mgr.match_prefix(SYSTEM + [7, 8])
    assert match.block_ids == a_table[:2] and match.num_tokens == 8
    new = mgr.allocate("b", 10, match)
    assert new is not None and new[:2] == a_table[:2] and len(new) == 3
    assert mgr.block_table("b")[:2] == a_table[:2]
    assert [mgr.pool.ref_count(b) for b in a_table[:2]] == [2, 2]
    mgr.check_integrity()
    # The shared blocks stay cached after both finish and still hit.
    mgr.free("a")
    mgr.free("b")
    assert mgr.match_prefix(SYSTEM + [9]).block_ids == a_table[:2]
    assert mgr.num_free_blocks == 16
    mgr.check_integrity()


def test_match_never_covers_last_token():
    mgr = KVCacheManager(16, BS)
    prompt = list(range(12))  # exactly three blocks
    run_prefill(mgr, "a", prompt)
    assert mgr.match_prefix(prompt).num_tokens == 8  # last block dropped
    assert mgr.match_prefix(prompt + [99]).num_tokens == 12
    assert mgr.match_prefix(prompt[:5]).num_tokens == 4
    assert mgr.match_prefix(prompt[:4]).num_tokens == 0
    assert mgr.match_prefix([]).num_tokens == 0


def test_prefix_cache_counters_in_tokens():
    mgr = KVCacheManager(16, BS)
    run_prefill(mgr, "a", SYSTEM + [1])
    m = mgr.match_prefix(SYSTEM + [2, 3])
    assert mgr.prefix_cache_queries == 0  # matching alone counts nothing: admission does
    mgr.record_query(9, 0)
    mgr.record_query(10, m.num_tokens)
    assert (mgr.prefix_cache_queries, mgr.prefix_cache_hits) == (19, 8)


def test_prefix_caching_disabled():
    mgr = KVCacheManager(8, BS, enable_prefix_caching=False)
    run_prefill(mgr, "a", SYSTEM + [1])
    assert mgr.match_prefix(SYSTEM + [1]) == PrefixMatch([], 0)
    assert mgr.take_events() is None
    assert mgr.prefix_cache_queries == 0
    mgr.free("a")
    mgr.check_integrity()


def test_commit_events_match_router_hashes_and_seq_is_monotonic():
    mgr = KVCacheManager(16, BS, worker_id="w3")
    tokens = list(range(50, 61))  # 11 tokens: two full blocks
    assert mgr.allocate("a", 6) is not None
    mgr.commit("a", tokens, 6)  # chunk 1: block 0 full
    b0 = mgr.take_events()
    assert mgr.take_events() is None
    assert mgr.allocate("a", 11) is not None
    mgr.commit("a", tokens, 11)  # chunk 2: block 1 full
    b1 = mgr.take_events()
    assert b0 is not None and b1 is not None
    assert (b0.worker_id, b0.seq, b1.seq) == ("w3", 0, 1)
    router = hash_prompt_blocks(tokens, BS)
    assert b0.events == [BlockStored([router[0]], None, tokens[:4], BS)]
    assert b1.events == [BlockStored([router[1]], router[0], tokens[4:8], BS)]
    mgr.commit("a", tokens, 11)  # idempotent: nothing new became full
    assert mgr.take_events() is None


def test_free_evicts_sequence_tail_first():
    mgr = KVCacheManager(3, BS)
    prompt = list(range(13))
    run_prefill(mgr, "a", prompt[:12])
    table = mgr.block_table("a")
    hashes = hash_prompt_blocks(prompt, BS)
    mgr.take_events()
    mgr.free("a")
    assert mgr.allocate("b", 1) == [table[2]]  # the last block goes first
    batch = mgr.take_events()
    assert batch is not None and batch.events == [BlockRemoved([hashes[2]])]
    assert mgr.match_prefix(prompt).block_ids == table[:2]


def test_atomic_allocate_failure_counts_claimed_prefix_blocks():
    mgr = KVCacheManager(4, BS)
    run_prefill(mgr, "a", list(range(12)))  # 3 cached blocks
    mgr.free("a")
    mgr.take_events()
    assert mgr.num_free_blocks == 4
    prompt = list(range(8)) + [90] * 12  # shares 2 blocks, 20 tokens = 5 blocks
    match = mgr.match_prefix(prompt)
    assert match.num_tokens == 8
    # 3 fresh blocks needed; 4 are free, but 2 of those are the prefix being claimed.
    assert mgr.blocks_needed("b", 20, match) == 3
    assert mgr.allocate("b", 20, match) is None
    assert mgr.num_requests == 0 and mgr.block_table("b") == []
    assert mgr.num_free_blocks == 4 and mgr.take_events() is None
    assert [mgr.pool.ref_count(b) for b in range(4)] == [0] * 4
    mgr.check_integrity()
    # 16 tokens fit: 2 claimed + 2 fresh (evicting the third cached block).
    new = mgr.allocate("b", 16, mgr.match_prefix(prompt))
    assert new is not None and new[:2] == match.block_ids and len(new) == 4
    assert mgr.num_free_blocks == 0
    mgr.check_integrity()


def test_atomic_allocate_failure_for_running_request():
    mgr = KVCacheManager(2, BS)
    assert mgr.allocate("a", 4) == [0]
    assert mgr.allocate("a", 12) is None
    assert mgr.block_table("a") == [0] and mgr.num_free_blocks == 1
    mgr.check_integrity()


def test_free_twice_and_unknown_is_harmless():
    mgr = KVCacheManager(4, BS)
    run_prefill(mgr, "a", [1, 2, 3, 4, 5])
    mgr.free("a")
    mgr.free("a")
    mgr.free("never-seen")
    assert mgr.num_free_blocks == 4 and mgr.num_requests == 0
    mgr.check_integrity()


def test_stale_or_misused_prefix_is_rejected():
    mgr = KVCacheManager(2, BS)
    run_prefill(mgr, "a", list(range(8)))
    mgr.free("a")
    match = mgr.match_prefix(list(range(9)))
    assert match.num_tokens == 8
    assert mgr.allocate("x", 8) is not None  # evicts both cached blocks
    mgr.free("x")
    with pytest.raises(ValueError, match="stale"):
        mgr.allocate("b", 9, match)
    with pytest.raises(ValueError, match="match_prefix"):
        mgr.allocate("b", 9, PrefixMatch([0], 4))
    assert mgr.num_requests == 0
    mgr.check_integrity()


def test_prefix_on_later_allocation_is_rejected():
    mgr = KVCacheManager(8, BS)
    run_prefill(mgr, "a", list(range(8)))
    match = mgr.match_prefix(list(range(9)))
    assert mgr.allocate("b", 1) is not None
    with pytest.raises(ValueError, match="already has blocks"):
        mgr.allocate("b", 9, match)


def test_commit_contract_errors():
    mgr = KVCacheManager(4, BS)
    with pytest.raises(KeyError):
        mgr.commit("nobody", [1], 1)
    mgr.allocate("a", 4)
    with pytest.raises(ValueError):
        mgr.commit("a", [1, 2, 3, 4, 5], 5)  # beyond the table


def test_hash_collision_is_a_miss_and_stops_the_chain():
    mgr = KVCacheManager(16, BS, hash_fn=lambda parent, tokens: 42)
    a = list(range(12))
    run_prefill(mgr, "a", a)
    # Block 0 got hash 42; block 1's hash collides with it, so a's chain stops there.
    assert mgr.pool.num_cached_blocks == 1
    assert mgr.match_prefix([9] * 8 + [1]).num_tokens == 0  # same hash, other tokens
    assert mgr.match_prefix(a + [1]).block_ids == mgr.block_table("a")[:1]
    mgr.check_integrity()


def parent_blind_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Ignores the parent: equal blocks after different prefixes collide."""
    return hash_block(None, tokens)


def test_hit_requires_the_same_parent_not_just_the_same_hash():
    mgr = KVCacheManager(16, BS, hash_fn=parent_blind_hash)
    x, y, z, w = [1] * 4, [2] * 4, [3] * 4, [4] * 4
    run_prefill(mgr, "a", x + y + [0])
    run_prefill(mgr, "b", z + [0])
    # y's hash is cached (by a, after x), but after z it is other KV: only z hits.
    assert mgr.match_prefix(z + y + [0]).block_ids == mgr.block_table("b")[:1]
    # c computes y after z itself. Its hash is taken by a's y (other parent): a collision,
    # so c must not chain its w onto a's y either.
    run_prefill(mgr, "c", z + y + w + [0])
    assert mgr.match_prefix(x + y + w + [0]).block_ids == mgr.block_table("a")[:2]
    mgr.check_integrity()


def test_claimed_prefix_blocks_are_never_evicted_for_the_same_request():
    mgr = KVCacheManager(4, BS)
    run_prefill(mgr, "a", [1] * 8)
    mgr.free("a")  # a's blocks are now the least recently freed
    run_prefill(mgr, "b", [2] * 8)
    b_table = mgr.block_table("b")
    mgr.free("b")
    match = mgr.match_prefix([1] * 8 + [5])
    # Eviction must skip the claimed blocks (least recently freed) and take b's tail.
    assert mgr.allocate("c", 12, match) == match.block_ids + [b_table[1]]
    mgr.check_integrity()


def test_check_integrity_detects_reference_leak():
    mgr = KVCacheManager(4, BS)
    mgr.allocate("a", 4)
    mgr.pool.touch([3])  # a reference no request accounts for
    with pytest.raises(AssertionError, match="block 3: pool ref 1 but requests hold 0"):
        mgr.check_integrity()


def test_reset_prefix_cache_through_manager():
    mgr = KVCacheManager(4, BS)
    run_prefill(mgr, "a", list(range(9)))
    assert not mgr.reset_prefix_cache()
    mgr.free("a")
    assert mgr.reset_prefix_cache()
    batch = mgr.take_events()
    assert batch is not None and batch.events[-1] == AllBlocksCleared()
    assert mgr.match_prefix(list(range(9))).num_tokens == 0


# ------------------------------------------------------------------ stateful property test


def weak_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Ignores the parent and has 16 values: frequent collisions across tokens and across
    prefixes. Correctness must not depend on the hash."""
    return hash_block(None, tokens) % 16


PREFIXES = [[], [1, 2, 3, 1], [1, 2, 3, 1, 2, 2, 3, 1, 0], [3] * 10]


class KVManagerMachine(RuleBasedStateMachine):
    """Random requests sharing prefixes, chunked prefill, decode, preemption, abort and cache
    resets. A shadow of the KV tensor records, per slot, the token sequence whose KV it holds;
    every prefix hit must return blocks holding exactly the matched prefix, and the model never
    writes a block that is shared or cached."""

    HASH_FN = staticmethod(hash_block)
    NUM_BLOCKS = 12

    def __init__(self) -> None:
        super().__init__()
        self.mgr = KVCacheManager(self.NUM_BLOCKS, BS, worker_id="w", hash_fn=self.HASH_FN)
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.slots: dict[int, tuple[int, ...]] = {}  # slot -> the prefix its KV belongs to
        self.next_id = 0
        self.next_seq = 0
        self.router_view: set[int] = set()

    # -- helpers

    def _write_kv(self, rid: str, start: int, end: int) -> None:
        table = self.mgr.block_table(rid)
        seq = self.tokens[rid]
        for pos in range(start, end):
            block = table[pos // BS]
            assert self.mgr.pool.ref_count(block) == 1, "writing into a shared block"
            assert self.mgr.pool.block_hash(block) is None, "writing into a cached block"
            self.slots[block * BS + pos % BS] = tuple(seq[: pos + 1])

    def _check_match(self, tokens: list[int], match: PrefixMatch) -> None:
        assert match.num_tokens == len(match.block_ids) * BS < max(len(tokens), 1)
        for i, block in enumerate(match.block_ids):
            for off in range(BS):
                pos = i * BS + off
                assert self.slots.get(block * BS + off) == tuple(tokens[: pos + 1])

    def _step(self, rid: str, target: int) -> None:
        """Allocate up to `target` tokens, compute them, commit; preempt if out of blocks."""
        if self.mgr.allocate(rid, target) is None:
            self.mgr.free(rid)
            del self.tokens[rid], self.computed[rid]
            return
        self._write_kv(rid, self.computed[rid], target)
        self.computed[rid] = target
        self.mgr.commit(rid, self.tokens[rid], target)

    # -- rules

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 3), min_size=1, max_size=10),
        chunk=st.integers(1, 12),
    )
    def add_request(self, prefix: list[int], suffix: list[int], chunk: int) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        tokens = prefix + suffix
        free_before = self.mgr.num_free_blocks
        match = self.mgr.match_prefix(tokens)
        self._check_match(tokens, match)
        target = min(len(tokens), match.num_tokens + chunk)
        if self.mgr.allocate(rid, target, match) is None:
            assert self.mgr.num_free_blocks == free_before
            assert self.mgr.block_table(rid) == []
            return
        assert self.mgr.block_table(rid)[: len(match.block_ids)] == match.block_ids
        self.tokens[rid] = tokens
        self.computed[rid] = match.num_tokens
        self._write_kv(rid, match.num_tokens, target)
        self.computed[rid] = target
        self.mgr.commit(rid, tokens, target)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), chunk=st.integers(1, 12), new_token=st.integers(0, 3))
    def advance(self, data: st.DataObject, chunk: int, new_token: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        if self.computed[rid] < len(self.tokens[rid]):  # (chunked) prefill
            self._step(rid, min(len(self.tokens[rid]), self.computed[rid] + chunk))
        else:  # decode: sample a token, compute its KV next step
            self.tokens[rid].append(new_token)
            self._step(rid, len(self.tokens[rid]))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), twice=st.booleans())
    def finish_or_abort(self, data: st.DataObject, twice: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.mgr.free(rid)
        if twice:
            self.mgr.free(rid)
        del self.tokens[rid], self.computed[rid]

    @rule()
    def free_unknown(self) -> None:
        self.mgr.free("unknown")

    @rule()
    def reset_prefix_cache(self) -> None:
        assert self.mgr.reset_prefix_cache() == (not self.tokens)

    @rule()
    def consume_events(self) -> None:
        batch = self.mgr.take_events()
        if batch is None:
            return
        assert batch.seq == self.next_seq and batch.worker_id == "w"
        self.next_seq += 1
        for event in batch.events:
            if isinstance(event, BlockStored):
                assert len(event.token_ids) == len(event.block_hashes) * BS
                for h in event.block_hashes:
                    assert h not in self.router_view, "duplicate BlockStored"
                    self.router_view.add(h)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self.router_view.remove(h)
            else:
                self.router_view.clear()
        # A consumer that applied every batch mirrors the worker's cache exactly.
        assert self.router_view == set(self.mgr.pool.hash_to_block)

    # -- invariants

    @invariant()
    def integrity(self) -> None:
        self.mgr.check_integrity()
        assert self.mgr.num_requests == len(self.tokens)

    def teardown(self) -> None:
        for rid in list(self.tokens):
            self.mgr.free(rid)
        self.mgr.check_integrity()
        assert self.mgr.num_free_blocks == self.mgr.num_blocks
        assert self.mgr.usage == 0.0 and self.mgr.num_requests == 0
        self.consume_events()


class WeakHashKVManagerMachine(KVManagerMachine):
    HASH_FN = staticmethod(weak_hash)


_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVManagerStateful = KVManagerMachine.TestCase
TestKVManagerStateful.settings = _SETTINGS
TestKVManagerWeakHashStateful = WeakHashKVManagerMachine.TestCase
TestKVManagerWeakHashStateful.settings = _SETTINGS
