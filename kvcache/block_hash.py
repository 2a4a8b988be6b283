"""Chained block hashes: the prefix-cache key shared by workers and the router.

A full block of `block_size` tokens is named by `hash_block(parent_hash, token_ids)`, where
`parent_hash` is the hash of the block before it (None for the first block of a sequence). The
hash of block i therefore depends on every token of blocks 0..i, so equal hashes mean equal
prefixes (up to 64-bit collisions, which the worker re-checks; the router does not need to).

The router hashes prompts itself and compares with the hashes in workers' `BlockStored` events,
so the function must give the same value in every process, on every host and under every
Python version: it uses blake2b over a fixed byte encoding, never Python's salted `hash()`.
Changing the encoding is a wire-format change: bump `HASH_SCHEME` and the events version.

Encoding (HASH_SCHEME 1): blake2b(digest_size=8, person=b"pdserve.kv.v1") over
    parent (8 bytes, little-endian unsigned) || token ids (little-endian int64 each),
and the digest is read as a little-endian unsigned 64-bit integer.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

HASH_SCHEME = 1
_PERSON = b"pdserve.kv.v1"

# The parent of the first block of every sequence. Derived, not chosen, so it is as unlikely as
# any other value to equal a real block hash.
NONE_HASH: int = int.from_bytes(
    hashlib.blake2b(b"pdserve.kvcache.root", digest_size=8, person=_PERSON).digest(), "little"
)

# (parent_hash, token_ids) -> 64-bit hash. KVCacheManager takes one so tests can inject a weak,
# colliding function; production always uses `hash_block`.
HashFn = Callable[[int | None, Sequence[int]], int]


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """The 64-bit hash of a block of `token_ids` following the block hashed `parent_hash`.

    `parent_hash=None` means "first block" and is the same as passing NONE_HASH. Raises
    OverflowError / struct.error for a parent outside [0, 2**64) or a token outside int64.
    """
    parent = NONE_HASH if parent_hash is None else parent_hash
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    h.update(parent.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little")


def hash_prompt_blocks(
    token_ids: Sequence[int], block_size: int, parent: int | None = None
) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block is skipped).

    `parent` is the hash of the block before `token_ids[0]` (None: they start a sequence).
    Element i equals the hash a worker reports for the block holding tokens
    [i * block_size, (i + 1) * block_size) of the same sequence.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
