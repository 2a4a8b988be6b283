"""Per-request KV block tables on top of the block pool, with prefix caching.

The scheduler's whole view of KV memory. Requests are plain `request_id` strings (this module
must not depend on the engine). The intended call pattern per scheduled request:

    match = mgr.match_prefix(tokens)             # first scheduling only, right before allocate
    new_ids = mgr.allocate(rid, n_total, match)  # None: not enough blocks, nothing changed
    ... the model computes KV for tokens [num_computed, n_total) ...
    mgr.commit(rid, tokens, n_total)             # cache the blocks that became full
    mgr.free(rid)                                # finished, aborted or preempted

Ownership: a request holds exactly one pool reference on each block of its table, from
`allocate` until `free`. Prefix blocks are shared (several requests reference them); a block is
written only by the request that got it from the pool fresh, and only before it is full, so
shared blocks are read-only. Not thread-safe: one manager per engine loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kvcache.block_hash import HashFn, hash_block
from kvcache.block_pool import NO_PARENT, BlockPool
from kvcache.events import KVEventBatch


class PrefixMatch(NamedTuple):
    """Cached full blocks covering the first `num_tokens` tokens of a sequence.

    `entry_ids` names the exact cache registrations matched; `allocate` uses it to reject a
    match gone stale (a block evicted or re-cached since `match_prefix`). Build one only with
    `match_prefix`.
    """

    block_ids: list[int]
    num_tokens: int
    entry_ids: tuple[int, ...] = ()


@dataclass
class _RequestBlocks:
    # Invariant: len(block_hashes) == len(chain) <= len(block_ids); block i's KV is committed
    # and cached (here or in an identical block) for i < len(chain).
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    chain: list[int] = field(default_factory=list)  # cache entry standing for each block
    cacheable: bool = True  # False after a hash collision: later blocks are never cached


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        worker_id: str = "worker",
        hash_fn: HashFn = hash_block,
    ) -> None:
        """`hash_fn` exists so tests can inject a colliding function; correctness does not
        depend on it (hits are re-checked token by token), only the router's view does."""
        self.pool = BlockPool(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.worker_id = worker_id
        self.hash_fn = hash_fn
        self._requests: dict[str, _RequestBlocks] = {}
        self._event_seq = 0
        # Metrics, in tokens: hit rate = prefix_cache_hits / prefix_cache_queries.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---------------------------------------------------------------- queries

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block ids in sequence order ([] for an unknown request)."""
        req = self._requests.get(request_id)
        return list(req.block_ids) if req else []

    def blocks_needed(
        self, request_id: str, num_total_tokens: int, prefix: PrefixMatch | None = None
    ) -> int:
        """Fresh blocks `allocate(request_id, num_total_tokens, prefix)` would take from the
        pool (prefix blocks excluded). It may still fail: claiming free cached prefix blocks
        also removes them from the free pool."""
        req = self._requests.get(request_id)
        have = len(req.block_ids) if req else len(prefix.block_ids) if prefix else 0
        return max(0, _cdiv(num_total_tokens, self.block_size) - have)

    # ---------------------------------------------------------------- prefix cache

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """The longest chain of cached full blocks that starts `token_ids`, never covering its
        last token (the model must compute at least one position to produce logits).

        Takes no references: pass the result to `allocate` before any other allocate/free.
        Statistics are not counted here (a request may be matched on several scheduling
        attempts before it fits): the caller reports admitted lookups to `record_query`.
        """
        if not self.enable_prefix_caching or not token_ids:
            return PrefixMatch([], 0)  # fresh: callers may own the list
        bs = self.block_size
        block_ids: list[int] = []
        entry_ids: list[int] = []
        parent_hash: int | None = None
        parent_entry = NO_PARENT
        for i in range((len(token_ids) - 1) // bs):
            tokens = token_ids[i * bs : (i + 1) * bs]
            parent_hash = self.hash_fn(parent_hash, tokens)
            block_id = self.pool.get_cached_block(parent_hash, tokens, parent_entry)
            if block_id is None:
                break
            parent_entry = self.pool.entry_id(block_id)
            block_ids.append(block_id)
            entry_ids.append(parent_entry)
        return PrefixMatch(block_ids, len(block_ids) * bs, tuple(entry_ids))

    def record_query(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted prefix lookup (in tokens) for the hit-rate metrics."""
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---------------------------------------------------------------- allocation

    def allocate(
        self, request_id: str, num_total_tokens: int, prefix: PrefixMatch | None = None
    ) -> list[int] | None:
        """Grow the request's block table to cover `num_total_tokens` tokens.

        On the request's first allocation, `prefix` (from `match_prefix`, immediately before)
        is claimed: one reference per block, placed at the front of the table; the caller
        then starts computing at `prefix.num_tokens`. A prefix on a later call is an error.

        Returns the block ids appended to the table by this call (claimed prefix blocks first,
        then fresh ones; [] if it already covered `num_total_tokens`), or None, changing
        nothing, if the pool cannot supply them. Raises ValueError for a stale or foreign
        prefix.
        """
        if num_total_tokens < 0:
            raise ValueError(f"num_total_tokens must be non-negative, got {num_total_tokens}")
        req = self._requests.get(request_id)
        if prefix is None and req is not None and len(req.block_ids) * self.block_size >= num_total_tokens:
            return []  # already covered: most decode steps
        prefix_ids: list[int] = []
        if prefix is not None and prefix.block_ids:
            if req is not None:
                raise ValueError(f"request {request_id!r} already has blocks; prefix must be None")
            self._check_prefix(prefix, num_total_tokens)
            prefix_ids = list(prefix.block_ids)
        have = len(req.block_ids) if req else len(prefix_ids)
        num_new = max(0, _cdiv(num_total_tokens, self.block_size) - have)
        # Free cached prefix blocks are counted as free, but claiming them takes them out of
        # the pool: they are not available for the fresh blocks too.
        claimed_free = sum(1 for b in set(prefix_ids) if self.pool.ref_count(b) == 0)
        if num_new > self.pool.num_free_blocks - claimed_free:
            return None
        if req is None:
            req = self._requests[request_id] = _RequestBlocks()
        # touch before get_new_blocks, so eviction cannot pick a claimed prefix block.
        self.pool.touch(prefix_ids)
        new_ids = self.pool.get_new_blocks(num_new)
        if prefix_ids:
            assert prefix is not None
            for block_id in prefix_ids:
                block_hash = self.pool.block_hash(block_id)
                assert block_hash is not None  # _check_prefix saw its cache entry
                req.block_hashes.append(block_hash)
            req.chain.extend(prefix.entry_ids)
        req.block_ids.extend(prefix_ids)
        req.block_ids.extend(new_ids)
        return prefix_ids + new_ids

    def _check_prefix(self, prefix: PrefixMatch, num_total_tokens: int) -> None:
        if not self.enable_prefix_caching:
            raise ValueError("prefix caching is disabled; prefix must be None")
        if (
            len(prefix.entry_ids) != len(prefix.block_ids)
            or prefix.num_tokens != len(prefix.block_ids) * self.block_size
        ):
            raise ValueError(f"{prefix} did not come from match_prefix")
        if prefix.num_tokens > num_total_tokens:
            raise ValueError(
                f"prefix covers {prefix.num_tokens} tokens, more than num_total_tokens "
                f"{num_total_tokens}"
            )
        for block_id, entry in zip(prefix.block_ids, prefix.entry_ids, strict=True):
            if self.pool.entry_id(block_id) != entry:
                raise ValueError(
                    f"stale prefix match: block {block_id} was evicted or re-cached since "
                    "match_prefix; call match_prefix right before allocate"
                )

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Record that KV for `token_ids[:num_computed_tokens]` is in the request's blocks:
        every block that became full is hashed (chained on the request's previous hash, so a
        step costs O(new full blocks)) and cached, recording BlockStored events.

        `token_ids` is the request's whole sequence (prompt + output so far). Raises KeyError
        for a request without blocks, ValueError if the computed tokens exceed the table or
        `token_ids`.
        """
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"commit for request {request_id!r}, which holds no blocks")
        bs = self.block_size
        if num_computed_tokens > len(token_ids) or num_computed_tokens > len(req.block_ids) * bs:
            raise ValueError(
                f"request {request_id!r}: {num_computed_tokens} computed tokens but "
                f"{len(token_ids)} tokens and {len(req.block_ids)} blocks of {bs}"
            )
        if not self.enable_prefix_caching or not req.cacheable:
            return
        for i in range(len(req.chain), num_computed_tokens // bs):
            parent_hash = req.block_hashes[-1] if i else None
            parent_entry = req.chain[-1] if i else NO_PARENT
            tokens = token_ids[i * bs : (i + 1) * bs]
            block_hash = self.hash_fn(parent_hash, tokens)
            entry = self.pool.cache_block(
                req.block_ids[i], block_hash, parent_hash, tokens, parent_entry
            )
            if entry is None:
                # Another block owns this hash with other content. Blocks after this one
                # would chain on a hash that names the wrong content: stop caching them.
                req.cacheable = False
                return
            req.block_hashes.append(block_hash)
            req.chain.append(entry)

    def free(self, request_id: str) -> None:
        """Release every reference the request holds; no-op for an unknown (or already freed)
        request. Blocks are freed last-first, so the tail of a sequence is evicted before its
        head and a shared prefix stays cached longest."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            self.pool.free_blocks(reversed(req.block_ids))

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; False (nothing done) while any request holds blocks."""
        return self.pool.reset_prefix_cache()

    # ---------------------------------------------------------------- events

    def take_events(self) -> KVEventBatch | None:
        """The cache events since the last call as one batch (seq +1 per batch), or None."""
        events = self.pool.take_events()
        if not events:
            return None
        batch = KVEventBatch(
            worker_id=self.worker_id, seq=self._event_seq, ts=time.time(), events=events
        )
        self._event_seq += 1
        return batch

    def snapshot(self) -> tuple[list[int], int]:
        """(every cached block hash, seq of the next event batch): what a consumer that
        missed events resyncs from. Pending events are reflected in the hashes, so they are
        dropped rather than sent."""
        self.pool.take_events()
        return list(self.pool.hash_to_block), self._event_seq

    # ---------------------------------------------------------------- integrity

    def check_integrity(self) -> None:
        """Pool integrity, plus: the pool's references are exactly the requests' (one per
        table entry); a request's committed blocks are cached as the entries of its chain (or
        not at all); its uncommitted blocks are private (ref 1) and uncached."""
        self.pool.check_integrity()
        held: Counter[int] = Counter()
        for rid, req in self._requests.items():
            if len(set(req.block_ids)) != len(req.block_ids):
                raise AssertionError(f"request {rid!r} holds a block twice: {req.block_ids}")
            if not len(req.block_hashes) == len(req.chain) <= len(req.block_ids):
                raise AssertionError(f"request {rid!r} has an inconsistent hash chain")
            for i, block_id in enumerate(req.block_ids):
                entry = self.pool.entry_id(block_id)
                if i < len(req.chain):
                    # Committed: cached as this very entry, or uncached because an identical
                    # block already held the hash.
                    if entry not in (0, req.chain[i]):
                        raise AssertionError(
                            f"request {rid!r} block {i} (id {block_id}) is cache entry "
                            f"{entry}, expected {req.chain[i]}"
                        )
                elif entry or self.pool.ref_count(block_id) != 1:
                    # Not committed yet: still being written, so private and uncached.
                    raise AssertionError(
                        f"request {rid!r} block {i} (id {block_id}) is uncommitted but cached "
                        f"(entry {entry}) or shared (ref {self.pool.ref_count(block_id)})"
                    )
            held.update(req.block_ids)
        for block_id in range(self.pool.num_blocks):
            if self.pool.ref_count(block_id) != held[block_id]:
                raise AssertionError(
                    f"block {block_id}: pool ref {self.pool.ref_count(block_id)} but requests "
                    f"hold {held[block_id]}"
                )
