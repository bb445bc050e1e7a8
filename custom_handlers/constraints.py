"""JSON-constrained decoding with llguidance, driven per row by the engine.

Why llguidance: outlines' default (``outlines_core``) precompiles an index per schema over the
whole vocabulary; measured here, ``{"type": "object"}`` (what ``json_object`` needs) took 5.3 s with
the tiny test model's 641-token vocabulary, and the cost grows with the vocabulary (Qwen3 has
151,669 tokens). llguidance computes each token mask on the fly from the grammar: compiling any
schema took about 1 ms. Its own masking kernel is ``torch.compile``d (18.6 s cold on CPU for the
first constrained request, through outlines); ``_apply_bitmask`` below is the same arithmetic in
eager mode, so no request ever pays a compile stall, and torch's compiler is never imported.
llguidance reads the Hugging Face tokenizer itself (``llguidance.hf``): nothing else is needed.

Each constrained row (one choice of one request) has its own ``JsonMatcher``; rows of a batch are
constrained independently, next to unconstrained rows.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

from custom_handlers.errors import InvalidRequestError

# Compact JSON: no free whitespace between tokens, so a schema's size bounds the answer's size.
_JSON_DEFAULTS = {"whitespace_flexible": False}


class JsonConstraints:
    """Grammar compilation (cached) and per-request processors for one loaded model."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._llg_tokenizer = None
        self._lock = threading.Lock()
        self.grammar = lru_cache(maxsize=256)(self._compile)

    def warm_up(self) -> None:
        """Build the llguidance tokenizer in the background, before any constrained request."""
        threading.Thread(
            target=self.llg_tokenizer, name="json-constraints-warm-up", daemon=True
        ).start()

    def llg_tokenizer(self):
        with self._lock:
            if self._llg_tokenizer is None:
                import llguidance.hf

                self._llg_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer)
            return self._llg_tokenizer

    def _compile(self, schema_json: str) -> str:
        """The llguidance grammar for a JSON schema; 400 when it cannot be enforced."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(schema_json, defaults=_JSON_DEFAULTS)
        except (ValueError, TypeError) as exc:
            raise _unenforceable(str(exc)) from exc
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.llg_tokenizer())
        if is_error:
            raise _unenforceable("; ".join(messages))
        return grammar

    def matcher(self, grammar: str) -> JsonMatcher:
        return JsonMatcher(self.llg_tokenizer(), grammar)


def _unenforceable(reason: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"response_format: the local model cannot enforce this JSON schema: {reason.strip()[:500]}",
        param="response_format",
    )


class JsonMatcher:
    """Where one row's answer stands in its grammar: what may come next, given what came."""

    def __init__(self, llg_tokenizer: Any, grammar: str):
        from llguidance import LLMatcher

        self._matcher = LLMatcher(llg_tokenizer, grammar)
        self.vocab_size = llg_tokenizer.vocab_size

    def consume(self, token: int) -> None:
        if not self._matcher.is_stopped() and not self._matcher.is_error():
            self._matcher.consume_token(token)

    def fill(self, bitmask, row: int) -> None:
        """Write the allowed-token bits for the next token into ``bitmask[row]`` (numpy, int32)."""
        import llguidance.numpy

        if self._matcher.is_error():  # cannot happen for tokens we allowed; never mask everything
            bitmask[row].fill(-1)
        else:
            llguidance.numpy.fill_next_token_bitmask(self._matcher, bitmask, row)


def mask_logits(logits, rows: list[int], matchers: list[JsonMatcher]) -> None:
    """Set to -inf, in ``logits[rows]``, every token that would break that row's JSON.

    Once a row's JSON is complete only end-of-turn is allowed, so the answer ends there with
    ``finish_reason: stop``; if ``max_tokens`` comes first the engine reports ``length``.
    """
    # llguidance.numpy, not llguidance.torch: importing the latter imports torch's compiler
    # (2.7 s measured here) for a kernel we replace anyway.
    import llguidance.numpy
    import torch

    bitmask = llguidance.numpy.allocate_token_bitmask(len(rows), matchers[0].vocab_size)
    for i, matcher in enumerate(matchers):
        matcher.fill(bitmask, i)
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index]
    _apply_bitmask(masked, torch.from_numpy(bitmask).to(logits.device, non_blocking=True))
    logits[index] = masked


def _apply_bitmask(scores, bitmask) -> None:
    """Set the logits of disallowed tokens to -inf (bit i of word j allows token 32*j+i)."""
    import torch

    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(bitmask.shape[0], -1)
    vocab = scores.shape[1]
    if allowed.shape[1] < vocab:  # rows of the output layer beyond the tokenizer's vocabulary
        scores[:, allowed.shape[1] :] = float("-inf")
    width = min(vocab, allowed.shape[1])
    scores[:, :width].masked_fill_(~allowed[:, :width], float("-inf"))
