"""Incremental detokenization with stop strings: generated token ids in, safe text deltas out.

Text for a token depends on its neighbours (a UTF-8 character split over byte-level tokens, a
SentencePiece "▁" that is a space only after other text), so each step decodes a short window
of ids and emits what grew past the window's already-emitted prefix: the prefix_offset /
read_offset algorithm of TGI and vLLM. The window starts in the prompt, so the first generated
token is decoded in context (no spurious space stripping).

`tokenizers.decoders.DecodeStream` does the same windowing, but it offers no way to read the
incomplete tail it holds back, which `flush()` must return when a request ends mid-character;
hence the explicit offsets here.

Stop strings are searched in the decoded text, so a stop spanning several tokens, or ending in
the middle of one token's text, truncates exactly at the stop. Until a stop string can be ruled
out, the longest suffix of the text that could begin one is held back: emitted text never
contains part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from server.models.tokenizer import Tokenizer

__all__ = ["DetokenizerDelta", "IncrementalDetokenizer"]

# Prompt tokens decoded with the first output tokens: enough context for a leading space or a
# character continued from the prompt, cheap enough to redo every step (vLLM uses 5 too).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class DetokenizerDelta(NamedTuple):
    text: str  # new text that is safe to show now (may be "")
    stop_str: str | None  # the stop string that ended the output in this step, if any


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas.

    Contract: the concatenation of every `step(...).text` and the final `flush()` equals
    `output_text`, which is `tokenizer.decode(output ids)` (decoded in the prompt's context), cut
    before the first stop string found (or after it with `include_stop_str_in_output`). After a
    stop string is hit, `finished` is true and further `step` calls raise RuntimeError.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]  # an empty stop string would match everywhere
        self._include_stop = include_stop_str_in_output
        # With the stop included in the output, emitting its first characters early changes
        # nothing about the final text, so only the excluding mode needs to hold text back.
        self._max_holdback = (
            0 if include_stop_str_in_output or not self._stop else max(map(len, self._stop)) - 1
        )
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # ids[prefix_offset:read_offset] decode to text already counted in self._text;
        # ids[read_offset:] are pending (their text may still be an incomplete character).
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # Chars of the pending ids' text already released (the complete characters before an
        # unfinished one at the end).
        self._pending_emitted = 0
        self._text = ""  # all decoded output text (may run past a stop until truncated)
        self._emitted = 0  # len of self._text handed out so far
        self.stop_str: str | None = None
        self._flushed = False

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        return self._text[: self._emitted]

    @property
    def finished(self) -> bool:
        """True once a stop string was hit or `flush()` was called."""
        return self.stop_str is not None or self._flushed

    def step(self, new_token_ids: Sequence[int], check_stop: bool = True) -> DetokenizerDelta:
        """Add generated ids; return the text now safe to emit and the stop string, if hit.

        `check_stop=False` (e.g. before min_tokens) means a stop string completed by these
        tokens does not end the output; text that could start a stop is still held back.
        Raises RuntimeError if the output already finished.
        """
        if self.finished:
            raise RuntimeError("detokenizer already finished (stop string hit or flushed)")
        old_len = len(self._text)
        self._ids.extend(new_token_ids)
        self._text += self._decode_ready()

        if check_stop and self._stop:
            hit = self._find_stop(old_len)
            if hit is not None:
                start, stop_str = hit
                end = start + len(stop_str) if self._include_stop else start
                # The holdback guarantees start >= emitted; max() keeps output_text monotonic
                # even if that invariant were ever broken.
                end = max(end, self._emitted)
                self._text = self._text[:end]
                self.stop_str = stop_str
                return DetokenizerDelta(self._release(end), stop_str)
        return DetokenizerDelta(self._release(len(self._text) - self._holdback()), None)

    def flush(self) -> str:
        """Return all text still held back (the request ended by length, EOS or abort).

        Includes the text of trailing tokens that never formed a complete character (as U+FFFD,
        exactly as `tokenizer.decode` renders them). Returns "" after a stop string. Later
        `step` calls raise RuntimeError.
        """
        if self.finished:
            return ""
        self._flushed = True
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        self._text += full[len(prefix) + self._pending_emitted :]
        return self._release(len(self._text))

    # ------------------------------------------------------------------------- internals

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(
            self._ids[start:end], skip_special_tokens=self._skip_special_tokens
        )

    def _decode_ready(self) -> str:
        """New text of the pending ids, up to the last complete character."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        done = len(prefix) + self._pending_emitted  # chars of `full` already in self._text
        if full.endswith(_REPLACEMENT_CHAR):
            # The pending ids end inside a character whose other bytes are not generated yet.
            # Characters before it cannot change any more (UTF-8 is self-synchronizing), so
            # they are released now; the offsets stay until the character completes.
            stable = len(full.rstrip(_REPLACEMENT_CHAR))
            if stable <= done:
                return ""
            self._pending_emitted += stable - done
            return full[done:stable]
        if len(full) <= done:  # e.g. only special tokens, skipped in decode
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pending_emitted = 0
        return full[done:]

    def _find_stop(self, old_len: int) -> tuple[int, str] | None:
        """The stop occurrence completed first by text appended after `old_len`.

        Only occurrences ending past `old_len` count: earlier ones were already checked (or
        were produced under check_stop=False). Among several, the one whose end comes first is
        the one generation reached first; on equal ends the longer (earlier-starting) wins.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop_str in self._stop:
            start = self._text.find(stop_str, max(0, old_len - len(stop_str) + 1))
            if start == -1:
                continue
            candidate = (start + len(stop_str), start, stop_str)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _holdback(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of a stop string."""
        limit = min(self._max_holdback, len(self._text) - self._emitted)
        for length in range(limit, 0, -1):
            tail = self._text[-length:]
            if any(s.startswith(tail) and len(s) > length for s in self._stop):
                return length
        return 0

    def _release(self, upto: int) -> str:
        """Emit text up to index `upto` (never moving backwards)."""
        if upto <= self._emitted:
            return ""
        delta = self._text[self._emitted : upto]
        self._emitted = upto
        return delta
