"""Tests for server/engine/sampler.py: selection rules, penalties, seeding, logprobs, statistics.

Statistical checks draw many rows in one batch from a seeded sampler, so they are deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.request import Request
from server.engine.sampler import Sampler, SamplingRow
from server.engine.sampling_params import SamplingParams


def _row(
    output: list[int] | None = None,
    prompt: list[int] | None = None,
    seed: int | None = None,
    eos: frozenset[int] = frozenset(),
    **params: object,
) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(
        params=SamplingParams(**params),  # type: ignore[arg-type]
        prompt_token_ids=prompt if prompt is not None else [0],
        output_token_ids=output if output is not None else [],
        generator=generator,
        eos_token_ids=eos,
    )


def _frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    """Empirical distribution of `tokens`: [vocab] float64."""
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    return counts / counts.sum()


def _sample_many(logits_row: torch.Tensor, n: int, seed: int = 0, **params: object) -> list[int]:
    """n draws from one [V] logits vector, as n unseeded rows of one batch."""
    rows = [_row(**params)] * n  # unseeded rows are stateless: one object serves them all
    return Sampler(seed=seed)(logits_row.expand(n, -1), rows).token_ids


def _greedy(logits_row: list[float], row: SamplingRow) -> int:
    return Sampler(seed=0)(torch.tensor([logits_row]), [row]).token_ids[0]


# --- greedy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = Sampler(seed=0)(logits, [_row(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_sampler_does_not_modify_logits() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    rows = [
        _row(output=[1, 1, 2], repetition_penalty=1.5, frequency_penalty=0.5, temperature=0.7),
        _row(min_tokens=3, eos=frozenset({4}), top_k=3, top_p=0.5, min_p=0.1),
        _row(temperature=0.0, presence_penalty=1.0, output=[3], logprobs=2),
    ]
    Sampler(seed=0)(logits, rows)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_dtype_logits_sample_as_their_float32_widening(dtype: torch.dtype) -> None:
    """The engine hands the sampler logits in the model's dtype; every step (allowed ids,
    logit_bias, min_tokens, penalties, temperature / top-k / top-p / min-p, logprobs) gives what
    it gives on their exact float32 widening, and the caller's tensor is left as it was."""
    logits = (torch.randn(7, 64, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    before = logits.clone()

    def rows() -> list[SamplingRow]:
        return [
            _row(temperature=0.0, logprobs=3),
            _row(temperature=0.0, allowed_token_ids=[3, 9, 40]),
            _row(temperature=0.0, logit_bias={5: 100.0}),
            _row(temperature=0.0, min_tokens=2, eos=frozenset({int(logits[3].float().argmax())})),
            _row(temperature=0.0, output=[int(logits[4].float().argmax())], repetition_penalty=3.0),
            _row(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=7, logprobs=2),
            _row(temperature=1.0, seed=8),
        ]

    got = Sampler(seed=0)(logits, rows())
    want = Sampler(seed=0)(logits.float(), rows())
    assert got == want
    assert torch.equal(logits, before) and logits.dtype == dtype
    # each row's own step acted (not a batch where every step was a no-op)
    assert got.token_ids[1] in (3, 9, 40) and got.token_ids[2] == 5
    assert got.token_ids[3] != int(logits[3].float().argmax())
    assert got.token_ids[4] != int(logits[4].float().argmax())
    # many plain temperature-1 draws (the same noise both ways): probabilities computed in
    # bfloat16 flip 7 of these 16384 draws
    many = logits[5:6].expand(16384, -1)
    plain = [_row(temperature=1.0)] * 16384
    assert Sampler(seed=3)(many, plain) == Sampler(seed=3)(many.float(), plain)


def test_empty_batch_and_shape_mismatch() -> None:
    out = Sampler()(torch.empty(0, 10), [])
    assert out.token_ids == [] and out.logprobs == []
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), [_row()])


def test_from_request() -> None:
    params = SamplingParams(seed=5, repetition_penalty=1.2)
    req = Request("r", [3, 4, 5], params, eos_token_ids=frozenset({2}))
    req.append_token(7)
    row = SamplingRow.from_request(req)
    assert row.params is params
    assert list(row.prompt_token_ids) == [3, 4, 5]
    assert list(row.output_token_ids) == [7]
    assert row.generator is req.generator and row.generator is not None
    assert row.eos_token_ids == frozenset({2})


# --- seeding --------------------------------------------------------------------------------

VOCAB = 64
STEPS = 40


def _step_logits(step: int, n: int) -> torch.Tensor:
    """Fixed logits for one decode step: [n, VOCAB], row i depends only on (step, i)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, VOCAB, generator=g)


def _run_seeded(batch: list[dict[str, object] | None], sampler_seed: int) -> list[int]:
    """Decode STEPS tokens; the one `None` slot is the tracked request (seed 123, fixed logits).

    Other slots are dicts of SamplingParams fields (with `seed` meaning a seeded request) and
    get their own, different logits each step.
    """
    tracked_params = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1}
    generators = [
        torch.Generator().manual_seed(123 if p is None else p["seed"])  # type: ignore[arg-type]
        if p is None or p.get("seed") is not None
        else None
        for p in batch
    ]
    outputs: list[list[int]] = [[] for _ in batch]
    sampler = Sampler(seed=sampler_seed)
    for step in range(STEPS):
        logits = _step_logits(step + 100 * sampler_seed, len(batch))
        slot = batch.index(None)
        logits[slot] = _step_logits(step, 1)[0]
        rows = [
            SamplingRow(
                params=SamplingParams(**(tracked_params if p is None else p)),  # type: ignore[arg-type]
                prompt_token_ids=[1, 2, 3],
                output_token_ids=outputs[i],
                generator=generators[i],
            )
            for i, p in enumerate(batch)
        ]
        for i, token in enumerate(sampler(logits, rows).token_ids):
            outputs[i].append(token)
    return outputs[batch.index(None)]


def test_seeded_request_is_independent_of_batch_composition() -> None:
    alone = _run_seeded([None], sampler_seed=0)
    mixed_a = _run_seeded(
        [{"temperature": 1.0}, {"seed": 7, "top_k": 5}, None, {"temperature": 0.0}],
        sampler_seed=1,
    )
    mixed_b = _run_seeded(
        [None, {"seed": 9, "min_p": 0.2}, {"temperature": 0.5, "presence_penalty": 1.0}],
        sampler_seed=2,
    )
    assert len(set(alone)) > 5  # actually random, not stuck on one token
    assert alone == mixed_a == mixed_b


def test_different_seeds_give_different_sequences() -> None:
    logits = torch.zeros(2, 100)  # uniform: every draw is pure noise
    rows = [_row(seed=1), _row(seed=2)]
    sampler = Sampler(seed=0)
    steps = [sampler(logits, rows).token_ids for _ in range(20)]
    first, second = [s[0] for s in steps], [s[1] for s in steps]
    assert first != second

    rows_again = [_row(seed=1), _row(seed=1)]
    steps = [sampler(logits, rows_again).token_ids for _ in range(20)]
    assert [s[0] for s in steps] == [s[1] for s in steps] == first


def test_many_seeded_rows_match_each_row_alone() -> None:
    # Enough seeded draws (8 x 65536) that the sampler spreads them over its thread pool.
    vocab = 1 << 16
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(8))
    batch = Sampler()(logits, [_row(seed=s) for s in range(8)]).token_ids
    alone = [Sampler()(logits[s : s + 1], [_row(seed=s)]).token_ids[0] for s in range(8)]
    assert batch == alone
    assert len(set(batch)) > 1


def test_sampler_seed_makes_unseeded_rows_reproducible() -> None:
    logits = torch.zeros(8, 100)
    rows = [_row() for _ in range(8)]
    assert Sampler(seed=3)(logits, rows).token_ids == Sampler(seed=3)(logits, rows).token_ids
    assert Sampler(seed=3)(logits, rows).token_ids != Sampler(seed=4)(logits, rows).token_ids


# --- top-k / top-p / min-p / temperature -------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest() -> None:
    vocab, k = 30, 5
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 0.5
    allowed = set(logits.topk(k).indices.tolist())
    tokens = _sample_many(logits, 4000, top_k=k)
    assert set(tokens) == allowed


def test_top_k_disabled_values() -> None:
    logits = torch.zeros(10)
    for top_k in (0, -1, 10, 50):
        assert set(_sample_many(logits, 2000, top_k=top_k)) == set(range(10))


# Probabilities 0.5, 0.3, 0.15, 0.05 at shuffled vocabulary positions, so the sort matters.
_POSITIONS = [3, 0, 5, 1]  # token id holding the 1st, 2nd, 3rd, 4th most likely
_PROBS = [0.5, 0.3, 0.15, 0.05]


def _shuffled_logits(vocab: int = 6) -> torch.Tensor:
    logits = torch.full((vocab,), float("-inf"))
    for pos, p in zip(_POSITIONS, _PROBS, strict=True):
        logits[pos] = math.log(p)
    return logits


def _expected(keep: int) -> torch.Tensor:
    """Renormalized distribution over the `keep` most likely tokens: [6] float64."""
    expected = torch.zeros(6, dtype=torch.float64)
    for pos, p in zip(_POSITIONS[:keep], _PROBS[:keep], strict=True):
        expected[pos] = p
    return expected / expected.sum()


@pytest.mark.parametrize(("top_p", "keep"), [(0.2, 1), (0.7, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_smallest_nucleus(top_p: float, keep: int) -> None:
    tokens = _sample_many(_shuffled_logits(), 20000, top_p=top_p)
    assert set(tokens) == set(_POSITIONS[:keep])
    assert torch.allclose(_frequencies(tokens, 6), _expected(keep), atol=0.015)


@pytest.mark.parametrize(("min_p", "keep"), [(0.05, 4), (0.25, 3), (0.5, 2), (0.9, 1)])
def test_min_p_is_relative_to_max_prob(min_p: float, keep: int) -> None:
    tokens = _sample_many(_shuffled_logits(), 20000, min_p=min_p)
    assert set(tokens) == set(_POSITIONS[:keep])
    assert torch.allclose(_frequencies(tokens, 6), _expected(keep), atol=0.015)


def test_combined_top_k_top_p_min_p() -> None:
    # 0.4, 0.25, 0.2, 0.1, 0.05. top_k=4 renormalizes to 0.42, 0.26, 0.21, 0.11; top_p=0.8
    # then keeps three (0.42 + 0.26 < 0.8 <= 0.89); min_p=0.6 drops 0.2 (0.2 / 0.4 < 0.6).
    logits = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05]).log()
    assert set(_sample_many(logits, 5000, top_k=4)) == {0, 1, 2, 3}
    assert set(_sample_many(logits, 5000, top_k=4, top_p=0.8)) == {0, 1, 2}
    assert set(_sample_many(logits, 5000, top_k=4, top_p=0.8, min_p=0.6)) == {0, 1}
    # Without top-k the nucleus for 0.8 is the same three tokens (0.4 + 0.25 < 0.8 <= 0.85).
    assert set(_sample_many(logits, 5000, top_p=0.8, min_p=0.6)) == {0, 1}


def test_mixed_top_k_rows_in_one_batch() -> None:
    logits = torch.zeros(3000, 10)
    rows = [_row(top_k=(2, 0, 5)[i % 3]) for i in range(3000)]
    tokens = Sampler(seed=0)(logits, rows).token_ids
    # Ties: all logits equal, every token ties with the k-th; top-k keeps all ties.
    assert set(tokens) == set(range(10))
    logits = torch.arange(10.0).expand(3000, 10) * 0.1
    tokens = Sampler(seed=0)(logits, rows).token_ids
    assert set(tokens[0::3]) == {8, 9}
    assert set(tokens[1::3]) == set(range(10))
    assert set(tokens[2::3]) == {5, 6, 7, 8, 9}


@pytest.mark.parametrize("temperature", [1e-3, 1e-6, 1e-9])
def test_temperature_to_zero_is_greedy(temperature: float) -> None:
    logits = torch.randn(20, generator=torch.Generator().manual_seed(5)) * 3
    tokens = _sample_many(logits, 500, temperature=temperature)
    assert set(tokens) == {int(logits.argmax())}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_empirical_frequencies_match_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    tokens = _sample_many(logits, 40000, seed=11, temperature=temperature)
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    # 40000 draws: standard error <= 0.0025 per token; 0.01 is four of them.
    assert torch.allclose(_frequencies(tokens, 6), expected, atol=0.01)


# --- penalties ------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_logits() -> None:
    # 2.0 / 2 = 1.0 < 1.01: flips. 2.0 / 1.9 = 1.053 > 1.01: stays.
    base = {"temperature": 0.0, "prompt": [0]}
    assert _greedy([2.0, 1.01], _row(**base)) == 0
    assert _greedy([2.0, 1.01], _row(**base, repetition_penalty=2.0)) == 1
    assert _greedy([2.0, 1.01], _row(**base, repetition_penalty=1.9)) == 0


def test_repetition_penalty_multiplies_negative_logits() -> None:
    # -1.0 * 2 = -2.0 < -1.9: flips. -1.0 * 1.8 = -1.8 > -1.9: stays.
    base = {"temperature": 0.0, "prompt": [5]}
    assert _greedy([-1.0, -1.9], _row(**base, output=[0], repetition_penalty=2.0)) == 1
    assert _greedy([-1.0, -1.9], _row(**base, output=[0], repetition_penalty=1.8)) == 0


def test_repetition_penalty_below_one_rewards_seen_tokens() -> None:
    row = _row(temperature=0.0, prompt=[1], repetition_penalty=0.5)
    assert _greedy([2.0, 1.5], row) == 1  # 1.5 / 0.5 = 3.0


def test_frequency_penalty_scales_with_count() -> None:
    # Token 0 generated twice: 1.0 - 2 * f vs 0.55.
    base = {"temperature": 0.0, "output": [0, 0]}
    assert _greedy([1.0, 0.55], _row(**base, frequency_penalty=0.2)) == 0  # 0.6
    assert _greedy([1.0, 0.55], _row(**base, frequency_penalty=0.25)) == 1  # 0.5


def test_presence_penalty_ignores_count() -> None:
    # Token 0 generated three times: 1.0 - p (not 3p) vs 0.55.
    base = {"temperature": 0.0, "output": [0, 0, 0]}
    assert _greedy([1.0, 0.55], _row(**base, presence_penalty=0.4)) == 0  # 0.6
    assert _greedy([1.0, 0.55], _row(**base, presence_penalty=0.5)) == 1  # 0.5
    # Negative presence penalty encourages: token 1 seen once, 0.55 + 0.5 > 1.0.
    assert _greedy([1.0, 0.55], _row(temperature=0.0, output=[1], presence_penalty=-0.5)) == 1


def test_frequency_and_presence_add_up() -> None:
    # 1.0 - 2 * 0.1 - 0.3 = 0.5 < 0.55; either alone leaves it above.
    base = {"temperature": 0.0, "output": [0, 0]}
    assert _greedy([1.0, 0.55], _row(**base, frequency_penalty=0.1)) == 0
    assert _greedy([1.0, 0.55], _row(**base, presence_penalty=0.3)) == 0
    assert _greedy([1.0, 0.55], _row(**base, frequency_penalty=0.1, presence_penalty=0.3)) == 1


def test_frequency_and_presence_ignore_prompt_tokens() -> None:
    row = _row(temperature=0.0, prompt=[0, 0, 0], frequency_penalty=2.0, presence_penalty=2.0)
    assert _greedy([1.0, 0.55], row) == 0


def test_penalized_distribution() -> None:
    logits = torch.tensor([1.0, 0.5, -0.5, 0.0])
    # Token 0 in prompt, token 2 generated twice, token 3 generated once.
    params = {
        "prompt": [0],
        "output": [2, 2, 3],
        "repetition_penalty": 1.5,
        "frequency_penalty": 0.3,
        "presence_penalty": 0.2,
    }
    expected_logits = torch.tensor(
        [
            1.0 / 1.5,  # repetition only (prompt)
            0.5,  # untouched
            -0.5 * 1.5 - 2 * 0.3 - 0.2,  # repetition, then frequency x2 and presence
            0.0 * 1.5 - 0.3 - 0.2,  # zero is "not positive": multiplied, stays 0
        ],
        dtype=torch.float64,
    )
    tokens = _sample_many(logits, 20000, seed=3, **params)
    assert torch.allclose(_frequencies(tokens, 4), torch.softmax(expected_logits, 0), atol=0.015)


def test_penalties_only_touch_their_rows() -> None:
    logits = torch.tensor([[2.0, 1.9], [2.0, 1.9]])
    rows = [
        _row(temperature=0.0, output=[0], presence_penalty=1.0),
        _row(temperature=0.0, output=[0]),
    ]
    assert Sampler()(logits, rows).token_ids == [1, 0]


# --- logit_bias -----------------------------------------------------------------------------


def test_logit_bias_forces_bans_and_only_touches_its_rows() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    rows = [
        _row(temperature=0.0, logit_bias={3: 100.0}),  # forced
        _row(temperature=0.0, logit_bias={0: -100.0, 1: -100.0}),  # the two best banned
        _row(temperature=0.0),
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids == [3, 2, 0]
    assert torch.equal(logits, torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3))  # not modified


def test_logit_bias_shifts_the_sampled_distribution() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0])
    tokens = _sample_many(logits, 20000, seed=4, logit_bias={2: math.log(2.0)})
    assert torch.allclose(_frequencies(tokens, 3), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64),
                          atol=0.015)


def test_allowed_token_ids_limit_greedy_and_sampled_rows() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]] * 3)
    rows = [
        _row(temperature=0.0, allowed_token_ids=[3, 4]),
        _row(temperature=0.0, allowed_token_ids=[4], logit_bias={0: 100.0}),  # the bias cannot undo it
        _row(temperature=0.0),
    ]
    assert Sampler()(logits, rows).token_ids == [3, 4, 0]
    tokens = _sample_many(torch.zeros(5), 4000, seed=5, allowed_token_ids=[1, 3])
    assert set(tokens) == {1, 3} and 0.45 < tokens.count(1) / len(tokens) < 0.55


def test_logit_bias_leaves_logprobs_raw() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = Sampler()(logits, [_row(temperature=0.0, logprobs=1, logit_bias={2: 100.0})])
    assert out.token_ids == [2]
    assert out.logprobs[0].logprob == pytest.approx(torch.log_softmax(logits[0], 0)[2].item(), abs=1e-5)


# --- min_tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids(ignore_eos: bool) -> None:
    logits = [10.0, 9.0, 5.0, 1.0]  # EOS = 0, stop id = 1
    kwargs = {
        "temperature": 0.0,
        "eos": frozenset({0}),
        "min_tokens": 2,
        "stop_token_ids": [1],
        "ignore_eos": ignore_eos,
    }
    assert _greedy(logits, _row(output=[], **kwargs)) == 2
    assert _greedy(logits, _row(output=[3], **kwargs)) == 2
    assert _greedy(logits, _row(output=[3, 3], **kwargs)) == 0


def test_min_tokens_masks_sampled_rows_and_ignores_out_of_vocab_ids() -> None:
    logits = torch.tensor([3.0, 3.0, 0.0, 0.0])
    tokens = _sample_many(
        logits, 2000, eos=frozenset({0, 99}), min_tokens=1, stop_token_ids=[1, -1]
    )
    assert set(tokens) == {2, 3}


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits() -> None:
    vocab = 30
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    rows = [
        _row(logprobs=5, temperature=0.8, output=[1, 2, 2], repetition_penalty=1.3, seed=1),
        _row(logprobs=0, temperature=0.0, frequency_penalty=1.0, output=[4]),
        _row(),
        _row(logprobs=20, top_k=3),
    ]
    out = Sampler(seed=0)(logits, rows)
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs[2] is None
    for i, k in ((0, 5), (1, 0), (3, 20)):
        lp = out.logprobs[i]
        assert lp is not None
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert lp.rank == 1 + int((raw[i] > raw[i, token]).sum())
        expected = raw[i].topk(k)
        assert len(lp.top_token_ids) == len(lp.top_logprobs) == k
        assert lp.top_token_ids == expected.indices.tolist()
        assert lp.top_logprobs == pytest.approx(expected.values.tolist(), abs=1e-6)
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
    assert out.logprobs[1] is not None and out.logprobs[1].top_token_ids == []


def test_logprobs_rank_of_unlikely_sampled_token() -> None:
    # Greedy after a penalty flips the choice to the second most likely raw token: rank 2.
    row = _row(temperature=0.0, output=[0], presence_penalty=2.0, logprobs=1)
    out = Sampler()(torch.tensor([[3.0, 2.0, 1.0]]), [row])
    lp = out.logprobs[0]
    assert out.token_ids == [1] and lp is not None
    assert lp.rank == 2
    assert lp.top_token_ids == [0]


# --- mixed batch ----------------------------------------------------------------------------


def test_mixed_batch() -> None:
    vocab = 40
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(4))
    rows = [
        _row(temperature=0.0),
        _row(temperature=0.7, top_k=10, seed=42, logprobs=3),
        _row(temperature=0.0, output=[int(logits[2].argmax())], repetition_penalty=2.0),
        _row(temperature=1.2, top_p=0.9, min_p=0.05),
        _row(temperature=0.0, logprobs=2, output=[7], frequency_penalty=0.5),
        _row(temperature=1.0, min_tokens=3, eos=frozenset(range(vocab // 2)), seed=1),
    ]
    out = Sampler(seed=0)(logits, rows)
    assert len(out.token_ids) == len(out.logprobs) == 6
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] in set(logits[1].topk(10).indices.tolist())
    expected_2 = logits[2].clone()
    top = int(expected_2.argmax())
    expected_2[top] = expected_2[top] / 2.0 if expected_2[top] > 0 else expected_2[top] * 2.0
    assert out.token_ids[2] == int(expected_2.argmax()) != top
    expected_4 = logits[4].clone()
    expected_4[7] -= 0.5
    assert out.token_ids[4] == int(expected_4.argmax())
    assert out.token_ids[5] >= vocab // 2
    assert [lp is not None for lp in out.logprobs] == [False, True, False, False, True, False]

    # The seeded rows do not care about the rest of the batch.
    fresh = [
        rows[1]._replace(generator=torch.Generator().manual_seed(42)),
        rows[5]._replace(generator=torch.Generator().manual_seed(1)),
    ]
    alone = Sampler(seed=99)(logits[[1, 5]], fresh)
    assert alone.token_ids == [out.token_ids[1], out.token_ids[5]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_rows_match_across_devices() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))

    def run(device: str) -> tuple[list[int], list[float]]:
        rows = [
            _row(seed=s, top_k=50, top_p=0.9, logprobs=2, output=[1, 2], repetition_penalty=1.2,
                 logit_bias={3: 2.0, 10 * s: -100.0, 7: 1.5 * s},
                 allowed_token_ids=list(range(0, 1000, s)))
            for s in (1, 2, 3, 4)
        ]
        out = Sampler(seed=0)(logits.to(device), rows)
        return out.token_ids, [lp.logprob for lp in out.logprobs if lp is not None]

    cpu_tokens, cpu_lps = run("cpu")
    cuda_tokens, cuda_lps = run("cuda")
    assert cpu_tokens == cuda_tokens
    assert cpu_lps == pytest.approx(cuda_lps, abs=1e-5)
