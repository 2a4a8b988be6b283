"""The model's tokenizer: text <-> token ids, special tokens, and the chat template.

`Tokenizer` wraps a HF `tokenizers.Tokenizer` (`.backend`) built either from a GGUF file's
metadata (`from_gguf`: the vocabulary, merges and token types that llama.cpp stores, turned back
into the pipeline the model's original `tokenizer.json` had) or from a HF model folder
(`from_hf_folder`). Everything else in the server sees only this class.

Supported GGUF tokenizers (`tokenizer.ggml.model` / `tokenizer.ggml.pre`):
  * "gpt2" (byte-level BPE) with pre-tokenizer "smollm"/"starcoder"/"refact" (digits split one
    by one, then GPT-2's split), "llama-bpe"/"llama3"/"llama-v3"/"smaug-bpe"/"falcon3"
    (Llama 3), "qwen2"/"deepseek-r1-qwen" (Qwen2, with its NFC normalizer) and
    "default"/"gpt2"/"gpt-2" (GPT-2's split);
  * "llama" (SentencePiece BPE: Llama 2, Mistral, TinyLlama...) rebuilt as HF does it: a BPE
    over the vocabulary with byte fallback, merges recovered from the piece scores, and a
    Metaspace prefix space.
Anything else raises `UnsupportedTokenizerError`, naming the type, instead of silently
tokenizing differently from the way the model was trained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from server.models.chat_template import render_chat_template, select_chat_template
from server.models.gguf_file import GGUFFile

__all__ = ["Tokenizer", "UnsupportedTokenizerError"]


class UnsupportedTokenizerError(ValueError):
    """The model's tokenizer is of a kind this server cannot reproduce exactly."""


# llama.cpp's token types (gguf.TokenType), as stored in tokenizer.ggml.token_type.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of the original tokenizer.json files (applied before byte-level mapping).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BYTE_LEVEL_FAMILIES = {
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
    "falcon3": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    # Files that name no pre-tokenizer get GPT-2's split, as in transformers (llama.cpp's
    # "default" is its own regex set, meant for the same GPT-2-style vocabularies).
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
}

# Special tokens that end an assistant turn, keyed by a marker whose presence in the chat template
# identifies the template family. A GGUF or tokenizer_config often names only the pretraining EOS
# (Llama 3 base: <|end_of_text|>) while the chat format ends turns with another token
# (<|eot_id|>); a server stopping only on the former would run every chat reply to max_tokens.
# ChatML models (SmolLM, Qwen) may also emit the document separator <|endoftext|> to finish.
_END_OF_TURN_FAMILIES: dict[str, tuple[str, ...]] = {
    "<|im_end|>": ("<|im_end|>", "<|endoftext|>"),
    "<|eot_id|>": ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
    "<|end_of_text|>": ("<|end_of_text|>",),
    "<end_of_turn>": ("<end_of_turn>",),
    "<|end|>": ("<|end|>",),
}


class Tokenizer:
    """A model's tokenizer.

    Contracts:
      * `encode(text)` returns exactly the ids of the model's original `tokenizer.json` pipeline
        (for GGUF: as rebuilt from metadata, the way llama.cpp tokenizes; transformers' own
        GGUF loader drops SmolLM's digit split, see tests); special-token strings in the text
        (e.g. "<|im_start|>") map to their ids;
        BOS (and EOS) are added only when the model's metadata says so and
        `add_special_tokens` is true.
      * `decode(ids)` drops special tokens unless `skip_special_tokens=False`.
      * `eos_token_ids` is every id that ends generation (see `_END_OF_TURN_FAMILIES`).
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.eos_token_ids: frozenset[int] = frozenset(self._compute_eos_ids(extra_eos_token_ids))
        # Whether encode() adds BOS: probe the backend's post-processor instead of trusting a
        # flag, because tokenizer.json files add BOS through their own TemplateProcessing.
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_gguf(cls, path_or_file: str | os.PathLike[str] | GGUFFile) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's `tokenizer.*` metadata.

        Raises `UnsupportedTokenizerError` for a tokenizer model / pre-tokenizer type that is not
        supported, naming it; `ValueError` if the file has no tokenizer.
        """
        gf = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
        meta = gf.fields  # key -> str / int / float / bool / list
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or not tokens:
            raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
        token_types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        scores = meta.get("tokenizer.ggml.scores")
        if len(token_types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
            raise ValueError("GGUF tokenizer arrays (tokens, token_type, scores) differ in length")
        if model == "gpt2":
            backend = _byte_level_bpe(
                tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre")
            )
            default_add_bos = False
        elif model == "llama":
            if scores is None and meta.get("tokenizer.ggml.merges") is None:
                raise UnsupportedTokenizerError(
                    "GGUF SentencePiece ('llama') tokenizer has neither scores nor merges"
                )
            backend = _sentencepiece_bpe(
                tokens,
                token_types,
                scores,
                meta.get("tokenizer.ggml.merges"),
                add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            )
            # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
            default_add_bos = True
        else:
            raise UnsupportedTokenizerError(
                f"unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model); "
                "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)"
            )
        _add_gguf_special_tokens(backend, tokens, token_types)

        def token_at(key: str) -> str | None:
            index = meta.get(key)
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
        _set_template_post_processor(
            backend,
            bos if bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)) else None,
            eos if bool(meta.get("tokenizer.ggml.add_eos_token", False)) else None,
        )
        # llama.cpp's own end-of-turn / end-of-message ids, when the converter recorded them.
        extra_eos = [
            meta.get(key)
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if meta.get(key) is not None
        ]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            chat_templates=_gguf_chat_templates(meta),
            extra_eos_token_ids=extra_eos,
        )

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`,
        `chat_template.json`, `generation_config.json`) from a HF model folder.

        As in transformers: an explicit `add_bos_token`/`add_eos_token` in tokenizer_config
        replaces tokenizer.json's post-processor; `chat_template.jinja` wins over the config's
        `chat_template`, which may be a string or a list of {"name", "template"}.
        Raises FileNotFoundError without tokenizer.json (slow tokenizers are not converted).
        """
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found (only fast tokenizers are supported)"
            )
        backend = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")
        bos = _token_content(config.get("bos_token"))
        eos = _token_content(config.get("eos_token"))
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_template_post_processor(
                backend,
                bos if config.get("add_bos_token") else None,
                eos if config.get("add_eos_token") else None,
            )
        generation = _read_json(folder / "generation_config.json")
        gen_eos = generation.get("eos_token_id")
        extra_eos = (
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        )
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            chat_templates=_hf_chat_templates(folder, config),
            extra_eos_token_ids=[int(i) for i in extra_eos],
        )

    # ------------------------------------------------------------------------------ API

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the model has none."""
        return select_chat_template(self.chat_templates) if self.chat_templates else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS only if the model adds them and `add_special_tokens`.
        ValueError for text that is not valid Unicode (a lone surrogate, which JSON's \\ud800
        escapes can carry): it has no UTF-8 bytes to tokenize."""
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"the text is not valid Unicode: {e.reason} at character "
                                     f"{e.start} ({text[e.start]!r})") from None
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 at either end becomes U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (as stored, e.g. byte-level 'Ġhello') for `token_id`."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (see `chat_template.render_chat_template`).

        `chat_template=<name>` picks a named template; other kwargs reach the template.
        Raises `ChatTemplateError` (a ValueError) if the model has no chat template.
        """
        template = select_chat_template(
            self.chat_templates, name=kwargs.pop("chat_template", None), tools=tools
        )
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, eos_ids={sorted(self.eos_token_ids)})"
        )

    def _compute_eos_ids(self, extra: Iterable[int]) -> set[int]:
        ids = {int(i) for i in extra}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        templates = "".join(self.chat_templates.values())
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        for marker, family in _END_OF_TURN_FAMILIES.items():
            if marker not in templates:
                continue
            for token in family:
                token_id = self.backend.token_to_id(token)
                # Only real special tokens: a normal vocab entry spelled like a marker is text.
                if token_id is not None and token in special:
                    ids.add(token_id)
        return ids


# --------------------------------------------------------------------------- GGUF metadata


def _gguf_chat_templates(meta: Mapping[str, Any]) -> dict[str, str]:
    templates = {}
    default = meta.get("tokenizer.chat_template")
    if default:
        templates["default"] = default
    # llama.cpp stores extra named templates (e.g. "tool_use") as tokenizer.chat_template.<name>.
    for name in meta.get("tokenizer.chat_templates") or []:
        template = meta.get(f"tokenizer.chat_template.{name}")
        if template:
            templates[name] = template
    return templates


# ------------------------------------------------------------------------- GGUF -> backend


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> HFTokenizer:
    family = _BYTE_LEVEL_FAMILIES.get(pre or "default")
    if family is None:
        raise UnsupportedTokenizerError(
            f"unsupported GGUF pre-tokenizer type {pre!r} (tokenizer.ggml.pre) for a 'gpt2' "
            f"tokenizer; supported: {sorted(_BYTE_LEVEL_FAMILIES)}"
        )
    # GGUF stores byte-level tokens in GPT-2's printable-byte spelling ("Ġhello"), and
    # special/added tokens literally; both go into the BPE vocabulary as stored.
    vocab = _vocab_map(tokens)
    backend = HFTokenizer(
        BPE(
            vocab=vocab,
            merges=[_split_merge(m) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
            # Llama 3 was trained with tiktoken, which looks whole pieces up before merging.
            ignore_merges=family == "llama3",
        )
    )
    if family == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif family == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        split = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if family == "qwen2":
            backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str],
    token_types: list[int],
    scores: list[float] | None,
    merges: list[str] | None,
    *,
    add_prefix_space: bool,
) -> HFTokenizer:
    """SentencePiece BPE as transformers' LlamaTokenizer builds it (legacy=False)."""
    vocab = _vocab_map(tokens)
    if merges:
        merge_pairs = [_split_merge(m) for m in merges]
    else:
        assert scores is not None
        merge_pairs = _merges_from_scores(vocab, tokens, scores)
    unk = next((t for t, kind in zip(tokens, token_types, strict=True) if kind == _UNKNOWN), None)
    backend = HFTokenizer(
        BPE(
            vocab=vocab,
            merges=merge_pairs,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    vocab: Mapping[str, int], tokens: list[str], scores: list[float]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first.

    SentencePiece merges the adjacent pair whose union has the highest score; a BPE merge list
    ordered by that score reproduces it. Ties break as in transformers' `generate_merges`
    (longer left piece, then longer right piece, then vocabulary order), so ids match HF.
    """
    candidates: list[tuple[float, int, int, int, int, str, str]] = []
    for token, score in zip(tokens, scores, strict=True):
        local = []
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        for left_id, right_id, left, right in local:
            candidates.append((score, len(left), len(right), left_id, right_id, left, right))
    # Stable sort on the score keys, descending, keeps the per-token (id) order inside ties.
    candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    return [(c[5], c[6]) for c in candidates]


def _vocab_map(tokens: list[str]) -> dict[str, int]:
    """token -> id; a string stored twice maps to its last id, as in llama.cpp and transformers."""
    return {token: index for index, token in enumerate(tokens)}


def _split_merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise ValueError(f"malformed GGUF merge {merge!r}")
    return left, right


def _add_gguf_special_tokens(
    backend: HFTokenizer, tokens: list[str], token_types: list[int]
) -> None:
    """Register CONTROL/UNKNOWN tokens as special and USER_DEFINED ones as plain added tokens.

    Both kinds are matched whole in input text (llama.cpp does the same), so "<|im_start|>"
    typed in a prompt is one id rather than six pieces. USER_DEFINED tokens (e.g. "<think>")
    are not special: like transformers and llama.cpp, decode keeps them even with
    skip_special_tokens. The strings are already in the vocabulary, so no new ids appear.
    """
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types, strict=True)
        if kind in (_CONTROL, _UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types, strict=True)
        if kind == _USER_DEFINED
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _set_template_post_processor(backend: HFTokenizer, bos: str | None, eos: str | None) -> None:
    """Make `backend.encode(..., add_special_tokens=True)` add `bos`/`eos` (None: don't)."""
    bos_id = backend.token_to_id(bos) if bos is not None else None
    eos_id = backend.token_to_id(eos) if eos is not None else None
    single = " ".join(
        [f"{bos}:0"] * (bos_id is not None) + ["$A:0"] + [f"{eos}:0"] * (eos_id is not None)
    )
    pair = (
        single
        + " "
        + " ".join(
            [f"{bos}:1"] * (bos_id is not None) + ["$B:1"] + [f"{eos}:1"] * (eos_id is not None)
        )
    )
    special = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None and i is not None]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )


# -------------------------------------------------------------------------- HF folder


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config writes special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        templates.update(
            {t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t}
        )
    if not templates:
        # Processor-style checkpoints keep it in chat_template.json.
        legacy = _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(legacy, str):
            templates["default"] = legacy
    # transformers >= 4.50 saves templates as files, which take precedence over the config.
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates
