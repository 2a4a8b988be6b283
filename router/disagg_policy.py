"""Where a request runs: a pure function of a snapshot.

`decide(...)` picks the decode worker by cost, then whether its prefill runs locally on that
worker or remotely on a prefill worker, and which one. Inputs are plain snapshots; randomness
(tie-breaking) is injected, so every decision is reproducible in tests. Weights and thresholds
come from `DisaggConfig` (flags or a JSON config file).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple


@dataclass(frozen=True)
class WorkerSnapshot:
    worker_id: str
    role: str  # "prefill" | "decode" | "both"
    num_running: int  # requests decoding / computing now
    num_waiting: int  # requests queued in the worker (for a prefill worker: its prefill queue)
    kv_usage: float  # 0..1
    prefix_hit_blocks: int  # leading blocks of this prompt the worker already holds
    max_num_seqs: int = 64
    # prompt tokens the router has sent it to prefill (locally or for another worker) that
    # have not produced their first token yet: its prefill backlog
    prefill_backlog_tokens: int = 0


@dataclass(frozen=True)
class DisaggConfig:
    # decode worker cost = prefill_block_weight * (blocks it would still have to fill
    #                                            + blocks of its prefill backlog)
    #                    + running_weight * running + waiting_weight * waiting
    #                    + kv_usage_weight * kv_usage
    prefill_block_weight: float = 1.0
    running_weight: float = 1.0
    waiting_weight: float = 2.0
    kv_usage_weight: float = 16.0
    # prefill worker cost = queue_weight * queued - hit_weight * blocks it already holds
    queue_weight: float = 8.0
    hit_weight: float = 1.0
    # prefill locally when at most this many prompt tokens are left after the decode worker's
    # prefix hit: shipping KV for a short prompt costs more than computing it.
    local_prefill_max_tokens: int = 512
    # a prefill worker with this many queued requests has no room
    prefill_queue_saturation: int = 4
    # a long prompt goes to a prefill worker only while its backlog plus the prompt is at most
    # this many tokens more than the decode worker's own backlog plus the prompt: the price
    # (in prefill tokens) paid to keep long prefills out of decode steps. Past it the decode
    # worker gets the first token out sooner itself. To a `both` worker (which decodes too) a
    # prompt moves only when it starts at least this many tokens sooner there.
    remote_prefill_slack_tokens: int = 1024
    # a decode worker with at least this fraction of max_num_seqs running is busy: even a short
    # prefill goes remote so its decodes are not stalled
    decode_busy_fraction: float = 0.75
    mode: str = "conditional"  # "conditional" | "always" (remote when possible) | "never"

    @classmethod
    def from_file(cls, path: str | Path) -> DisaggConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown disaggregation settings {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)


class Decision(NamedTuple):
    decode_worker: str
    prefill_worker: str | None  # None: prefill locally on the decode worker
    decision: str  # metric label: "local_short", "local_saturated", "local_no_prefill",
    #                "local_mode", "local_sooner", "remote_long", "remote_decode_busy",
    #                "remote_mode"; the router adds "local_prompt_logprobs"
    inputs: dict  # what the decision saw, for the debug log


def decode_cost(w: WorkerSnapshot, prompt_blocks: int, block_size: int, cfg: DisaggConfig) -> float:
    missing = max(prompt_blocks - w.prefix_hit_blocks, 0)
    backlog_blocks = w.prefill_backlog_tokens / max(block_size, 1)
    return (
        cfg.prefill_block_weight * (missing + backlog_blocks)
        + cfg.running_weight * w.num_running
        + cfg.waiting_weight * w.num_waiting
        + cfg.kv_usage_weight * w.kv_usage
    )


def prefill_cost(w: WorkerSnapshot, cfg: DisaggConfig) -> float:
    # its prefill queue only: a `both` worker's running decodes do not delay a prefill
    return cfg.queue_weight * w.num_waiting - cfg.hit_weight * w.prefix_hit_blocks


def _argmin(workers: Sequence[WorkerSnapshot], key, rng: random.Random) -> WorkerSnapshot:
    best = min(key(w) for w in workers)
    tied = sorted((w for w in workers if key(w) == best), key=lambda w: w.worker_id)
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def decide(
    prompt_tokens: int,
    block_size: int,
    decode_workers: Sequence[WorkerSnapshot],
    prefill_workers: Sequence[WorkerSnapshot],
    cfg: DisaggConfig,
    rng: random.Random,
) -> Decision:
    """Raises ValueError when there is no decode-capable worker at all."""
    if not decode_workers:
        raise ValueError("no decode-capable worker is available")
    prompt_blocks = prompt_tokens // block_size
    d = _argmin(decode_workers, lambda w: decode_cost(w, prompt_blocks, block_size, cfg), rng)
    left = prompt_tokens - d.prefix_hit_blocks * block_size
    busy = d.num_running >= cfg.decode_busy_fraction * d.max_num_seqs or d.num_waiting > 0
    inputs = {
        "prompt_tokens": prompt_tokens,
        "block_size": block_size,
        "decode": d.worker_id,
        "decode_hit_blocks": d.prefix_hit_blocks,
        "tokens_left": left,
        "decode_running": d.num_running,
        "decode_waiting": d.num_waiting,
        "decode_busy": busy,
        "decode_backlog_tokens": d.prefill_backlog_tokens,
    }
    candidates = [p for p in prefill_workers if p.worker_id != d.worker_id]
    if not candidates:
        return Decision(d.worker_id, None, "local_no_prefill", inputs)
    if cfg.mode == "never":
        return Decision(d.worker_id, None, "local_mode", inputs)
    p = _argmin(candidates, lambda w: prefill_cost(w, cfg), rng)
    inputs.update(
        prefill=p.worker_id,
        prefill_queue=p.num_waiting,
        prefill_hit_blocks=p.prefix_hit_blocks,
        prefill_backlog_tokens=p.prefill_backlog_tokens,
    )
    if cfg.mode == "always":
        return Decision(d.worker_id, p.worker_id, "remote_mode", inputs)
    if p.num_waiting >= cfg.prefill_queue_saturation:
        return Decision(d.worker_id, None, "local_saturated", inputs)
    if left > cfg.local_prefill_max_tokens:
        remote_wait = p.prefill_backlog_tokens + prompt_tokens - p.prefix_hit_blocks * block_size
        local_wait = d.prefill_backlog_tokens + left
        slack = cfg.remote_prefill_slack_tokens
        # a dedicated prefill worker gets the prompt unless it is `slack` tokens later; a
        # `both` worker decodes too (moving the prefill there protects nobody's decodes), so
        # it gets the prompt only when it is `slack` tokens sooner (that pays the transfer)
        sooner = (
            remote_wait <= local_wait + slack
            if p.role == "prefill"
            else (remote_wait + slack <= local_wait)
        )
        if not sooner:
            return Decision(d.worker_id, None, "local_sooner", inputs)
        return Decision(d.worker_id, p.worker_id, "remote_long", inputs)
    if busy and left > 1:
        return Decision(d.worker_id, p.worker_id, "remote_decode_busy", inputs)
    return Decision(d.worker_id, None, "local_short", inputs)
