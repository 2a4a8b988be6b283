"""Render a model's jinja chat template the way HF transformers' `apply_chat_template` does.

Chat templates ship with model files, so they are untrusted code: they run in jinja2's
`ImmutableSandboxedEnvironment`, see only plain JSON-like data, and cannot store
underscore-prefixed names on a `namespace()`. The environment matches transformers
(`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a `{% generation %}` tag, `raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape), so a template renders here byte for byte
as it does there.

Every failure (no template, a bad message, a template syntax error, `raise_exception(...)`) is a
`ChatTemplateError`, a `ValueError`: the API layer turns it into a 400.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "ChatTemplateError",
    "flatten_content",
    "normalize_messages",
    "render_chat_template",
    "select_chat_template",
]


# Names a message's reasoning text arrives under; the first is what most templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat could not be rendered: no template, invalid messages, or the template refused."""


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    bos_token: str = "",
    eos_token: str = "",
    **kwargs: Any,
) -> str:
    """Render `messages` with `template`.

    The template sees `messages` (content flattened to strings, see `flatten_content`),
    `add_generation_prompt`, `tools`, `bos_token`, `eos_token` and every extra keyword argument
    (e.g. `enable_thinking`, `documents`). Raises `ChatTemplateError` if `template` is None/empty,
    a message is invalid, the template does not compile, or it raises while rendering.
    """
    if not template:
        raise ChatTemplateError(
            "this model has no chat template, so chat messages cannot be rendered into a prompt; "
            "send a plain prompt (completions API) or use a model that ships a chat template"
        )
    context = {
        "messages": normalize_messages(messages),
        "add_generation_prompt": add_generation_prompt,
        "tools": _plain(list(tools)) if tools is not None else None,
        "documents": None,  # transformers always defines it; templates test `documents is none`
        "bos_token": bos_token,
        "eos_token": eos_token,
        **{key: _plain(value) for key, value in kwargs.items()},
    }
    compiled = _compile(template)
    try:
        return compiled.render(**context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
        # Templates index messages blindly (`message['content'] + ...`): a message shape the
        # template does not expect surfaces as a Python error, which is the client's fault.
        raise ChatTemplateError(
            f"chat template failed to render: {type(exc).__name__}: {exc}"
        ) from exc


def select_chat_template(
    templates: Mapping[str, str],
    *,
    name: str | None = None,
    tools: Sequence[Any] | None = None,
) -> str | None:
    """Pick one of a model's named templates, as transformers does.

    An explicit `name` must exist; otherwise "tool_use" when `tools` are given and it exists, else
    "default". Returns None when the model has no templates at all (rendering then raises the
    "no chat template" error); raises `ChatTemplateError` for an unknown name.
    """
    if not templates:
        return None
    if name is not None:
        if name not in templates:
            raise ChatTemplateError(
                f"chat template {name!r} not found; this model has {sorted(templates)}"
            )
        return templates[name]
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if len(templates) == 1:
        return next(iter(templates.values()))
    raise ChatTemplateError(
        f"this model has several chat templates {sorted(templates)} and none named 'default'; "
        "pass chat_template=<name>"
    )


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain-dict copies of `messages` with `content` flattened to a string (None stays None)
    and reasoning (`reasoning_content` / `thinking` / `reasoning`) under both names templates use.

    Raises `ChatTemplateError` if a message is not a mapping or its content is invalid.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"messages[{index}] must be an object, got {type(message).__name__}"
            )
        plain = _plain(dict(message))
        if "content" in plain:
            plain["content"] = flatten_content(plain["content"], where=f"messages[{index}]")
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            # Templates read reasoning under different names (gpt-oss: `thinking`); accept any
            # and fill both, as transformers does.
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        normalized.append(plain)
    return normalized


def flatten_content(content: Any, *, where: str = "message") -> str | None:
    """A message's content as one string.

    OpenAI-style content may be a list of parts; the text parts are joined with "\\n" (what vLLM
    does for text-only models, whose templates expect a string). A part of any other type
    (image_url, input_audio, ...) cannot be fed to a text model, so it raises `ChatTemplateError`
    naming the type.
    """
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(
            f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ChatTemplateError(f"{where}: content[{index}] must be an object")
        part_type = part.get("type", "text")
        if part_type != "text":
            raise ChatTemplateError(
                f"{where}: content part type {part_type!r} is not supported by this text-only "
                "model; only 'text' parts are"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatTemplateError(
                f"{where}: content[{index}] of type 'text' needs a string 'text'"
            )
        texts.append(text)
    return "\n".join(texts)


def _plain(value: Any) -> Any:
    """`value` rebuilt from JSON-like builtins; anything else becomes an inert "<TypeName>".

    The sandbox blocks dunder access but not the ordinary methods of arbitrary objects, so a
    template must never be handed a caller's rich objects.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would corrupt tool schemas in prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to mark assistant tokens for training masks; templates that carry
    it must still compile here.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - mirrors jinja2.utils.Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed attribute {name!r} on a namespace"
            )


def _template_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    # A plain function, not the `dict` type: the type would expose classmethods to the template.
    return dict(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # One environment per template keeps compiled templates independent; the cache makes
    # repeated renders (every chat request) skip parsing.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _template_dict
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
