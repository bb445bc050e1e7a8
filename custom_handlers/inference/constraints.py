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

Tool calls use the same machinery: ``tool_grammar`` writes a Lark grammar (llguidance's dialect)
whose ``%json`` parts are the functions' ``parameters``, around Qwen3's call layout (see
``tools.py``), so every call names an offered function and its arguments follow its schema.
"""

from __future__ import annotations

import atexit
import json
import threading
from functools import cached_property, lru_cache
from typing import Any

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.schema_keep import Unkeepable, kept_schema
from custom_handlers.inference.tools import (
    CALL_ARGUMENTS,
    CALL_CLOSE,
    CALL_HEAD,
    CALL_OPEN,
    CALL_TAIL,
    ToolSet,
)

_WARM_UP_EXIT_WAIT_S = 30.0

# Compact JSON: no free whitespace between tokens, so a schema's size bounds the answer's size.
_JSON_DEFAULTS = {"whitespace_flexible": False}


class JsonConstraints:
    """Grammar compilation (cached) and per-request processors for one loaded model."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._llg_tokenizer = None
        self._lock = threading.Lock()
        self.grammar = lru_cache(maxsize=256)(self._compile)
        self._tool_grammar = lru_cache(maxsize=64)(self._compile_tools)
        self._prototype = lru_cache(maxsize=256)(self._new_matcher)

    def warm_up(self) -> None:
        """Build the llguidance tokenizer in the background, before any constrained request.

        A process that exits meanwhile waits for it (``atexit``): a daemon thread still inside
        the tokenizer's native code when the interpreter finalizes aborts the process ("terminate
        called without an active exception", seen once in CI with a 5-token run)."""

        def build() -> None:
            try:
                self.llg_tokenizer()
            finally:
                atexit.unregister(thread.join)  # done: nothing to wait for at exit

        thread = threading.Thread(target=build, name="json-constraints-warm-up", daemon=True)
        atexit.register(thread.join, _WARM_UP_EXIT_WAIT_S)
        thread.start()

    def llg_tokenizer(self):
        with self._lock:
            if self._llg_tokenizer is None:
                import llguidance.hf

                self._llg_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer)
            return self._llg_tokenizer

    def _compile(self, schema_json: str, where: str = "response_format") -> str:
        """The llguidance grammar for a JSON schema; 400 when it cannot be enforced.

        The schema llguidance compiles is ``kept_schema``'s: bounds it would misread narrowed, what
        it cannot keep refused first (``schema_keep``). The compiled grammar
        must then let an answer start: one that allows only end-of-turn at its first token (a
        ``$ref`` loop, say) would answer 200 with no JSON at all."""
        from llguidance import LLMatcher

        try:
            schema = kept_schema(json.loads(schema_json))
        except Unkeepable as exc:
            raise _unenforceable(str(exc), where) from None
        try:
            grammar = LLMatcher.grammar_from_json_schema(
                json.dumps(schema, separators=(",", ":")), defaults=_JSON_DEFAULTS
            )
        except (ValueError, TypeError) as exc:
            raise _unenforceable(str(exc), where) from exc
        self._validate(grammar, where)
        self._check_start(grammar, where)
        return grammar

    def _check_start(self, grammar: str, where: str) -> None:
        """400 unless the grammar's first token may be something other than end-of-turn.

        Builds the grammar's matcher (kept for ``matcher``: this moves its cost from the engine's
        thread to the request's) and computes its first mask, as the engine will."""
        import llguidance.numpy
        import numpy

        tokenizer = self.llg_tokenizer()
        probe = self._prototype(grammar).deep_copy()
        bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        llguidance.numpy.fill_next_token_bitmask(probe, bitmask, 0)
        if probe.is_error():
            raise _unenforceable(probe.get_error().split("\n")[0], where)
        allowed = numpy.unpackbits(bitmask.view(numpy.uint8), bitorder="little")
        allowed[list(tokenizer.eos_tokens)] = 0
        if not allowed.any():
            raise _unenforceable(
                "no JSON value satisfies it (the answer would end before it starts)", where
            )

    def _validate(self, grammar: str, where: str) -> None:
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.llg_tokenizer())
        if is_error:
            raise _unenforceable("; ".join(messages), where)

    def tool_grammar(self, tools: ToolSet, json_schema: str | None) -> str:
        """The grammar of the calls ``tools`` allows (or, with ``json_schema`` and "auto", of an
        answer following it or calls); 400 naming the tool whose schema cannot be enforced."""
        for i, function in enumerate(tools.functions):  # cached: each schema is checked once
            self.grammar(function.parameters, f"tools[{i}].function.parameters")
        callable_ = tuple((f.name, f.parameters) for f in tools.callable)
        answer = None if tools.must_call else json_schema
        return self._tool_grammar(callable_, tools.parallel and not tools.forced, answer)

    def _compile_tools(
        self, functions: tuple[tuple[str, str], ...], parallel: bool, answer: str | None
    ) -> str:
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_lark(_tool_lark(functions, parallel, answer, self._marker))
        self._validate(grammar, "tools")
        return grammar

    @cached_property
    def marker_ids(self) -> tuple[int, int] | None:
        """The token ids of ``<tool_call>`` and ``</tool_call>``, if each is one token here
        (looked up once per loaded model, not per request)."""
        ids = []
        for marker in (CALL_OPEN, CALL_CLOSE):
            found = self._tokenizer(marker, add_special_tokens=False)["input_ids"]
            if len(found) != 1:
                return None
            ids.append(found[0])
        return ids[0], ids[1]

    def _marker(self, marker: str) -> str:
        """A call marker in Lark: by token id when llguidance holds it as a special token."""
        token = self._tokenizer.convert_tokens_to_ids(marker)
        if self.llg_tokenizer().is_special_token(token):
            return f"<[{token}]>"
        return json.dumps(marker)

    def token_text(self, token: int) -> tuple[str, list[int]]:
        """What one token writes: its text (U+FFFD for part of a character) and its bytes."""
        raw = self.llg_tokenizer().decode_bytes([token])
        return raw.decode("utf-8", errors="replace"), list(raw)

    def matcher(self, grammar: str) -> JsonMatcher:
        """A fresh matcher at the grammar's start: a copy of one kept per grammar (10 µs, where
        building one takes 0.4 ms for a small schema and 80 ms for 128 tools)."""
        prototype = self._prototype(grammar)
        return JsonMatcher(prototype.deep_copy(), self.llg_tokenizer().vocab_size)

    def _new_matcher(self, grammar: str):
        from llguidance import LLMatcher

        return LLMatcher(self.llg_tokenizer(), grammar)


def _unenforceable(reason: str, where: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{where}: the local model cannot enforce this JSON schema: {reason.strip()[:500]}",
        param=where,
    )


def _tool_lark(functions, parallel: bool, answer: str | None, marker) -> str:
    """Qwen3's call layout around each function's arguments (compact JSON, as answers are)."""
    lines = ["%llguidance {}", "start: calls | answer" if answer else "start: calls"]
    lines.append('calls: call ("\\n" call)*' if parallel else "calls: call")
    alternatives = " | ".join(f"f{i}" for i in range(len(functions)))
    head, tail = json.dumps(CALL_HEAD), json.dumps(CALL_TAIL)
    lines.append(f"call: {marker(CALL_OPEN)} {head} ({alternatives}) {tail} {marker(CALL_CLOSE)}")
    for i, (name, schema) in enumerate(functions):
        lines.append(f"f{i}: {json.dumps(name + CALL_ARGUMENTS)} %json {_compact(schema)}")
    if answer:
        lines.append(f"answer: %json {_compact(answer)}")
    return "\n".join(lines) + "\n"


def _compact(schema_json: str) -> str:
    """The schema as ``_compile`` gives it to llguidance (``kept_schema``), with llguidance's option
    for compact JSON (as ``_JSON_DEFAULTS`` for answers). ``tool_grammar`` has compiled each schema
    alone first, so what cannot be kept was refused there."""
    schema = kept_schema(json.loads(schema_json))
    schema["x-guidance"] = {**schema.get("x-guidance", {}), **_JSON_DEFAULTS}
    return json.dumps(schema, separators=(",", ":"))


class JsonMatcher:
    """Where one row's answer stands in its grammar: what may come next, given what came."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher = matcher  # an llguidance LLMatcher of its own
        self.vocab_size = vocab_size

    def consume(self, token: int) -> None:
        if not self._matcher.is_stopped() and not self._matcher.is_error():
            self._matcher.consume_token(token)

    @property
    def error(self) -> str | None:
        """Why the grammar cannot go on (then only end-of-turn is allowed), or None."""
        return self._matcher.get_error() if self._matcher.is_error() else None

    def draft(self, limit: int) -> list[int]:
        """The tokens the grammar forces from here, at most ``limit``, nothing consumed:
        llguidance's fast-forward tokens (the usual tokens of the bytes it forces, e.g.
        ``{"name": "make_image", "arguments": {"prompt": "``). A draft, not a decision: a model
        may split the same bytes into other tokens, so the engine checks it as any draft
        (``speculation.accept``)."""
        if limit <= 0 or self._matcher.is_stopped() or self._matcher.is_error():
            return []
        return self._matcher.compute_ff_tokens()[:limit]

    def allowed(self, tokens: list[int]) -> int:
        """How many of ``tokens``, in order, the grammar allows from here (nothing consumed)."""
        if self._matcher.is_stopped() or self._matcher.is_error():
            return 0
        return self._matcher.validate_tokens(tokens)

    def fill_along(self, bitmask, draft: list[int]) -> None:
        """Rows ``0 .. len(draft)`` of ``bitmask``: what the grammar allows at each position of a
        pass over the row's last token and ``draft`` (which it must allow: ``allowed``), the
        matcher left where it was."""
        for i, token in enumerate(draft):
            self.fill(bitmask, i)
            self._matcher.consume_token(token)
        self.fill(bitmask, len(draft))
        if draft:
            self._matcher.rollback(len(draft))

    def fill(self, bitmask, row: int) -> None:
        """Write the allowed-token bits for the next token into ``bitmask[row]`` (numpy, int32).

        A matcher in error allows only end-of-turn (llguidance's own mask then): an answer the
        grammar can no longer follow ends there rather than going on unconstrained."""
        import llguidance.numpy

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


def mask_along(logits, matcher: JsonMatcher, draft: list[int]) -> None:
    """Set to -inf, in ``logits`` ``[len(draft) + 1, vocab]`` (one row's pass over its last token
    and ``draft``), what its grammar forbids at each position: at position ``j``, the mask after
    the draft's first ``j`` tokens (``JsonMatcher.fill_along``; the matcher is left where it was).
    """
    import llguidance.numpy
    import torch

    bitmask = llguidance.numpy.allocate_token_bitmask(len(draft) + 1, matcher.vocab_size)
    matcher.fill_along(bitmask, draft)
    _apply_bitmask(logits, torch.from_numpy(bitmask).to(logits.device, non_blocking=True))


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
