"""A staggered, mixed workload for step-lookahead tests: greedy with logprobs, seeded top-p,
penalties with min_tokens, and short requests that stop early (some on EOS), arriving every few
steps so prefills, pure decode steps, finishes and arrivals interleave."""

from __future__ import annotations

import torch

from server.engine.engine import EngineCore
from server.engine.sampling_params import SamplingParams


def drive(eng: EngineCore, num_requests: int = 14, scale: int = 1) -> dict[str, tuple[list[int], list[float]]]:
    """Run the workload to completion; request id -> (tokens, logprobs of the chosen tokens).
    `scale` divides the output lengths (for slow CPU runs)."""
    gen = torch.Generator().manual_seed(0)
    plans = []  # (step at which it arrives, request id, prompt, params)
    for i in range(num_requests):
        n = int(torch.randint(3, 60, (1,), generator=gen))
        prompt = torch.randint(100, min(40000, eng.vocab_size), (n,), generator=gen).tolist()
        kinds = [
            SamplingParams(max_tokens=(24 + 3 * i) // scale, temperature=0.0, ignore_eos=True, logprobs=2),
            SamplingParams(max_tokens=40 // scale, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True),
            SamplingParams(max_tokens=30 // scale, temperature=0.0, repetition_penalty=1.3, min_tokens=5),
            SamplingParams(max_tokens=1 + i, temperature=0.0),  # stops early, some by EOS
        ]
        plans.append((5 * i // scale, f"r{i}", prompt, kinds[i % len(kinds)]))
    tokens: dict[str, list[int]] = {rid: [] for _, rid, _, _ in plans}
    logprobs: dict[str, list[float]] = {rid: [] for _, rid, _, _ in plans}
    step = 0
    while plans or eng.has_unfinished_requests():
        while plans and plans[0][0] <= step:
            _, rid, prompt, params = plans.pop(0)
            eng.add_request(rid, prompt, params)
        for o in eng.step():
            tokens[o.request_id] += o.new_token_ids
            logprobs[o.request_id] += [lp.logprob for lp in o.new_logprobs or []]
        step += 1
    return {rid: (tokens[rid], logprobs[rid]) for rid in tokens}


def drive_batch(eng: EngineCore, num_requests: int = 6) -> dict[str, tuple[list[int], list[float]]]:
    """Every request arrives at once and stops by length only (greedy with logprobs, seeded
    top-p), at different lengths: the steps' batches are the same whatever the engine stages
    or launches ahead, so the tokens must be too (with arrivals or early stops, step overlap
    may legitimately batch a step differently, and bf16 kernels differ by batch size)."""
    gen = torch.Generator().manual_seed(1)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    for i in range(num_requests):
        n = int(torch.randint(3, 60, (1,), generator=gen))
        prompt = torch.randint(100, min(40000, eng.vocab_size), (n,), generator=gen).tolist()
        if i % 2:
            params = SamplingParams(max_tokens=20 + 9 * i, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=20 + 9 * i, temperature=0.0, ignore_eos=True, logprobs=2)
        eng.add_request(f"b{i}", prompt, params)
        tokens[f"b{i}"], logprobs[f"b{i}"] = [], []
    while eng.has_unfinished_requests():
        for o in eng.step():
            tokens[o.request_id] += o.new_token_ids
            logprobs[o.request_id] += [lp.logprob for lp in o.new_logprobs or []]
    return {rid: (tokens[rid], logprobs[rid]) for rid in tokens}
