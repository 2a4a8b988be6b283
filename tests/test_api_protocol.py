"""Request parsing, prompt processing, SSE framing, error bodies and logprobs shapes, without a
server (the real tokenizer of the embedded model; no worker)."""

from __future__ import annotations

import msgspec
import pytest
from pydantic import ValidationError

from server.api.errors import error_body
from server.api.logprobs import CompletionLogprobs, chat_logprobs, merge_completion_logprobs
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.sse import DONE, sse_event
from server.engine.outputs import TokenLogprobs
from server.frontend.prompts import chat_prompt, completion_prompts, resolve_max_tokens
from server.frontend.tokenizer_loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_completion_request_maps_to_sampling_params():
    req = CompletionRequest.model_validate(
        {
            "prompt": "hi",
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "min_p": 0.1,
            "seed": 7,
            "stop": "\n",
            "stop_token_ids": [2],
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repetition_penalty": 1.2,
            "ignore_eos": True,
            "min_tokens": 2,
            "user": "u",
            "some_future_field": {"x": 1},
        }
    )
    assert req.unknown_fields() == ["some_future_field"]
    p = req.sampling_params(max_tokens=8, logprobs=3, vocab_size=100)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (
        8,
        0.5,
        0.9,
        5,
        0.1,
        7,
    )
    assert p.stop == ["\n"] and p.stop_token_ids == [2] and p.ignore_eos and p.min_tokens == 2
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.logprobs == 3


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "temperature": 3.0},
        {"prompt": "x", "top_p": 0.0},
        {"prompt": "x", "logprobs": 21},
        {"prompt": "x", "stop_token_ids": [10**6]},
        {"prompt": "x", "min_tokens": 9},
        {"prompt": "x", "stop": [""]},
        {"prompt": "x", "logit_bias": {"5": 101}},
        {"prompt": "x", "logit_bias": {"49152": 1}},
        {"prompt": "x", "logit_bias": {"-1": 1}},
        {"prompt": "x", "logit_bias": {"abc": 1}},
        {"prompt": "x", "allowed_token_ids": []},
        {"prompt": "x", "allowed_token_ids": [49152]},
    ],
)
def test_out_of_range_values_raise_value_error(body):
    req = CompletionRequest.model_validate(body)
    with pytest.raises(ValueError):
        req.check()
        req.sampling_params(max_tokens=8, logprobs=req.logprobs, vocab_size=49152)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "max_tokens": "many"},
        {"prompt": "x", "temperature": "hot"},
        {"prompt": 5},
        {"prompt": "x", "n": 0},
        {"messages": []},
        {"messages": "hello"},
    ],
)
def test_wrong_types_are_validation_errors(body):
    model = ChatCompletionRequest if "messages" in body else CompletionRequest
    with pytest.raises(ValidationError):
        model.model_validate(body)


def test_chat_cross_field_rules():
    with pytest.raises(ValueError, match="top_logprobs"):
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
        ).check()
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "logprobs": True,
        }
    )
    assert req.requested_max_tokens() == 7 and req.requested_logprobs() == 0
    with pytest.raises(ValueError, match="stream_options"):
        CompletionRequest.model_validate(
            {"prompt": "x", "stream_options": {"include_usage": True}}
        ).check()


def test_completion_prompt_forms(tokenizer):
    one = completion_prompts(tokenizer, "Hello world")
    assert [p.token_ids for p in one] == [tokenizer.encode("Hello world")] and one[
        0
    ].text == "Hello world"
    assert [p.token_ids for p in completion_prompts(tokenizer, ["a", "b"])] == [
        tokenizer.encode("a"),
        tokenizer.encode("b"),
    ]
    assert completion_prompts(tokenizer, [1, 2, 3])[0].token_ids == [1, 2, 3]
    assert [p.token_ids for p in completion_prompts(tokenizer, [[1], [2, 3]])] == [[1], [2, 3]]
    for empty in ("", [], [[]]):
        with pytest.raises(ValueError):
            completion_prompts(tokenizer, empty)


def test_chat_prompt_uses_the_models_template(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    prompt = chat_prompt(tokenizer, msgs)
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert prompt.token_ids == tokenizer.encode(prompt.text, add_special_tokens=False)
    cont = chat_prompt(
        tokenizer,
        [*msgs, {"role": "assistant", "content": "Hel"}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert cont.text.endswith("<|im_start|>assistant\nHel")
    with pytest.raises(ValueError):
        chat_prompt(
            tokenizer, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
        )


def test_chat_template_kwargs(tokenizer):
    """chat_template_kwargs reach the template and may set add_generation_prompt (vLLM); keys the
    server passes itself, or of the wrong type, are a ValueError (they were a TypeError)."""
    msgs = [{"role": "user", "content": "hi"}]
    off = chat_prompt(tokenizer, msgs, template_kwargs={"add_generation_prompt": False})
    assert off == chat_prompt(tokenizer, msgs, add_generation_prompt=False)
    for bad in ({"messages": []}, {"eos_token": "x"}, {"tools": 5}, {"tools": [1]}, {"chat_template": [1]}):
        with pytest.raises(ValueError, match="chat_template_kwargs"):
            chat_prompt(tokenizer, msgs, template_kwargs=bad)
    # a generation prompt after a message to continue, asked for either way
    for kw in ({}, {"add_generation_prompt": True}):
        with pytest.raises(ValueError, match="cannot both be true"):
            chat_prompt(tokenizer, msgs, add_generation_prompt=not kw, continue_final_message=True,
                        template_kwargs=kw)


def test_top_k_at_least_the_vocabulary_is_off():
    req = CompletionRequest.model_validate({"prompt": "hi", "top_k": 2**70})
    assert req.sampling_params(4, None, 1000).top_k == 0
    assert msgspec.msgpack.encode(req.sampling_params(4, None, None))  # fits the wire
    req = CompletionRequest.model_validate({"prompt": "hi", "top_k": 999})
    assert req.sampling_params(4, None, 1000).top_k == 999


def test_context_limits_name_both_numbers():
    assert resolve_max_tokens(None, 10, 100) == 90
    assert resolve_max_tokens(5, 10, 100) == 5
    with pytest.raises(ValueError, match="100 tokens.*prompt has 100 tokens"):
        resolve_max_tokens(None, 100, 100)
    with pytest.raises(ValueError, match="100 tokens.*requested 101 tokens"):
        resolve_max_tokens(91, 10, 100)
    with pytest.raises(ValueError, match="^max_tokens must be at least 1"):
        resolve_max_tokens(-1, 10, 100)
    # chat's max_completion_tokens: the message names the field the client sent
    with pytest.raises(ValueError, match="^max_completion_tokens must be at least 1"):
        resolve_max_tokens(0, 10, 100, "max_completion_tokens")
    with pytest.raises(ValueError, match="prompt or max_completion_tokens"):
        resolve_max_tokens(91, 10, 100, "max_completion_tokens")


def test_sse_framing_bytes():
    assert sse_event({"a": 1, "b": "é\n"}) == b'data: {"a":1,"b":"\xc3\xa9\\n"}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    assert msgspec.json.decode(sse_event(error_body(400, "bad"))[6:]) == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": 400}
    }


def test_logprobs_shapes():
    texts = {1: "Hel", 2: "lo", 3: "p"}
    lps = [
        TokenLogprobs(1, -0.5, 1, [1, 3], [-0.5, -1.0]),
        TokenLogprobs(2, float("-inf"), 4, [3], [-0.1]),
    ]
    acc = CompletionLogprobs(texts.__getitem__)
    merged = merge_completion_logprobs([acc.prompt([3]), acc.generated(lps)])
    assert merged["tokens"] == ["p", "Hel", "lo"]
    assert merged["token_logprobs"] == [None, -0.5, -9999.0]
    assert merged["top_logprobs"][0] is None
    assert merged["top_logprobs"][1] == {"Hel": -0.5, "p": -1.0}
    assert merged["top_logprobs"][2] == {
        "p": -0.1,
        "lo": -9999.0,
    }  # the sampled token is always there
    assert merged["text_offset"] == [0, 1, 4]
    chat = chat_logprobs(texts.__getitem__, lps[:1])
    assert chat == [
        {
            "token": "Hel",
            "logprob": -0.5,
            "bytes": list(b"Hel"),
            "top_logprobs": [
                {"token": "Hel", "logprob": -0.5, "bytes": list(b"Hel")},
                {"token": "p", "logprob": -1.0, "bytes": list(b"p")},
            ],
        }
    ]


def test_logit_bias_maps_string_ids():
    req = CompletionRequest.model_validate({"prompt": "x", "logit_bias": {"5": -100, "7": 2.5}})
    assert req.sampling_params(max_tokens=8, logprobs=None, vocab_size=49152).logit_bias == {5: -100.0, 7: 2.5}


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        ({"response_format": {"type": "json_object"}}, False),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, False),
        ({"response_format": {"type": "text"}}, True),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, False),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, False),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}, True),
        ({"tools": []}, True),
        ({"functions": [{"name": "f"}]}, False),
        ({"guided_json": {"type": "object"}}, False),
        ({"guided_choice": ["a", "b"]}, False),
        ({"guided_regex": None}, True),  # null: not asked for
        ({"bad_words": ["x"]}, False),
        ({"some_future_field": 1}, True),  # unknown fields are ignored, as vLLM does
    ],
)
def test_output_constraints_this_server_cannot_honour_are_rejected(extra, ok):
    """Guided decoding and tool calls are not implemented: asked for, they are a 400 (ignoring
    them would return output that silently breaks the caller's contract)."""
    for body in ({"prompt": "x", **extra}, {"messages": [{"role": "user", "content": "x"}], **extra}):
        req = (ChatCompletionRequest if "messages" in body else CompletionRequest).model_validate(body)
        if ok:
            req.check()
        else:
            with pytest.raises(ValueError, match="not supported"):
                req.check()


def test_truncate_prompt_tokens_keeps_the_last_ids():
    from server.frontend.prompts import Prompt, truncate_prompt

    p = Prompt([1, 2, 3, 4], "text")
    assert truncate_prompt(p, None) is p and truncate_prompt(p, 4) is p
    assert truncate_prompt(p, 2) == Prompt([3, 4], None)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "truncate_prompt_tokens": 0})
