"""Turn a stream of token ids into the text the caller sees, one token at a time.

Three small stages, each O(1) amortised per token (no re-decoding of the whole output):

    IncrementalDecoder -> ThinkFilter -> StopMatcher

``TextPipeline`` chains them for one choice. Pure Python; the decoder needs only a tokenizer with
``decode``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Protocol

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class _Decodes(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDecoder:
    """Detokenize one token at a time, decoding only a short window around the new token.

    Byte-level BPE splits multi-byte characters across tokens, so a window that ends inside a
    character decodes to U+FFFD; that text is held back until the next token completes it.

    Where the tokenizer is a fast one whose decode transformers adds nothing to and whose decoder
    is byte-level (Qwen3's, SmolLM2's), ``tokenizers``' own ``DecodeStream`` does the same in
    Rust, one call a token (``_stream``): the same windows, the same text. Should it ever refuse
    a window (its check that the new window's text starts with the old one's), the row goes on
    with the two decodes a token from there: its windows are kept here as well.
    """

    def __init__(self, tokenizer: _Decodes):
        self._tokenizer = tokenizer
        self._decode_ids = _decoding(tokenizer)
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoded for context only
        self._read = 0  # everything before this has been emitted
        self._stream, self._backend = _stream_of(tokenizer)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                text = self._stream.step(self._backend, token_id)
            except Exception:  # a window it refuses: the two decodes from here on
                self._stream = None
            else:
                if text is None:
                    return ""
                self._prefix, self._read = self._read, len(self._ids)
                return text
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        if self._stream is not None:  # the windows start afresh, as a new stream's do
            self._stream, self._backend = _stream_of(self._tokenizer)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids) if ids else ""


def _decoding(tokenizer: _Decodes):
    """``tokenizer.decode(ids, skip_special_tokens=True)``, straight from its Rust backend where
    that is all transformers does (``_backend_of``): 0.7 instead of 2.4 us a call here, two calls
    a token a row, the largest part of a decoding step's host time after sampling (issue 23,
    item 4)."""
    backend = _backend_of(tokenizer)
    if backend is not None:
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


def _backend_of(tokenizer: _Decodes):
    """The fast tokenizer's Rust backend when transformers' ``decode`` is just its ``decode`` (a
    fast tokenizer whose decode nobody overrides, without ``clean_up_tokenization_spaces``);
    else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        kind = type(tokenizer)
        if kind.decode is TokenizersBackend.decode and kind._decode is TokenizersBackend._decode:
            return backend
    return None


def _stream_of(tokenizer: _Decodes) -> tuple:
    """``(DecodeStream, its backend)`` for a tokenizer whose backend decodes byte-level BPE
    (``decoders.ByteLevel``: the text of a window is its tokens' bytes, read as UTF-8), else
    ``(None, None)``. Only those: a decoder that rewrites its text across tokens (WordPiece's
    clean-up, say) could make the stream's windows hold back or release text where the two
    decodes would not, and none of them was tested against them (tests/test_text.py)."""
    backend = _backend_of(tokenizer)
    if backend is None:
        return None, None
    from tokenizers import decoders

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None, None
    return decoders.DecodeStream(skip_special_tokens=True), backend


class ThinkFilter:
    """Drop a leading ``<think>...</think>`` block, so reasoning never reaches the caller.

    Qwen3 in non-thinking mode should not write one, but a model that does anyway (or a hybrid
    checkpoint whose template ignores ``enable_thinking``) must not leak it.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._state = "start"  # start -> (thinking ->) after_think -> text

    @property
    def thinking(self) -> bool:
        """Inside a think block: the text just pushed is reasoning, not answer."""
        return self._state == "thinking"

    @property
    def passing(self) -> bool:
        """Past the start (and any think block): from here on every text passes as it is."""
        return self._state == "text"

    def push(self, text: str) -> str:
        if self._state == "text":
            return text
        self._pending += text
        if self._state == "start":
            head = self._pending.lstrip()
            if not head:  # only whitespace so far: pass it on, a think block may still follow
                out, self._pending = self._pending, ""
                return out
            if head.startswith(THINK_OPEN):
                self._state = "thinking"
            elif THINK_OPEN.startswith(head):
                return ""  # could still become "<think>": wait
            else:
                return self._release()
        if self._state == "thinking":
            end = self._pending.find(THINK_CLOSE)
            if end < 0:
                return ""
            self._pending = self._pending[end + len(THINK_CLOSE) :]
            self._state = "after_think"
        self._pending = self._pending.lstrip()
        return self._release() if self._pending else ""

    def flush(self) -> str:
        """At the end: an unfinished think block is dropped; held-back plain text is returned."""
        if self._state == "thinking":
            self._pending = ""
        return self._release()

    def _release(self) -> str:
        out, self._pending, self._state = self._pending, "", "text"
        return out


class StopMatcher:
    """Find the caller's stop strings in streamed text; never emit text that might start one."""

    def __init__(self, stops: Iterable[str]):
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False
        self.watching = bool(self._stops)  # some stop string to look for

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        window = self._held + text
        hits = [i for i in (window.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return window[: min(hits)]
        keep = self._partial_suffix(window)
        self._held = window[len(window) - keep :] if keep else ""
        return window[: len(window) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _partial_suffix(self, window: str) -> int:
        """Length of the longest tail of ``window`` that is a proper prefix of a stop string."""
        for size in range(min(self._longest - 1, len(window)), 0, -1):
            tail = window[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0


class _Unfiltered:
    """No think filter: a text completion is the text the model writes, think tags included."""

    thinking = False  # nothing is taken for reasoning: every token is the completion's
    passing = True

    def push(self, text: str) -> str:
        return text

    def flush(self) -> str:
        return ""


class TextPipeline:
    """Token ids in, caller-visible text out, for one choice."""

    def __init__(self, tokenizer: _Decodes, stops: Iterable[str] = (), drop_think: bool = True):
        self._decoder = IncrementalDecoder(tokenizer)
        self._think = ThinkFilter() if drop_think else _Unfiltered()
        self._stop = StopMatcher(stops)
        self.reasoning_tokens = 0  # tokens of a think block (dropped from the text)
        # No stop strings, and the think filter past the start: the decoder's text is the text,
        # as the two stages would pass it (most rows, after their first tokens).
        self._plain = False

    @property
    def stopped(self) -> bool:
        """True once a stop string was seen: generation for this choice should end."""
        return self._stop.stopped

    def push(self, token_id: int) -> str:
        if self._plain:
            return self._decoder.push(token_id)
        thinking = self._think.thinking
        text = self._stop.push(self._think.push(self._decoder.push(token_id)))
        if thinking or self._think.thinking:  # the block's tokens, its open and close included
            self.reasoning_tokens += 1
        self._plain = self._think.passing and not self._stop.watching
        return text

    def flush(self) -> str:
        tail = self._stop.push(self._think.push(self._decoder.flush()))
        tail += self._stop.push(self._think.flush())
        return tail + self._stop.flush()
