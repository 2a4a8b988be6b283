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
