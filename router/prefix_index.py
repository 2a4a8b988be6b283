"""The router's view of which KV blocks each worker holds, fed by the workers' KV events.

Each worker's events carry a monotonic sequence number per batch. A gap means lost events, so
the index for that worker can no longer be trusted: `apply` says so and the caller asks the
worker for a full snapshot (`resync`). Pure Python, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch


class PrefixIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, set[int]] = {}
        self._next_seq: dict[str, int] = {}
        self.gaps = 0  # cumulative, for metrics

    def workers(self) -> list[str]:
        return list(self._blocks)

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply one batch. Returns False (and applies nothing) when a gap was detected; the
        worker's index is then stale until `resync`."""
        wid = batch.worker_id
        expected = self._next_seq.get(wid)
        if expected is not None and batch.seq != expected:
            if batch.seq < expected:
                return True  # a duplicate or replay: already applied
            self.gaps += 1
            self._next_seq.pop(wid, None)  # stale until resync
            return False
        if expected is None and wid in self._blocks:
            return False  # waiting for a resync after a gap
        blocks = self._blocks.setdefault(wid, set())
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                blocks.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                blocks.difference_update(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                blocks.clear()
        self._next_seq[wid] = batch.seq + 1
        return True

    def resync(self, worker_id: str, block_hashes: Iterable[int], next_seq: int) -> None:
        """Replace a worker's view with a full snapshot taken just before event `next_seq`."""
        self._blocks[worker_id] = set(block_hashes)
        self._next_seq[worker_id] = next_seq

    def needs_resync(self, worker_id: str) -> bool:
        return worker_id in self._blocks and worker_id not in self._next_seq

    def remove_worker(self, worker_id: str) -> None:
        self._blocks.pop(worker_id, None)
        self._next_seq.pop(worker_id, None)

    def match(self, worker_id: str, prompt_block_hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt the worker holds (chained hashes: a block can
        only be reused if every block before it is, so stop at the first miss)."""
        blocks = self._blocks.get(worker_id)
        if not blocks or self.needs_resync(worker_id):
            return 0
        n = 0
        for h in prompt_block_hashes:
            if h not in blocks:
                break
            n += 1
        return n
