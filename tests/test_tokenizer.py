"""Tokenizer and chat template vs HF transformers, on the embedded SmolLM2 GGUF and on tiny
GGUF files written here (SentencePiece, byte-level without a template, unsupported types)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from server.models.chat_template import ChatTemplateError, render_chat_template
from server.models.tokenizer import Tokenizer, UnsupportedTokenizerError

TEXTS = [
    "Hello world",
    "Hello, world! How are you?",
    "12345",
    "3.14159 and 2,000,000",
    "abc123def",
    "   lots   of\t\tspaces  ",
    "trailing space ",
    " leading space",
    "line1\nline2\n\n\nline3\r\n",
    "\n",
    " ",
    "",
    "don't I'll we've THEY'RE",
    "héllo wörld ñandú",
    "日本語のテキスト 中文 한국어",
    "emoji 😀🎉 family 👨‍👩‍👧 flag 🇫🇷",
    "Ω≈ç√∫ åß∂ƒ©",
    "\u200b\ufeffzero width",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>more",
    "<|im_start|",
    "a" * 100,
]

MESSAGES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr! 😀"},
        {"role": "user", "content": "多谢"},
    ],
]


@pytest.fixture(scope="module")
def ours(smollm_tokenizer: Tokenizer) -> Tokenizer:
    return smollm_tokenizer


@pytest.fixture(scope="module")
def hf(gguf_path: str):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


# --------------------------------------------------------------------- SmolLM2 GGUF vs HF


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(ours: Tokenizer, hf, text: str) -> None:
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )


def test_random_text_matches_reference_pipeline(ours: Tokenizer, hf) -> None:
    # transformers' GGUF loader gives "smollm" GPT-2's split without SmolLM2's digit isolation
    # (tokenizer.json: Digits(individual) + ByteLevel; llama.cpp: \p{N} then the GPT-2 regex).
    # The two differ only for whitespace before a digit (see the test below), so random text
    # is checked against HF's vocabulary/merges/special tokens with the published pipeline.
    reference = HFTokenizer.from_str(hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    rng = random.Random(1234)
    alphabet = "ab Zé1 9\n\t😀中<|>'s"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids, text
        assert ours.decode(ids) == reference.decode(ids) == text


def test_whitespace_before_digit_follows_smollm_pretokenizer(ours: Tokenizer) -> None:
    # Digits are isolated before the GPT-2 split, so the spaces form their own piece ("ĠĠ"),
    # as in SmolLM2's tokenizer.json and llama.cpp (HF's GGUF loader yields "Ġ", "Ġ", "1").
    ids = ours.encode("x  1")
    assert [ours.id_to_token(i) for i in ids] == ["x", "ĠĠ", "1"]


def test_decode_random_ids_matches_hf(ours: Tokenizer, hf) -> None:
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        ids += rng.sample(range(17), 2)  # special tokens too
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_and_metadata(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == len(hf) == 49152
    assert (ours.bos_token, ours.bos_token_id) == ("<|im_start|>", 1)
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2)
    # <|im_end|> from metadata; <|endoftext|> because the ChatML template marks this family.
    assert ours.eos_token_ids == frozenset({0, 2})
    assert not ours.add_bos_token  # tokenizer.ggml.add_bos_token = False
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False) == [6004]
    assert ours.encode("<|im_start|>") == [1]
    assert ours.id_to_token(1) == "<|im_start|>"
    assert ours.decode([1, 6004, 2]) == "hi"
    assert ours.decode([1, 6004, 2], skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_template_matches_hf(ours: Tokenizer, hf, messages, add_generation_prompt) -> None:
    expected = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == (
        expected
    )


def test_chat_content_parts_are_flattened(ours: Tokenizer) -> None:
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    plain = [{"role": "user", "content": "a\nb"}]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template(plain)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="image_url"):
        ours.apply_chat_template(image)


# ------------------------------------------------------------------------------ HF folder


def test_hf_folder_round_trip(hf, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    folder = Tokenizer.from_hf_folder(tmp_path)
    for text in TEXTS:
        assert folder.encode(text) == hf.encode(text), text
    assert (folder.bos_token_id, folder.eos_token_id) == (1, 2)
    assert folder.vocab_size == len(hf)
    assert folder.apply_chat_template(MESSAGES[1]) == hf.apply_chat_template(
        MESSAGES[1], add_generation_prompt=True, tokenize=False
    )


def test_hf_folder_config_variants(hf, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
    ]
    config["add_bos_token"] = True
    config["bos_token"] = {"content": "<|im_start|>", "special": True}
    config_path.write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))

    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.add_bos_token and tok.encode("hi") == [1, 6004]
    assert tok.encode("hi", add_special_tokens=False) == [6004]
    assert {2, 5} <= tok.eos_token_ids
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "Dx"
    assert tok.apply_chat_template(msgs, tools=[{"type": "function"}]) == "T1"
    assert tok.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T0"


def test_hf_folder_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


# -------------------------------------------------------------------- tiny written GGUFs


def _byte_alphabet() -> list[str]:
    # GPT-2's printable spelling of the 256 bytes (the vocabulary a byte-level BPE starts from).
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _write_gguf(path: Path, *, model: str, tokens, types, **extra) -> Path:
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if "pre" in extra:
        writer.add_tokenizer_pre(extra["pre"])
    if "merges" in extra:
        writer.add_token_merges(extra["merges"])
    if "scores" in extra:
        writer.add_token_scores(extra["scores"])
    if "template" in extra:
        writer.add_chat_template(extra["template"])
    writer.add_bos_token_id(extra.get("bos", 1))
    writer.add_eos_token_id(extra.get("eos", 2))
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_level_gguf(path: Path, pre: str) -> Path:
    tokens = ["<|endoftext|>", "<s>", "</s>", *_byte_alphabet(), "he", "ll", "hell", "hello", "Ġw"]
    types = [3, 3, 3] + [1] * 256 + [1] * 5
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    return _write_gguf(path, model="gpt2", tokens=tokens, types=types, pre=pre, merges=merges)


def test_byte_level_gguf_without_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(_byte_level_gguf(tmp_path / "bl.gguf", "default"))
    ids = tok.encode("hello world")
    assert [tok.id_to_token(i) for i in ids][:2] == ["hello", "Ġw"]
    assert tok.decode(ids) == "hello world"
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unsupported_pre_tokenizer_is_named(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTokenizerError, match="'made-up-bpe'"):
        Tokenizer.from_gguf(_byte_level_gguf(tmp_path / "bl.gguf", "made-up-bpe"))


def test_unsupported_tokenizer_model_is_named(tmp_path: Path) -> None:
    path = _write_gguf(
        tmp_path / "rwkv.gguf", model="rwkv", tokens=["a", "b", "c"], types=[1, 1, 1]
    )
    with pytest.raises(UnsupportedTokenizerError, match="'rwkv'"):
        Tokenizer.from_gguf(path)


def test_sentencepiece_gguf_matches_hf(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "s", "he", "ll", "llo", "hello",
              "▁hello", "▁h", "▁w", "or", "orl", "world", "▁world", "▁t", "th", "▁th", "▁the",
              "es", "est", "▁test", "▁▁", "▁▁▁▁", "日", "本", "日本", "▁日本"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces, "<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    path = _write_gguf(
        tmp_path / "spm.gguf", model="llama", tokens=tokens, types=types, scores=scores,
        template=template,
    )  # fmt: skip
    ours = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    rng = random.Random(3)
    texts = [
        "hello world",
        "  hello  world ",
        "the test",
        "日本語",
        "<s>hi</s>",
        "a<think>b",
        "é😀",
    ]
    texts += [
        "".join(rng.choice("helo wrdt日本\n<s>") for _ in range(rng.randint(0, 20)))
        for _ in range(200)
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.add_bos_token and ours.encode("")[:1] == [1]
    assert ours.apply_chat_template([{"role": "user", "content": "q"}]) == "[INST] q [/INST]"


# ------------------------------------------------------------------------- chat templates


def test_template_helpers_behave_like_transformers() -> None:
    tools = [{"name": "f", "description": "<a & b>", "params": {"x": "é"}}]
    out = render_chat_template(
        "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "{% generation %}G{% endgeneration %}{{ bos_token }}{{ custom }}",
        [],
        tools=tools,
        bos_token="<s>",
        custom="K",
    )
    compact, indented, rest = out.split("|")
    assert json.loads(compact) == tools and "<a & b>" in compact and "é" in compact
    assert indented == json.dumps(tools[0], indent=2, ensure_ascii=False)
    assert rest == "401G<s>K"


def test_template_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="nope"):
        render_chat_template("{{ raise_exception('nope') }}", [])
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat_template("{% for %}", [])
    with pytest.raises(ChatTemplateError):
        render_chat_template("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(ChatTemplateError):  # the sandbox blocks attribute escapes
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat_template(None, [{"role": "user", "content": "x"}])


def test_template_sees_reasoning_under_both_names() -> None:
    messages = [{"role": "assistant", "content": "4", "reasoning": "2+2"}]
    out = render_chat_template(
        "{{ messages[0].reasoning_content }}|{{ messages[0].thinking }}|{{ documents is none }}",
        messages,
    )
    assert out == "2+2|2+2|True"
