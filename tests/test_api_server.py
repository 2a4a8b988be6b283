"""End to end: the real server (uvicorn + router + one real worker process + the embedded model),
driven with the official `openai` client and with raw httpx. One server for the whole module.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.server_process import ServerProcess
from server.engine.llm import LLM
from server.engine.sampling_params import SamplingParams

KEY = "test-key-123"
MODEL = "smol"
MAX_MODEL_LEN = 512
MAX_PENDING = 24
THREADS = 2
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(
        [
            "--served-model-name", MODEL,
            "--api-key", KEY,
            "--kv-cache-memory", "48MiB",
            "--max-num-seqs", "32",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-pending-requests", str(MAX_PENDING),
            "--worker-threads", str(THREADS),
        ]
    )  # fmt: skip
    with proc:
        yield proc
    assert proc.process.returncode == 0, proc.log_tail()


@pytest.fixture(scope="module")
def offline():
    """The engine alone, in this process, same settings as the server's worker."""
    return LLM(
        kv_cache_memory="48MiB",
        max_num_seqs=32,
        max_model_len=MAX_MODEL_LEN,
        num_threads=THREADS,
        progress=False,
    )


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    ) as c:
        yield c


def metric_values(http: httpx.Client) -> dict[tuple[str, frozenset], float]:
    text = http.get("/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(values: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in values.items() if n == name and set(labels.items()) <= lab)


def wait_idle(http: httpx.Client, timeout: float = 60.0) -> dict:
    """Poll /metrics until the worker reports nothing running, waiting or holding KV blocks."""
    deadline = time.monotonic() + timeout
    while True:
        v = metric_values(http)
        busy = (
            metric(v, "pdserve:num_requests_running"),
            metric(v, "pdserve:num_requests_waiting"),
            metric(v, "pdserve:kv_cache_usage_perc"),
        )
        if busy == (0, 0, 0) and metric(v, "pdserve:worker_up") == 1:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"worker still busy (running, waiting, kv usage) = {busy}")
        time.sleep(0.2)


# ---------------------------------------------------------------- basics


def test_models_and_health(server, client):
    assert server.health() == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_greedy_completions_equal_offline_engine(client, offline):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    for prompt in PROMPTS:
        want = offline.generate([prompt], params)[0]
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.text
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        stream = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == want.text


def test_greedy_chat_equals_offline_engine(client, offline):
    want = offline.generate(
        [offline.chat_prompt(CHAT)], SamplingParams(max_tokens=16, temperature=0.0)
    )[0]
    got = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_max_tokens_and_finish_reason(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=2, temperature=0
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_n2_fans_out(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # greedy copies agree
    assert r.usage.completion_tokens == 12
    single = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the shared prompt counts once
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=5, n=2
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    stream = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0.8, n=2, stream=True
    )
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and all(texts.values())


def test_prefix_cache_reported_in_usage(client):
    prompt = "Here is a long shared preamble that repeats. " * 8  # well over two KV blocks
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 32
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens


def test_stop_strings_and_stop_token_ids(client, http):
    full = (
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    word = full.split()[1]  # the second word of the greedy continuation
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[word]
    )
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == full[: full.index(word)]
    assert c.model_extra["stop_reason"] == word
    stream = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=word, stream=True
    )
    chunks = [ch for ch in stream if ch.choices]
    assert "".join(ch.choices[0].text for ch in chunks) == full[: full.index(word)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    tokens = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=0
    )
    second = tokens.choices[0].logprobs.tokens[1]
    ids = http.post("/tokenize", json={"prompt": second, "add_special_tokens": False}).json()[
        "tokens"
    ]
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        extra_body={"stop_token_ids": ids[:1]},
    )
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2


def test_largest_seed_fans_out(client):
    """seed 2**64 - 1 with n = 2: copy 1's seed (vLLM's seed + 1) wraps to 0 instead of
    overflowing torch's generator (it was a 500)."""
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, n=2, seed=2**64 - 1)
    zero = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, seed=0)
    assert len(r.choices) == 2 and r.choices[1].text == zero.choices[0].text


def test_seed_reproducibility(client):
    def sample(seed: int) -> str:
        r = client.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=1.0, seed=seed
        )
        return r.choices[0].text

    a, b, c = sample(1234), sample(1234), sample(4321)
    assert a == b
    assert a != c


def test_logprobs(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert val <= 0 and 3 <= len(top) <= 4 and top[tok] == val
        assert max(top.values()) == val  # greedy picked the most likely token
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    assert r.choices[0].text.startswith(PROMPTS[0])
    assert r.choices[0].logprobs.token_logprobs[0] is None


def test_echo_logprobs_score_the_prompt(http, offline):
    """What evaluation harnesses send (lm-eval's local-completions: context + continuation
    token ids, echo, logprobs=1, max_tokens=1): every echoed prompt token carries its logprob
    given the tokens before it, equal to the engine's own prompt logprobs; vLLM's
    `prompt_logprobs` extension returns the same scores with their ranks."""
    context = offline.encode("Question: what is the capital of France?\nAnswer:")
    continuation = offline.encode(" Paris, a city on the Seine.")
    ids = context + continuation
    ref = offline.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True,
            "logprobs": 1, "prompt_logprobs": 2}  # fmt: skip
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one new token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for j in range(1, len(ids)):
        want = ref.prompt_logprobs[j]
        assert abs(lp["token_logprobs"][j] - want.logprob) < 1e-4, j
        top = lp["top_logprobs"][j]  # the most likely token and the prompt's own
        assert lp["tokens"][j] in top and 1 <= len(top) <= 2
        assert max(top.values()) == top[lp["tokens"][j]] or want.rank > 1
        vllm = choice["prompt_logprobs"][j]
        assert vllm[str(ids[j])]["rank"] == want.rank
        assert abs(vllm[str(ids[j])]["logprob"] - want.logprob) < 1e-4
        assert len(vllm) <= 3 and all(e["decoded_token"] is not None for e in vllm.values())
    assert choice["prompt_logprobs"][0] is None
    # the harness's log-likelihood of the continuation
    score = sum(lp["token_logprobs"][len(context) : len(ids)])
    assert math.isfinite(score) and score < 0
    assert abs(score - sum(ref.prompt_logprobs[j].logprob for j in range(len(context), len(ids)))) < 1e-3

    # streamed: the echoed prompt and its scores come first, then the new token
    body.update(stream=True, prompt_logprobs=None)
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["logprobs"]["token_logprobs"] == lp["token_logprobs"][: len(ids)]
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]

    # OpenAI's legacy scoring idiom: echo with max_tokens 0 returns the scored prompt only
    body.update(stream=False, max_tokens=0, logprobs=0)
    scored = http.post("/v1/completions", json=body).json()
    only = scored["choices"][0]
    assert only["text"] == offline.tokenizer.decode(ids, skip_special_tokens=False)
    assert only["logprobs"]["token_logprobs"] == lp["token_logprobs"][: len(ids)]
    assert only["finish_reason"] == "length" and scored["usage"]["completion_tokens"] == 0
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == only["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400

    # chat: vLLM puts the one prompt's scores at the top of the response
    chat = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0,
    }).json()  # fmt: skip
    n_prompt = chat["usage"]["prompt_tokens"]
    assert len(chat["prompt_logprobs"]) == n_prompt and chat["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])


def test_lm_eval_harness_client(server, offline, monkeypatch):
    """lm-eval's own `local-completions` client, when it is installed (it is not in the test
    extra: its dependencies are large; `pip install "lm-eval[api]"` runs this). It finds the
    server's tokenizer through /tokenizer_info, scores continuations with echo + logprobs, and
    generates until a stop string."""
    pytest.importorskip("tenacity")
    oc = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # its completion requests' key
    lm = oc.LocalCompletionsAPI(base_url=server.base_url + "/v1/completions", model=MODEL,
                                tokenizer_backend="auto", auth_token=KEY, num_concurrent=1,
                                max_retries=1)  # fmt: skip
    assert lm.tokenizer_backend == "remote"
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " Berlin")]
    (paris, greedy), (berlin, _) = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    ids = offline.encode(pairs[0][0] + pairs[0][1])
    ref = offline.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    n_ctx = len(offline.encode(pairs[0][0]))
    assert abs(paris - sum(lp.logprob for lp in ref.prompt_logprobs[n_ctx:])) < 1e-3
    assert greedy and paris > berlin
    (text,) = lm.generate_until([Instance("generate_until", {}, (pairs[0][0], {"until": ["."], "max_gen_toks": 16}), 0)])
    assert text == offline.generate([pairs[0][0]], SamplingParams(max_tokens=16, temperature=0, stop=["."]))[0].text


def test_tokenize_detokenize(http, offline):
    ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] == len(chat["tokens"]) > 5
    # special tokens survive the round trip, as in vLLM (they were dropped)
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text == offline.tokenizer.apply_chat_template(CHAT) and text.startswith("<|im_start|>")
    # with chat's prompt fields, the same tokens chat would prefill (its usage counts them)
    turns = [*CHAT, {"role": "assistant", "content": "The capital"}]
    for fields in ({"add_generation_prompt": False, "continue_final_message": True},
                   {"chat_template_kwargs": {"add_generation_prompt": False}}):
        tok = http.post("/tokenize", json={"messages": turns, **fields}).json()
        used = http.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 1, **fields}).json()
        assert tok["count"] == used["usage"]["prompt_tokens"], fields
    cont = http.post("/tokenize", json={"messages": turns, "add_generation_prompt": False,
                                        "continue_final_message": True}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": cont}).json()["prompt"].endswith("The capital")
    both = {"messages": turns, "continue_final_message": True}  # add_generation_prompt defaults to true
    assert http.post("/tokenize", json=both).status_code == 400
    # what lm-eval's remote tokenizer reads before it tokenizes through the two routes above
    info = http.get("/tokenizer_info").json()
    eos = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert len(eos["tokens"]) == 1 and eos["tokens"][0] in offline.tokenizer.eos_token_ids
    assert info["chat_template"] == offline.tokenizer.chat_template and "{%" in info["chat_template"]
    assert info["model_max_length"] == MAX_MODEL_LEN
    assert httpx.get(http.base_url.join("/tokenizer_info")).status_code == 401  # no key


# ---------------------------------------------------------------- SSE framing


def test_sse_framing_byte_by_byte(http):
    body = {
        "model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""  # every event, the last included, ends with a blank line
    events = events[:-1]
    for e in events:
        assert e.startswith(b"data: ") and b"\n" not in e, e
    assert events[-1] == b"data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    usage = payloads[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 4
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]
    chunks = payloads[:-1]
    assert {p["id"] for p in payloads} == {chunks[0]["id"]} and chunks[0][
        "object"
    ] == "text_completion"
    assert [p["choices"][0]["finish_reason"] for p in chunks][-1] == "length"
    assert all(p["choices"][0]["finish_reason"] is None for p in chunks[:-1])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats(http, path):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage so
    far (its prompt, the tokens it has generated), the last chunk the whole request's; without
    include_usage it does nothing, as in vLLM."""
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            **({"prompt": PROMPTS[0]} if path == "/v1/completions" else {"messages": CHAT})}  # fmt: skip
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        events = [json.loads(e[6:]) for e in b"".join(r.iter_raw()).split(b"\n\n") if e.startswith(b"data: {")]
    *chunks, last = events
    prompt = last["usage"]["prompt_tokens"]  # counted once for the n = 2 copies, as OpenAI does
    seen = {0: [], 1: []}
    for e in chunks:
        u = e["usage"]
        assert u["prompt_tokens"] == prompt and u["total_tokens"] == prompt + u["completion_tokens"]
        seen[e["choices"][0]["index"]].append(u["completion_tokens"])
    for counts in seen.values():  # non-decreasing, ending at the choice's 5 tokens
        assert counts == sorted(counts) and counts[-1] == 5 and counts[0] <= 1, counts
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    body["stream_options"] = {"continuous_usage_stats": True}
    with http.stream("POST", path, json=body) as r:
        raw = b"".join(r.iter_raw())
    assert b'"usage"' not in raw


# ---------------------------------------------------------------- bad input


BAD = [
    ("malformed json", "/v1/completions", b'{"prompt": "x", "max_tokens": ', 400),
    ("body not an object", "/v1/completions", [1, 2], 400),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400),
    ("prompt wrong type", "/v1/completions", {"prompt": {"a": 1}}, 400),
    ("max_tokens wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -5}, 400),
    ("huge max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400),
    ("temperature out of range", "/v1/completions", {"prompt": "x", "temperature": 7}, 400),
    ("top_p out of range", "/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, 400),
    ("n zero", "/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("logprobs too many", "/v1/completions", {"prompt": "x", "logprobs": 50}, 400),
    ("prompt_logprobs too many", "/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400),
    (
        "prompt_logprobs streamed",
        "/v1/chat/completions",
        {"messages": CHAT, "prompt_logprobs": 1, "stream": True},
        400,
    ),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 10**9]}, 400),
    ("prompt id past int64", "/v1/completions", {"prompt": [1, 2**70]}, 400),  # was a 500 (msgpack)
    ("prompt ids as booleans", "/v1/completions", {"prompt": [True, False]}, 400),
    ("tokenize prompt and messages", "/tokenize", {"prompt": "x", "messages": CHAT}, 400),
    ("detokenize booleans", "/detokenize", {"tokens": [True]}, 400),
    ("seed past 2**64", "/v1/completions", {"prompt": "x", "seed": 2**64}, 400),
    ("seed below -2**63", "/v1/completions", {"prompt": "x", "seed": -(2**63) - 1}, 400),
    ("logit_bias key not a token id", "/v1/completions", {"prompt": "x", "logit_bias": {"the": 5}}, 400),
    ("logit_bias out of range", "/v1/chat/completions", {"messages": CHAT, "logit_bias": {"5": 150}}, 400),
    ("json mode", "/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400),
    ("tools", "/v1/chat/completions",
     {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400),
    ("guided_json", "/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}}, 400),
    # JSON's \ud800 escape decodes to a lone surrogate: no UTF-8 bytes to tokenize or send on
    ("lone surrogate in prompt", "/v1/completions", b'{"prompt": "a\\ud800b"}', 400),
    ("lone surrogate in a message", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400),
    ("lone surrogate in stop", "/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"]}', 400),
    ("lone surrogate to tokenize", "/tokenize", b'{"prompt": "\\ud800"}', 400),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400),
    (
        "message wrong type",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        400,
    ),
    (
        "image part",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
    ),
    # chat_template_kwargs naming what the server passes the template, or of the wrong type:
    # each was a TypeError (500)
    ("template kwargs set messages", "/v1/chat/completions",
     {"messages": CHAT, "chat_template_kwargs": {"messages": 5}}, 400),
    ("template kwargs set bos_token", "/v1/chat/completions",
     {"messages": CHAT, "chat_template_kwargs": {"bos_token": "x"}}, 400),
    ("template kwargs tools not a list", "/v1/chat/completions",
     {"messages": CHAT, "chat_template_kwargs": {"tools": 5}}, 400),
    ("template kwargs chat_template not a name", "/v1/chat/completions",
     {"messages": CHAT, "chat_template_kwargs": {"chat_template": [1]}}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404),
    ("unknown model chat", "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT}, 404),
    ("unknown route", "/v1/nothing", {}, 404),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(http, name, path, body, status):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = http.post(path, headers={"Content-Type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err and "code" in err


def test_max_completion_tokens_errors_name_that_field(http):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": 0})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("max_completion_tokens must be at least 1"), r.text


@pytest.mark.parametrize("content_type,body,says", [
    ("application/x-www-form-urlencoded", b'{"prompt": "x"}', "Content-Type: application/json"),  # curl -d
    ("text/plain", b'{"prompt": "x"}', "Content-Type: application/json"),
    (None, b"", "missing"),
    ("application/json", b"[1, 2]", "must be a JSON object"),
])
def test_body_not_a_json_object_says_why(http, content_type, body, says):
    """The body as a whole is wrong: the message says what to send, not pydantic's "Input should be
    a valid dictionary or object to extract fields from" (which it was)."""
    headers = {"Content-Type": content_type} if content_type else {}
    r = http.post("/v1/completions", content=body, headers=headers)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_over_long_prompt_names_both_numbers(http):
    prompt = "hello " * (MAX_MODEL_LEN + 50)
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    n = len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    assert str(MAX_MODEL_LEN) in msg and str(n) in msg
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": MAX_MODEL_LEN})
    assert r.status_code == 400 and str(MAX_MODEL_LEN) in r.json()["error"]["message"]


def test_logit_bias(client, http):
    """OpenAI's logit_bias, end to end through the official client: +100 forces a token at every
    step (greedy or sampled), -100 bans the greedy choice; logprobs stay the raw model's."""
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=0)
    first = plain.choices[0].logprobs.tokens[0]
    ids = http.post("/tokenize", json={"prompt": first, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1
    banned = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                       logprobs=0, logit_bias={str(ids[0]): -100})
    assert banned.choices[0].logprobs.tokens[0] != first
    forced = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=1.0,
                                            logit_bias={"30": 100})
    detok = http.post("/detokenize", json={"tokens": [30] * 5}).json()["prompt"]
    assert forced.choices[0].message.content == detok and forced.usage.completion_tokens == 5


def test_allowed_token_ids_and_truncate_prompt_tokens(client, http, offline):
    """vLLM's allowed_token_ids (sampling limited to a set, greedy and sampled) and
    truncate_prompt_tokens (only the prompt's last k tokens are computed: the same completion as
    sending those ids, and a prompt longer than the context then fits)."""
    for temperature in (0.0, 1.0):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=temperature,
                                      logprobs=0, extra_body={"allowed_token_ids": [30, 31, 32]})
        ids = http.post("/tokenize", json={"prompt": "".join(r.choices[0].logprobs.tokens),
                                           "add_special_tokens": False}).json()["tokens"]
        assert r.usage.completion_tokens == 6 and set(ids) <= {30, 31, 32}, ids
    ids = http.post("/tokenize", json={"prompt": PROMPTS[1]}).json()["tokens"]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 3})
    direct = client.completions.create(model=MODEL, prompt=ids[-3:], max_tokens=5, temperature=0)
    assert cut.usage.prompt_tokens == 3 and cut.choices[0].text == direct.choices[0].text
    long = "hello " * (MAX_MODEL_LEN + 50)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=2,
                                       extra_body={"truncate_prompt_tokens": 64})
    assert r.usage.prompt_tokens == 64 and r.usage.completion_tokens == 2


def test_unknown_fields_are_ignored(client):
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=2,
        temperature=0,
        user="u1",
        extra_body={"not_a_field": [1, 2]},
    )
    assert r.usage.completion_tokens == 2


def test_api_key_required(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.base_url + "/health").status_code == 200  # probes need no key
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)


def test_retrieve_model(client):
    """OpenAI's GET /v1/models/{model} (`client.models.retrieve`; was a 404 for every name)."""
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_top_k_past_the_vocabulary_keeps_every_token(client):
    """A top_k of at least the vocabulary filters nothing, as top_k 0; past 2**64 it was a 500
    (msgpack cannot carry it to the worker)."""
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=11)
    want = client.completions.create(**kw).choices[0].text
    for top_k in (10**6, 2**64):
        assert client.completions.create(**kw, extra_body={"top_k": top_k}).choices[0].text == want


def test_chat_template_kwargs_may_set_add_generation_prompt(client, http):
    """vLLM lets chat_template_kwargs override add_generation_prompt (it was a TypeError, 500)."""
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    want = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()["count"]
    assert r.usage.prompt_tokens == want < http.post("/tokenize", json={"messages": CHAT}).json()["count"]


def test_still_healthy_after_bad_input(server, client):
    assert server.health() == 200
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


# ---------------------------------------------------------------- metrics


def test_metrics_count_every_request(http, client):
    wait_idle(http)
    before = metric_values(http)
    n, max_tokens = 4, 5
    for i in range(n):
        client.completions.create(
            model=MODEL,
            prompt=f"Count to {i}:",
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    after = wait_idle(http)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    lab = {"model_name": MODEL, "role": "both"}
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
              "request_prefill_time_seconds", "request_decode_time_seconds", "request_time_per_output_token_seconds"):  # fmt: skip
        assert delta(f"pdserve:{h}_count", **lab) == n, h
    assert delta("pdserve:inter_token_latency_seconds_count", **lab) == n * (max_tokens - 1)
    ttft, e2e = (
        delta("pdserve:time_to_first_token_seconds_sum", **lab),
        delta("pdserve:e2e_request_latency_seconds_sum", **lab),
    )
    assert 0 < ttft < e2e < 600
    assert 0 <= delta("pdserve:request_queue_time_seconds_sum", **lab) < e2e
    assert 0 < delta("pdserve:request_decode_time_seconds_sum", **lab) < e2e
    assert delta("pdserve:generation_tokens_total", **lab) == n * max_tokens
    assert delta("pdserve:prompt_tokens_total", **lab) >= n * 3
    assert delta("pdserve:request_success_total", finished_reason="length", **lab) == n
    assert delta("pdserve:http_requests_total", handler="/v1/completions", status="200") == n
    assert delta("pdserve:prefix_cache_queries_total", worker_id="worker-0") > 0
    assert metric(after, "pdserve:http_requests_total", status="401") >= 0


# ---------------------------------------------------------------- admission and disconnects


async def _open_stream(
    ac: httpx.AsyncClient,
    max_tokens: int,
    chunks_before_cancel: int | None = None,
    started: asyncio.Event | None = None,
    release: asyncio.Event | None = None,
) -> str:
    """Stream a completion; leave mid-stream after `chunks_before_cancel` chunks, or once
    `release` is set (leaving the `async with` closes the connection)."""
    body = {"model": MODEL, "prompt": "Tell me a long story:", "max_tokens": max_tokens, "temperature": 0.7,
            "ignore_eos": True, "stream": True}  # fmt: skip
    async with ac.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                seen += 1
                if started is not None:
                    started.set()
                if chunks_before_cancel is not None and seen >= chunks_before_cancel:
                    return "cancelled"
                if release is not None and release.is_set():
                    return "cancelled"
        return "finished"


def test_disconnects_abort_and_free_everything(server, http):
    wait_idle(http)
    before = metric_values(http)

    async def main() -> list[str]:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300
        ) as ac:
            tasks = [
                _open_stream(ac, 400, 3) if i % 2 else _open_stream(ac, 8, None) for i in range(20)
            ]
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert results.count("cancelled") == 10 and results.count("finished") == 10
    after = wait_idle(http, timeout=60)  # running, waiting and KV usage all back to 0
    lab = {"model_name": MODEL, "role": "both"}
    aborted = metric(
        after, "pdserve:request_success_total", finished_reason="abort", **lab
    ) - metric(before, "pdserve:request_success_total", finished_reason="abort", **lab)
    assert aborted == 10
    generated = metric(after, "pdserve:generation_tokens_total", **lab) - metric(
        before, "pdserve:generation_tokens_total", **lab
    )
    assert generated < 10 * 8 + 10 * 100, "cancelled streams kept generating"


def test_non_streaming_disconnect_aborts(server, http):
    wait_idle(http)
    body = {"model": MODEL, "prompt": "Write an essay:", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.base_url + "/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=2.0,
        )
    v = wait_idle(http, timeout=30)
    assert metric(v, "pdserve:http_requests_total", handler="/v1/completions", status="499") >= 1


def test_over_capacity_gets_429_with_retry_after(server, http):
    wait_idle(http)

    async def main() -> tuple[int, str | None]:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300
        ) as ac:
            release = asyncio.Event()
            started = [asyncio.Event() for _ in range(MAX_PENDING)]
            held = [
                asyncio.create_task(_open_stream(ac, 400, started=e, release=release))
                for e in started
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 240)
            r = await ac.post(
                "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
            )
            release.set()
            await asyncio.gather(*held)
            return r.status_code, r.headers.get("retry-after")

    status, retry_after = asyncio.run(main())
    assert status == 429 and retry_after is not None and int(retry_after) > 0
    wait_idle(http)
