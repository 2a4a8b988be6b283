"""Prompt logprobs' row bookkeeping and slicing on the CPU, against a direct log-softmax of
known logits (the engine end to end is checked against HF in tests/test_engine_reference.py)."""

from __future__ import annotations

import torch

from server.engine.prompt_logprobs import launch_prompt_logprobs, logit_slice_rows, prompt_rows
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledRequest

VOCAB = 50


def req(rid: str, prompt: list[int], k: int | None) -> Request:
    return Request(rid, prompt, SamplingParams(prompt_logprobs=k))


def test_rows_cover_prompt_positions_that_score_a_prompt_token():
    a, b, c = req("a", list(range(10)), 2), req("b", list(range(5)), None), req("c", list(range(6)), 0)
    a.num_computed_tokens = 4  # a's second chunk: positions 4..9, of which 4..8 score 5..9
    c.num_computed_tokens = 0
    scheduled = [ScheduledRequest(b, 5), ScheduledRequest(a, 6), ScheduledRequest(c, 3)]
    starts = [0, 5, 11, 14]
    jobs = prompt_rows(scheduled, starts)
    assert [(j.request.request_id, j.first_row, j.first_position, j.count) for j in jobs] == [
        ("a", 5, 4, 5),  # the chunk's last row (position 9) samples the first output token
        ("c", 11, 0, 3),
    ]


def test_slices_give_the_same_scores_as_one_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, VOCAB, generator=gen) * 4
    a, c = req("a", [int(t) for t in torch.randint(0, VOCAB, (12,), generator=gen)], 3), req("c", [7, 8, 9], 0)
    jobs = prompt_rows([ScheduledRequest(a, 12), ScheduledRequest(c, 3)], [0, 12, 15])
    for max_rows in (1, 4, 64):
        out = launch_prompt_logprobs(lambda idx: logits.index_select(0, idx), jobs, torch.device("cpu"),
                                     max_rows).result()  # fmt: skip
        first, lps = out["a"]
        assert first == 1 and len(lps) == 11
        ref = torch.log_softmax(logits, -1)
        for j, lp in enumerate(lps):
            row, tok = ref[j], a.prompt_token_ids[j + 1]
            assert lp.token_id == tok and abs(lp.logprob - row[tok].item()) < 1e-6
            assert lp.rank == int((row > row[tok]).sum()) + 1
            assert lp.top_token_ids == row.topk(3).indices.tolist()
        first, lps = out["c"]
        assert first == 1 and [lp.token_id for lp in lps] == [8, 9]
        assert all(lp.top_token_ids == [] for lp in lps)  # k = 0: the prompt token alone
        assert abs(lps[1].logprob - ref[13, 9].item()) < 1e-6


def test_slice_rows_fit_the_profiled_step():
    # Llama-3-8B shapes: a few hundred rows at an 8k-token budget, never below max_num_seqs
    assert logit_slice_rows(64, 8192, 14336, 128256) == 499
    assert logit_slice_rows(64, 2048, 14336, 128256) == 124
    assert logit_slice_rows(64, 2048, 1536, 49152) == 64  # SmolLM2: the sampler's batch
    rows = logit_slice_rows(1, 8192, 14336, 128256)
    assert rows * 11 * 128256 <= 8192 * 3 * 14336 * 2
