"""IncrementalDetokenizer on the embedded SmolLM2 tokenizer: streamed text equals the batch
decode, multi-byte characters are never split, and stop strings are never emitted in part."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE

from server.engine.detokenizer import IncrementalDetokenizer
from server.models.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "Emoji time: 😀🎉👨‍👩‍👧🇫🇷 and more 🤖!",
    "日本語のテキストと中文文本，还有한국어도 있어요.",
    "Ünïcödé àccents: café, naïve, façade, Ωmega ∑ ≈ √",
    "def main():\n    print('hello')\n\n\treturn 0\n",
    "Spaces   and\ttabs\n\nnewlines   end ",
]


@pytest.fixture(scope="module")
def tok(smollm_tokenizer: Tokenizer) -> Tokenizer:
    return smollm_tokenizer


@pytest.fixture(scope="module")
def encoded(tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(text) for text in CORPUS]


def _random_output(rng: random.Random, encoded: list[list[int]]) -> list[int]:
    """Concatenated random slices of real encodings: they may cut characters anywhere."""
    out: list[int] = []
    for _ in range(rng.randint(1, 4)):
        ids = rng.choice(encoded)
        start = rng.randrange(len(ids))
        out += ids[start : start + rng.randint(1, 15)]
    return out


def _chunks(rng: random.Random, ids: list[int], max_chunk: int) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        chunks.append(ids[i : i + n])
        i += n
    return chunks


def _stream(detok: IncrementalDetokenizer, chunks: list[list[int]], flush: bool = True) -> str:
    text = ""
    for chunk in chunks:
        delta = detok.step(chunk)
        text += delta.text
        assert text == detok.output_text
        if delta.stop_str is not None:
            return text
    return text + (detok.flush() if flush else "")


@pytest.mark.parametrize("max_chunk", [1, 3, 8])
def test_stream_equals_batch_decode(tok: Tokenizer, encoded, max_chunk: int) -> None:
    rng = random.Random(max_chunk)
    prompt = tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    for _ in range(150):
        out = _random_output(rng, encoded)
        detok = IncrementalDetokenizer(tok, prompt)
        assert _stream(detok, _chunks(rng, out, max_chunk)) == tok.decode(out)


def test_multibyte_characters_are_never_split(tok: Tokenizer, encoded) -> None:
    # Whole encodings of valid text: no delta may contain U+FFFD, and every delta is a piece of
    # the original text that ends on a character boundary.
    for text, ids in zip(CORPUS, encoded, strict=True):
        assert tok.decode(ids) == text
        split_tokens = sum("\ufffd" in tok.decode([i]) for i in ids)
        assert split_tokens or "😀" not in text  # the corpus does exercise split characters
        detok = IncrementalDetokenizer(tok, [])
        emitted = ""
        for token in ids:
            delta = detok.step([token]).text
            assert "\ufffd" not in delta
            emitted += delta
            assert text.startswith(emitted)
        assert emitted + detok.flush() == text


def test_skip_special_tokens_false_keeps_them(tok: Tokenizer, encoded) -> None:
    out = encoded[0][:5] + [2] + encoded[1][:6] + [0]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, [1], skip_special_tokens=skip)
        streamed = _stream(detok, [[t] for t in out])
        assert streamed == tok.decode(out, skip_special_tokens=skip)
    assert "<|im_end|>" in tok.decode(out, skip_special_tokens=False)


def test_flush_releases_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")
    detok = IncrementalDetokenizer(tok, [])
    streamed = "".join(detok.step([t]).text for t in ids[:-1])  # the emoji's last byte is missing
    # " 😀" starts with a token holding the space and 3 of the emoji's 4 bytes: the space is
    # released at once, the unfinished emoji waits.
    assert streamed == "ok "
    assert streamed + detok.flush() == tok.decode(ids[:-1]) == "ok \ufffd"  # as decode renders it
    with pytest.raises(RuntimeError):
        detok.step([ids[-1]])


# ------------------------------------------------------------------------------ stop strings


def _expected(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Text before (or through) the stop that generation completes first."""
    hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if not hits:
        return full, None
    end, start, stop = min(hits, key=lambda h: (h[0], h[1]))
    return full[: end if include else start], stop


def _check_stream(tok, prompt, out, stops, include, chunks):
    full = tok.decode(out)
    expected, expected_stop = _expected(full, stops, include)
    detok = IncrementalDetokenizer(tok, prompt, stop=stops, include_stop_str_in_output=include)
    emitted, stop_hit = "", None
    for chunk in chunks:
        delta = detok.step(chunk)
        emitted += delta.text
        # Every state of the stream is a prefix of the final output: nothing is retracted,
        # and (without include) no part of a stop string is ever shown.
        assert expected.startswith(emitted), (emitted, expected)
        if delta.stop_str is not None:
            stop_hit = delta.stop_str
            break
    if stop_hit is None:
        emitted += detok.flush()
    assert (emitted, stop_hit) == (expected, expected_stop)
    assert detok.output_text == emitted


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("max_chunk", [1, 4])
def test_random_stop_strings(tok: Tokenizer, encoded, include: bool, max_chunk: int) -> None:
    rng = random.Random(100 * include + max_chunk)
    for _ in range(150):
        out = _random_output(rng, encoded)
        full = tok.decode(out)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if full and rng.random() < 0.8:  # a substring of the output: spans tokens or not
                start = rng.randrange(len(full))
                # U+FFFD marks bytes cut by the random slicing; real stops never contain it.
                stops.append(full[start : start + rng.randint(1, 8)].split("\ufffd")[0] or "x")
            else:  # one that never completes but shares prefixes with the text
                stops.append(rng.choice(["the lazy cat", "😀😀", "\n\n\n\n", "fox jumps high"]))
        _check_stream(tok, [1], out, stops, include, _chunks(rng, out, max_chunk))


def test_stop_inside_one_token(tok: Tokenizer) -> None:
    ids = tok.encode("Say hello world")
    hello = next(i for i in ids if tok.decode([i]) == " hello")
    assert hello in ids
    detok = IncrementalDetokenizer(tok, [], stop=["ell"])
    texts = [detok.step([t]) for t in ids[: ids.index(hello) + 1]]
    assert "".join(d.text for d in texts) == "Say h"
    assert texts[-1].stop_str == "ell"


def test_stop_spanning_tokens_and_chunk(tok: Tokenizer) -> None:
    ids = tok.encode("alpha beta gamma delta")
    assert len(ids) >= 4
    for include, expected in ((False, "alpha be"), (True, "alpha beta gam")):
        detok = IncrementalDetokenizer(tok, [], stop=["ta gam"], include_stop_str_in_output=include)
        delta = detok.step(ids)  # one chunk running past the stop: truncated exactly there
        assert delta == (expected, "ta gam")
        assert detok.output_text == expected and detok.finished
        with pytest.raises(RuntimeError):
            detok.step([ids[0]])
        assert detok.flush() == ""


def test_held_back_text_is_flushed(tok: Tokenizer) -> None:
    ids = tok.encode("the end is near")
    detok = IncrementalDetokenizer(tok, [], stop=["near by", "zzz"])
    streamed = "".join(detok.step([t]).text for t in ids)
    assert streamed == "the end is "  # " near" could still become "near by"
    assert detok.flush() == "near"
    assert detok.output_text == "the end is near"


def test_check_stop_false_does_not_stop(tok: Tokenizer) -> None:
    first, second = tok.encode("one STOP two"), tok.encode(" three STOP four")
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    delta = detok.step(first, check_stop=False)
    assert delta.stop_str is None and delta.text == "one STOP two"
    delta = detok.step(second)  # the earlier occurrence is not re-detected
    assert delta == (" three ", "STOP")
    assert detok.output_text == "one STOP two three "


def test_stop_straddling_check_stop_false_boundary(tok: Tokenizer) -> None:
    # A stop completed by a checked step counts even if it began in an unchecked one, and its
    # beginning was held back meanwhile.
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert detok.step(tok.encode("go ST"), check_stop=False).text == "go "
    assert detok.step(tok.encode("OP now")) == ("", "STOP")
    assert detok.output_text == "go "


def test_first_completed_stop_wins(tok: Tokenizer) -> None:
    ids = tok.encode("abcdef")
    detok = IncrementalDetokenizer(tok, [], stop=["bcdef", "cd"])
    assert detok.step(ids) == ("ab", "cd")


# ---------------------------------------------------------------- SentencePiece leading space


def test_first_token_decoded_in_prompt_context() -> None:
    # SentencePiece decoders strip the space of a text's first "▁word"; a generated "▁world"
    # after a prompt must still stream as " world".
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁hello": 4, "▁world": 5, "!": 6}
    backend = HFTokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    spm = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    assert spm.decode([5]) == "world"
    detok = IncrementalDetokenizer(spm, [1, 4])
    assert detok.step([5]).text + detok.step([6]).text + detok.flush() == " world!"
