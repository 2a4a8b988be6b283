"""The engine against Hugging Face transformers on the embedded SmolLM2 GGUF, both in float32:
greedy tokens must be identical for 64 new tokens on prompts of different lengths, however the
engine batches them: one at a time, one staggered continuous batch, with prefix-cache hits,
with 32-token prefill chunks, and under KV pressure that forces preemption."""

from __future__ import annotations

import pytest

from server.engine.engine import EngineConfig
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams
from tests.reference import hf_greedy, hf_logprobs, hf_model

# Every engine of this module shares one loaded model (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("share_loaded_models")

NEW_TOKENS = 64
SYSTEM = (
    "You are a meticulous assistant for a public library. Answer questions about opening "
    "hours, borrowing rules, late fees, study rooms and the catalogue. Be brief and exact, "
    "and say so when you do not know."
)
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three colours of the rainbow:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    "every morning rowed out before sunrise. One day he caught something unusual:",
    "Q: What is 12 times 12?\nA:",
    " ".join(f"Item {i}: the number {i * 7} is {'even' if i % 2 == 0 else 'odd'}." for i in range(16)),
]
CHATS = [
    "How long can I keep a borrowed book?",
    "Are study rooms free to book?",
    "What happens if I return a DVD late?",
]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm(share_loaded_models):
    # float32 to match the reference bit-for-bit in spirit; small KV budget on purpose.
    return LLM(EngineConfig(dtype="float32", kv_cache_memory="64MiB", progress=False))


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    ids = [llm.encode(t) for t in TEXTS]
    lens = sorted(len(p) for p in ids)
    assert lens[0] < 10 and lens[-1] > 150, lens  # genuinely different lengths
    return ids


@pytest.fixture(scope="module")
def chat_prompts(llm) -> list[list[int]]:
    return [llm.chat_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": c}])
            for c in CHATS]


@pytest.fixture(scope="module")
def reference(gguf_path, prompts, chat_prompts) -> dict[tuple[int, ...], list[int]]:
    model = hf_model(gguf_path)
    return {tuple(p): hf_greedy(model, p, NEW_TOKENS) for p in prompts + chat_prompts}


def check(results, reference) -> None:
    for r in results:
        assert len(r.token_ids) == NEW_TOKENS
        assert r.token_ids == reference[tuple(r.prompt_token_ids)], r.request_id


def test_one_at_a_time(llm, prompts, reference):
    for p in prompts:
        check(llm.generate([p], greedy()), reference)
    llm.engine.check_integrity()
    assert llm.engine.kv.usage == 0.0


def test_continuous_batch_with_staggered_arrivals(llm, prompts, reference):
    from server.engine.output_processor import RequestState

    eng = llm.engine
    states = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or eng.has_unfinished_requests():
        if pending and steps % 5 == 0:  # a new arrival every 5 steps, mid-decode of others
            i, p = pending.pop(0)
            eng.add_request(f"stagger-{i}", p, greedy())
            states[f"stagger-{i}"] = RequestState(llm.tokenizer, p, greedy())
        for out in eng.step():
            states[out.request_id].step(out)
        steps += 1
    for st in states.values():
        assert st.token_ids == reference[tuple(st.prompt_token_ids)]
    eng.check_integrity()
    assert eng.kv.usage == 0.0


def test_prefix_cache_hits_shared_system_prompt(llm, chat_prompts, reference):
    before = llm.engine.stats().prefix_cache_hits
    first = llm.generate([chat_prompts[0]], greedy())[0]
    rest = llm.generate(chat_prompts[1:], greedy())
    check([first, *rest], reference)
    bs = llm.engine.config.block_size
    for r in rest:
        # the shared system prompt's full blocks were served from the cache
        assert r.num_cached_tokens >= bs * 2, r.num_cached_tokens
    assert llm.engine.stats().prefix_cache_hits > before


def test_chunked_prefill_32_token_chunks(prompts, reference):
    small = LLM(EngineConfig(dtype="float32", kv_cache_memory="64MiB", progress=False,
                             long_prefill_token_threshold=32, max_num_batched_tokens=64))
    check(small.generate(prompts, greedy()), reference)
    small.engine.check_integrity()


def test_kv_pressure_forces_preemption(prompts, chat_prompts, reference):
    # 24 blocks of 16 tokens: the longest prompt plus its output needs ~18, all nine ~60.
    spec_bytes = 30 * 2 * 16 * 3 * 64 * 4
    tight = LLM(EngineConfig(dtype="float32", kv_cache_memory=24 * spec_bytes, progress=False))
    assert tight.engine.kv.num_blocks == 24
    results = tight.generate(prompts + chat_prompts, greedy())
    check(results, reference)
    assert tight.engine.stats().num_preemptions > 0
    tight.engine.check_integrity()
    assert tight.engine.kv.num_free_blocks == tight.engine.kv.num_blocks


def test_logprobs_close_to_reference(llm, gguf_path, prompts):
    """Top-5 logprobs at every generated position match HF's teacher-forced log-softmax."""
    model = hf_model(gguf_path)
    # One request alone, then two batched together: both paths of the sampler's logprobs.
    results = llm.generate(prompts[:1], greedy(logprobs=5)) + llm.generate(prompts[1:3], greedy(logprobs=5))
    for p, r in zip(prompts[:3], results, strict=True):
        assert r.prompt_token_ids == p
        ref = hf_logprobs(model, p + r.token_ids)
        for i, lp in enumerate(r.logprobs):
            row = ref[len(p) - 1 + i]
            assert lp.token_id == r.token_ids[i]
            assert abs(lp.logprob - row[lp.token_id].item()) < 2e-3
            top = row.topk(5)
            assert lp.top_token_ids == top.indices.tolist()
            for a, b in zip(lp.top_logprobs, top.values.tolist(), strict=True):
                assert abs(a - b) < 2e-3


def scoring(k: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=k)


def check_prompt_logprobs(prompt: list[int], got, ref, k: int) -> None:
    """`got` (an engine's prompt_logprobs) against HF's teacher-forced log-softmax `ref` of
    the prompt: position j scores prompt[j] given prompt[:j]; the first has no score."""
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    for j in range(1, len(prompt)):
        lp, row = got[j], ref[j - 1]
        assert lp.token_id == prompt[j]
        assert abs(lp.logprob - row[prompt[j]].item()) < 2e-3, j
        v = row[prompt[j]].item()  # its rank, up to tokens within the tolerance of it
        assert int((row > v + 2e-3).sum()) + 1 <= lp.rank <= int((row > v - 2e-3).sum()) + 1, j
        top = row.topk(k)
        assert lp.top_token_ids == top.indices.tolist(), j
        for a, b in zip(lp.top_logprobs, top.values.tolist(), strict=True):
            assert abs(a - b) < 2e-3


def test_prompt_logprobs_match_reference(llm, gguf_path, prompts, chat_prompts):
    """Teacher-forced scores of the prompts themselves (what `echo` + `logprobs` serve): every
    prompt position against HF's full forward pass, prompts batched with plain requests."""
    model = hf_model(gguf_path)
    ps = [prompts[3], prompts[5], chat_prompts[0]]
    params = [scoring(5), scoring(0), greedy()]
    results = llm.generate(ps, params)
    check_prompt_logprobs(ps[0], results[0].prompt_logprobs, hf_logprobs(model, ps[0]), 5)
    check_prompt_logprobs(ps[1], results[1].prompt_logprobs, hf_logprobs(model, ps[1]), 0)
    assert results[2].prompt_logprobs is None
    llm.engine.check_integrity()
    assert llm.engine.kv.usage == 0.0


def test_prompt_logprobs_chunked_cached_and_preempted(prompts, chat_prompts, gguf_path, reference):
    """The same scores when the prompt is prefilled in 24-token chunks, when its prefix is in
    the cache (the cache is bypassed: cached positions have no logits), and when KV pressure
    preempts requests mid-prompt and recomputes them."""
    model = hf_model(gguf_path)
    spec_bytes = 30 * 2 * 16 * 3 * 64 * 4
    eng = LLM(EngineConfig(dtype="float32", kv_cache_memory=24 * spec_bytes, progress=False,
                           long_prefill_token_threshold=24, max_num_batched_tokens=48))
    warm = eng.generate([chat_prompts[0]], scoring(None))[0]
    assert warm.num_cached_tokens == 0
    scored = eng.generate([chat_prompts[1]], scoring(3))[0]
    assert scored.num_cached_tokens == 0  # the shared system prompt's blocks were not used
    check_prompt_logprobs(chat_prompts[1], scored.prompt_logprobs, hf_logprobs(model, chat_prompts[1]), 3)
    before = eng.engine.stats().num_preemptions
    many = prompts + chat_prompts
    results = eng.generate(many, greedy(prompt_logprobs=1))
    assert eng.engine.stats().num_preemptions > before
    for p, r in zip(many, results, strict=True):
        check_prompt_logprobs(p, r.prompt_logprobs, hf_logprobs(model, p), 1)
        assert r.token_ids == reference[tuple(p)]
    eng.engine.check_integrity()
    assert eng.engine.kv.num_free_blocks == eng.engine.kv.num_blocks
