"""The physical KV blocks of one worker: reference counts, the free queue and the prefix cache.

Block ids are indexes into the worker's KV tensor (`kvcache.layout`). Every block is in exactly
one of three states:

    in use          ref > 0        may also be cached (its hash is in `hash_to_block`)
    free, uncached  ref == 0       in the uncached free set; content is garbage
    free, cached    ref == 0       in the evictable LRU; content is still valid and can be
                                   revived by `touch` (a prefix-cache hit)

Allocation (`get_new_blocks`) takes free uncached blocks first, lowest id first, and only then
evicts free cached blocks, least recently freed first. Lowest-id-first keeps the blocks handed
out in one call consecutive whenever the free set allows it (a fresh pool always does), and
consecutive ids are one contiguous region of the KV tensor, so a whole prefill's KV can move to
another worker as a few large transfers instead of one per block (`layout.contiguous_runs`).
The returned list is sorted for the same reason.

Cache entries. Each registration of a block in the prefix cache gets an entry id that is never
reused. A cached block records its hash, its token ids and the entry id of its parent block's
registration (NO_PARENT for the first block of a sequence). A lookup hits only if hash, tokens
and parent entry all match, so a 64-bit hash collision, or a parent that was evicted and its
hash re-registered with other content, is a miss rather than wrong KV: a hit means the block
holds the KV of exactly the prefix the caller matched so far, whatever the hash function.

Ownership: the pool never frees on its own. Whoever got a block from `get_new_blocks` or
`touch` holds one reference and must give it back with `free_blocks`. Not thread-safe.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

NO_PARENT = 0  # parent entry id of the first block of a sequence; real entry ids start at 1


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching

        self._ref = [0] * num_blocks
        # Cache metadata, per block; all None / 0 while the block is not cached.
        self._hash: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._parent_entry = [NO_PARENT] * num_blocks
        self._entry = [0] * num_blocks  # 0: not cached
        self._next_entry = 1
        self.hash_to_block: dict[int, int] = {}

        # Free uncached blocks: a min-heap of ids with lazy deletion. `_uncached_free[b]` is the
        # truth; the heap holds every such id at least once plus stale ids (removed by `touch`),
        # which are skipped when popped and dropped when the heap is rebuilt.
        self._uncached_free = bytearray(b"\x01") * num_blocks
        self._num_uncached_free = num_blocks
        self._heap = list(range(num_blocks))  # sorted, hence a valid heap
        # Free cached blocks, least recently freed first. Values unused.
        self._evictable: OrderedDict[int, None] = OrderedDict()

        self._events: list[KVEvent] = []

    # ---------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref 0, cached or not: all of them can be handed out."""
        return self._num_uncached_free + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of blocks with ref > 0."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The hash the block is cached under, or None if it is not cached."""
        return self._hash[block_id]

    def entry_id(self, block_id: int) -> int:
        """The id of the block's current cache registration, 0 if it is not cached."""
        return self._entry[block_id]

    def get_cached_block(
        self,
        block_hash: int,
        token_ids: Sequence[int],
        parent_entry: int | None = None,
    ) -> int | None:
        """The block cached under `block_hash` if it holds exactly `token_ids` (and, unless
        `parent_entry` is None, follows that parent entry); None otherwise. Takes no reference:
        call `touch` before anything else can evict the block."""
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None:
            return None
        if self._tokens[block_id] != tuple(token_ids):
            return None  # hash collision
        if parent_entry is not None and self._parent_entry[block_id] != parent_entry:
            return None  # same block content after a different (or re-registered) prefix
        return block_id

    # ---------------------------------------------------------------- allocation

    def get_new_blocks(self, num_blocks: int) -> list[int]:
        """Hand out `num_blocks` free blocks, each with ref 1, sorted by id.

        Uncached blocks go first (lowest id first), then cached ones are evicted in least
        recently freed order, recording one BlockRemoved for their hashes. Raises ValueError
        if fewer than `num_blocks` are free; nothing changes then.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be non-negative, got {num_blocks}")
        if num_blocks > self.num_free_blocks:
            raise ValueError(
                f"cannot allocate {num_blocks} blocks: only {self.num_free_blocks} are free"
            )
        blocks: list[int] = []
        while len(blocks) < num_blocks and self._num_uncached_free:
            block_id = heapq.heappop(self._heap)
            if self._uncached_free[block_id]:
                self._uncached_free[block_id] = 0
                self._num_uncached_free -= 1
                blocks.append(block_id)
        evicted: list[int] = []
        while len(blocks) < num_blocks:
            block_id, _ = self._evictable.popitem(last=False)
            evicted.append(self._uncache(block_id))
            blocks.append(block_id)
        if evicted:
            blocks.sort()
            self._events.append(BlockRemoved(block_hashes=evicted))
        for block_id in blocks:
            self._ref[block_id] = 1
        return blocks

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block. A free block leaves the free queue; a free
        cached block keeps its content (this is how a prefix-cache hit is claimed). Raises
        IndexError, changing nothing, for an id outside the pool."""
        block_ids = self._checked(block_ids)
        for block_id in block_ids:
            if self._ref[block_id] == 0:
                if self._entry[block_id]:
                    del self._evictable[block_id]
                else:
                    # Its heap entry goes stale; get_new_blocks skips it.
                    self._uncached_free[block_id] = 0
                    self._num_uncached_free -= 1
            self._ref[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per occurrence. Blocks reaching ref 0 join the free queue in the
        given order: a cached block goes to the evictable tail (evicted after every block freed
        before it), an uncached one to the uncached free set. Raises ValueError (IndexError for
        an id outside the pool), changing nothing, if any block would drop below ref 0."""
        block_ids = self._checked(block_ids)
        for block_id, count in Counter(block_ids).items():
            if self._ref[block_id] < count:
                raise ValueError(
                    f"block {block_id} freed {count} time(s) but has ref {self._ref[block_id]}"
                )
        for block_id in block_ids:
            self._ref[block_id] -= 1
            if self._ref[block_id] == 0:
                if self._entry[block_id]:
                    self._evictable[block_id] = None
                else:
                    self._push_uncached(block_id)

    # ---------------------------------------------------------------- prefix cache

    def cache_block(
        self,
        block_id: int,
        block_hash: int,
        parent_hash: int | None,
        token_ids: Sequence[int],
        parent_entry: int = NO_PARENT,
    ) -> int | None:
        """Register the full, in-use block `block_id` as holding `token_ids` after the prefix
        whose last block is entry `parent_entry` (hash `parent_hash`; NO_PARENT / None for the
        first block of a sequence).

        Returns the entry id that now stands for this content, for chaining the next block:
        - the block's new entry, recording a BlockStored event;
        - if `block_hash` is already mapped to a block with the same tokens and parent, that
          block's entry (the existing mapping is kept, no event; this block stays uncached);
        - None if the hash is mapped to different content (a collision: the caller must not
          chain further blocks onto this one), or caching is disabled.
        Registering a block again with the same content returns its entry unchanged; with
        different content it raises ValueError, as does a free block or a wrong token count.
        """
        self._checked((block_id,))
        tokens = tuple(token_ids)
        if len(tokens) != self.block_size:
            raise ValueError(f"a cached block holds {self.block_size} tokens, got {len(tokens)}")
        if self._ref[block_id] == 0:
            raise ValueError(f"block {block_id} is free; only blocks in use can be cached")
        if not self.enable_caching:
            return None
        if self._entry[block_id]:
            if (self._hash[block_id], self._tokens[block_id], self._parent_entry[block_id]) != (
                block_hash,
                tokens,
                parent_entry,
            ):
                raise ValueError(f"block {block_id} is already cached with other content")
            return self._entry[block_id]
        existing = self.hash_to_block.get(block_hash)
        if existing is not None:
            if self._tokens[existing] == tokens and self._parent_entry[existing] == parent_entry:
                return self._entry[existing]
            return None
        entry = self._next_entry
        self._next_entry += 1
        self._hash[block_id] = block_hash
        self._tokens[block_id] = tokens
        self._parent_entry[block_id] = parent_entry
        self._entry[block_id] = entry
        self.hash_to_block[block_hash] = block_id
        self._record_stored(block_hash, parent_hash, tokens)
        return entry

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Only possible when no block is in use: returns False and
        changes nothing otherwise. Records AllBlocksCleared (when caching is enabled)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block_id in self.hash_to_block.values():
            self._clear_metadata(block_id)
        self.hash_to_block.clear()
        self._evictable.clear()
        self._uncached_free = bytearray(b"\x01") * self.num_blocks
        self._num_uncached_free = self.num_blocks
        self._heap = list(range(self.num_blocks))
        if self.enable_caching:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call, oldest first; the caller owns the list."""
        events, self._events = self._events, []
        return events

    # ---------------------------------------------------------------- integrity

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant. O(num_blocks); for tests and
        debug builds. Explicit raises so it also works under `python -O`."""

        def fail(msg: str) -> None:
            raise AssertionError(f"BlockPool integrity: {msg}")

        heap_ids = set(self._heap)
        entries: set[int] = set()
        for b in range(self.num_blocks):
            ref, cached = self._ref[b], self._entry[b] != 0
            in_uncached, in_evictable = bool(self._uncached_free[b]), b in self._evictable
            if ref < 0:
                fail(f"block {b} has negative ref {ref}")
            if ref > 0 and (in_uncached or in_evictable):
                fail(f"block {b} has ref {ref} but is in the free queue")
            if ref == 0 and in_uncached == in_evictable:
                fail(f"free block {b}: uncached-free={in_uncached}, evictable={in_evictable}")
            if in_uncached and cached:
                fail(f"block {b} is cached but in the uncached free set")
            if in_evictable and not cached:
                fail(f"block {b} is evictable but not cached")
            if in_uncached and b not in heap_ids:
                fail(f"free block {b} is missing from the free heap")
            if cached:
                h = self._hash[b]
                if h is None or self.hash_to_block.get(h) != b:
                    fail(f"cached block {b} (hash {h}) is not what its hash maps to")
                tokens = self._tokens[b]
                if tokens is None or len(tokens) != self.block_size:
                    fail(f"cached block {b} does not hold {self.block_size} tokens")
                if self._entry[b] in entries or self._entry[b] >= self._next_entry:
                    fail(f"cached block {b} has a duplicate or future entry {self._entry[b]}")
                entries.add(self._entry[b])
            elif (self._hash[b], self._tokens[b], self._parent_entry[b]) != (None, None, NO_PARENT):
                fail(f"uncached block {b} keeps cache metadata")
        if len(self.hash_to_block) != len(entries):
            fail(f"{len(self.hash_to_block)} hashes mapped but {len(entries)} blocks cached")
        if self._num_uncached_free != sum(self._uncached_free):
            fail(f"uncached free count {self._num_uncached_free} is stale")
        if not self.enable_caching and self.hash_to_block:
            fail("caching is disabled but blocks are cached")

    # ---------------------------------------------------------------- internals

    def _checked(self, block_ids: Iterable[int]) -> list[int]:
        # Validate before mutating so a bad id changes nothing (and -1 never wraps around).
        block_ids = list(block_ids)
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise IndexError(f"block id {block_id} is outside [0, {self.num_blocks})")
        return block_ids

    def _push_uncached(self, block_id: int) -> None:
        self._uncached_free[block_id] = 1
        self._num_uncached_free += 1
        heapq.heappush(self._heap, block_id)
        # Stale ids (left by touch) are bounded: rebuild when they outnumber the live ones.
        if len(self._heap) > 2 * self.num_blocks:
            self._heap = [b for b in range(self.num_blocks) if self._uncached_free[b]]

    def _uncache(self, block_id: int) -> int:
        """Drop the block's cache registration; return the hash it had."""
        block_hash = self._hash[block_id]
        assert block_hash is not None
        del self.hash_to_block[block_hash]
        self._clear_metadata(block_id)
        return block_hash

    def _clear_metadata(self, block_id: int) -> None:
        self._hash[block_id] = None
        self._tokens[block_id] = None
        self._parent_entry[block_id] = NO_PARENT
        self._entry[block_id] = 0

    def _record_stored(
        self, block_hash: int, parent_hash: int | None, tokens: tuple[int, ...]
    ) -> None:
        # Coalesce a chain stored in one step (one commit of a prefill) into one event.
        last = self._events[-1] if self._events else None
        if (
            isinstance(last, BlockStored)
            and last.block_size == self.block_size
            and parent_hash is not None
            and last.block_hashes[-1] == parent_hash
        ):
            last.block_hashes.append(block_hash)
            last.token_ids.extend(tokens)
            return
        self._events.append(
            BlockStored(
                block_hashes=[block_hash],
                parent_hash=parent_hash,
                token_ids=list(tokens),
                block_size=self.block_size,
            )
        )
