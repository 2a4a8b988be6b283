"""Prompts in: text or token ids or chat messages -> token ids, checked against the context.

Tokenization happens once, here, in the router process; workers only ever see token ids.
Every failure is a `ValueError` whose message is meant for the client (HTTP 400).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from server.engine.sampling_params import check_token_ids
from server.models.tokenizer import Tokenizer

# Template variables the server passes itself: a chat_template_kwargs key naming one would
# collide with it (a TypeError, once a 500).
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "bos_token", "eos_token"})


class Prompt(NamedTuple):
    token_ids: list[int]
    text: str | None  # the client's text, when it sent text (for echo)


def completion_prompts(
    tokenizer: Tokenizer, prompt: str | list[str] | list[int] | list[list[int]], vocab_size: int | None = None
) -> list[Prompt]:
    """The completions API's `prompt`: a string, strings, token ids, or lists of token ids.
    Token ids must lie in [0, vocab_size) (the served model's; unknown before a worker has
    joined: then any id a vocabulary could hold, below 2**31)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise ValueError("prompt must not be empty.")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
            out.append(Prompt(ids, item))
        else:
            ids = list(item)
            check_token_ids("prompt token ids", ids, vocab_size if vocab_size is not None else 2**31)
            out.append(Prompt(ids, None))
        if not out[-1].token_ids:
            raise ValueError("prompt must contain at least one token.")
    return out


def truncate_prompt(prompt: Prompt, keep: int | None) -> Prompt:
    """vLLM's truncate_prompt_tokens: only the last `keep` token ids (None: all). A cut prompt
    no longer has the client's text (echo decodes its ids)."""
    if keep is None or len(prompt.token_ids) <= keep:
        return prompt
    return Prompt(prompt.token_ids[-keep:], None)


def chat_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> Prompt:
    """Render the model's own chat template and tokenize the result (no extra BOS: templates
    that want one write it themselves). `template_kwargs` (the request's chat_template_kwargs)
    reach the template; as in vLLM they may set `add_generation_prompt`, but not what the
    server itself passes (messages, bos / eos token); continuing the final message excludes a
    generation prompt, however it was asked for. Raises ChatTemplateError (a ValueError)."""
    kwargs = dict(template_kwargs or {})
    add_generation_prompt = bool(kwargs.pop("add_generation_prompt", add_generation_prompt))
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true.")
    reserved = sorted(k for k in kwargs if k in _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {reserved}: the server sets them.")
    if not isinstance(kwargs.get("chat_template", ""), str):
        raise ValueError("chat_template_kwargs.chat_template must be a template name (a string).")
    tools = kwargs.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("chat_template_kwargs.tools must be a list of objects.")
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, **kwargs
    )
    if continue_final_message:
        # Cut whatever the template appended after the last message (end-of-turn markers), so
        # the model continues that message instead of starting a new one.
        last = messages[-1].get("content")
        if isinstance(last, str) and last:
            cut = text.rfind(last)
            if cut >= 0:
                text = text[: cut + len(last)]
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("the chat template produced an empty prompt.")
    return Prompt(ids, text)


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, field: str = "max_tokens"
) -> int:
    """The number of tokens to generate: `requested`, or all the context left when None.
    `field`: the request field `requested` came from, for the messages.

    Raises ValueError (naming both numbers) when the prompt leaves no room to generate, or
    when prompt + requested tokens exceed the context."""
    if prompt_len >= max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_len} tokens, which leaves no room for a completion. Please "
            "reduce the length of the prompt."
        )
    remaining = max_model_len - prompt_len
    if requested is None:
        return remaining
    if requested < 1:
        raise ValueError(f"{field} must be at least 1, got {requested}.")
    if requested > remaining:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion). Please reduce the length of the prompt or "
            f"{field}."
        )
    return requested
