"""KV-cache events: what a worker tells the router about its prefix cache.

A worker publishes one `KVEventBatch` per engine step that changed its cache. Consumers keep,
per worker, the set of block hashes it holds: `BlockStored` adds hashes, `BlockRemoved` removes
them, `AllBlocksCleared` empties the set. Hashes are `kvcache.block_hash` values, so a router
can hash a prompt itself and count how many leading blocks a worker already holds.

Ordering contract:
- `seq` starts at 0 when a worker's cache manager is created and increases by exactly 1 per
  batch. A consumer that sees a gap (seq > last + 1) has missed events and should treat its view
  of that worker as unreliable (e.g. drop it); seq <= last means the worker restarted.
- Within a batch, events are in the order the cache changed.
- A hash is stored at most once until it is removed (a worker never reports a duplicate).

Wire format: msgpack. Events are array-like tagged structs ([tag, field, ...]); new fields may
only be appended with defaults, which older decoders ignore. Anything else bumps
`KV_EVENTS_VERSION`, which every batch carries and `decode_event_batch` checks.
"""

from __future__ import annotations

import msgspec

KV_EVENTS_VERSION = 1


class BlockStored(msgspec.Struct, tag="stored", array_like=True):
    """Consecutive full blocks of one sequence became cached.

    block_hashes[0] follows `parent_hash` (None: the first block of a sequence), each next hash
    follows the previous one. `token_ids` holds len(block_hashes) * block_size tokens.
    """

    block_hashes: list[int]
    parent_hash: int | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, tag="removed", array_like=True):
    """These hashes were evicted (each was stored earlier and not removed since)."""

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, tag="cleared", array_like=True):
    """The worker dropped its whole prefix cache (reset_prefix_cache)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct):
    """The events of one worker step. Encoded as a map, so the header can evolve."""

    worker_id: str
    seq: int  # per worker, +1 per batch, from 0: a gap means lost events
    ts: float  # time.time() when the batch was taken
    events: list[KVEvent]
    version: int = KV_EVENTS_VERSION


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_event_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_event_batch(data: bytes) -> KVEventBatch:
    """Decode one batch. Raises ValueError (msgspec.DecodeError is one) on malformed input or a
    version this code does not understand."""
    batch = _decoder.decode(data)
    if batch.version != KV_EVENTS_VERSION:
        raise ValueError(
            f"KV event batch from {batch.worker_id!r} has version {batch.version}, "
            f"this consumer understands version {KV_EVENTS_VERSION}"
        )
    return batch
