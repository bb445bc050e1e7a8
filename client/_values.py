"""Turning a model's answer into what the caller asked for: one prompt, or a list of values.

Models do not always do as told: some add a preamble, quotes, a ``<think>`` block or a code fence;
some ignore ``response_format`` and write a numbered list; a constrained answer cut by
``max_tokens`` is JSON missing its end. These functions accept all of that.
"""

from __future__ import annotations

import json
import re

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```\s*$", re.DOTALL)
_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:(?:enhanced|improved|final|image|rewritten)\s+)?prompt\s*(?:\*\*)?\s*:"
    r"\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^(?:here\b|sure\b|certainly\b|okay\b|of course\b).*:\s*$", re.IGNORECASE)
_MARKER = re.compile(r"^\s*(?:[-*•]+|\d+\s*[.):]|\(\d+\))\s+")
_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_NON_WORD = re.compile(r"[\W_]+")
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "«": "»"}


def strip_thinking(text: str) -> str:
    """The answer without ``<think>...</think>`` blocks (an unclosed one runs to the end)."""
    return _THINK.sub("", text)


def clean_prompt(text: str, cut: bool = False) -> str:
    """One prompt on one line: no thinking, fence, preamble, label or surrounding quotes, no
    clause said twice; ``cut`` (the answer ran out of tokens): without its unfinished last clause.

    A small model caught in a loop writes "a lighthouse, a lighthouse, a lighthouse, ..." until
    max_tokens cuts it mid-word (SmolLM2-135M did, presence_penalty notwithstanding): a repeated
    clause adds nothing to an image prompt, and a half word spoils it.
    """
    text = strip_thinking(text).strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and _PREAMBLE.match(lines[0]):
        lines = lines[1:]
    text = _LABEL.sub("", " ".join(line.strip() for line in lines))
    text = _strip_quotes(" ".join(text.split()))
    if cut:
        text = _without_cut_clause(text)
    return _without_repeated_clauses(text)


def _without_cut_clause(text: str) -> str:
    """``text`` up to its last clause or sentence boundary (all of it if it has none)."""
    end = max(text.rfind(", "), text.rfind("; "), text.rfind(". ") + 1)
    return text[:end].rstrip(" ,;") if end > 0 else text


def _without_repeated_clauses(text: str) -> str:
    """``text`` without the comma-separated clauses said before in it (compared without case)."""
    seen: set[str] = set()
    kept = []
    for clause in text.split(", "):
        key = clause.strip().rstrip(".").casefold()
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(clause)
    return ", ".join(kept)


def extract_values(text: str) -> list[str]:
    """The values in an answer: the JSON array if there is one, else one per line.

    Accepts ``{"values": [...]}``, a bare array, an array inside prose or a code fence, and an
    array cut short (its complete strings are kept). Returns cleaned, distinct, non-empty values.
    """
    text = strip_thinking(text)
    found = _json_values(text)
    if found is None:
        found = _partial_json_values(text)
    if found is None:
        found = _line_values(text)
    return distinct(clean_value(v) for v in found)


def not_a_value(value: str, name: str) -> bool:
    """A value that is no value of ``name``: nothing but punctuation ("..."), or the variable's own
    name or placeholder written back ("cat_breed", "__lighting__", "Lighting" for ``lighting``),
    as a small model that misreads the request does (SmolLM2-135M-Instruct did, in the tests)."""
    words = _NON_WORD.sub(" ", value).strip().casefold()
    names = {_NON_WORD.sub(" ", part).strip().casefold() for part in (name, name.split("/")[-1])}
    return not words or words in names


def clean_value(value: str) -> str:
    """One value fit for a library file: one line, no list marker, quotes or leading ``#``."""
    value = " ".join(str(value).split())
    value = _MARKER.sub("", value)
    value = _strip_quotes(value.rstrip(",").strip())
    return value.lstrip("#").strip()


def distinct(values) -> list[str]:
    """Non-empty values in order, dropping repeats (compared without case)."""
    seen: set[str] = set()
    kept = []
    for value in values:
        key = value.casefold()
        if value and key not in seen:
            seen.add(key)
            kept.append(value)
    return kept


def _json_values(text: str) -> list[str] | None:
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char not in "[{":
            continue
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        strings = _strings_of(value)
        if strings is not None:
            return strings
    return None


def _strings_of(value) -> list[str] | None:
    if isinstance(value, dict):
        for key in ("values", "items", "results"):
            if isinstance(value.get(key), list):
                return _strings_of(value[key])
        lists = [v for v in value.values() if isinstance(v, list)]
        return _strings_of(lists[0]) if len(lists) == 1 else None
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    return None


def _partial_json_values(text: str) -> list[str] | None:
    """The complete strings of an array that was cut off before its end."""
    start = text.find("[")
    if start == -1 or "]" in text[start:]:
        return None
    strings = []
    for match in _JSON_STRING.finditer(text, start):
        try:
            strings.append(json.loads(f'"{match.group(1)}"'))
        except json.JSONDecodeError:
            continue
    return strings or None


def _line_values(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and line not in ("[", "]", "{", "}", "```")]
    lines = [line for line in lines if not line.startswith("```")]
    if len(lines) > 1 and (_PREAMBLE.match(lines[0]) or lines[0].endswith(":")):
        lines = lines[1:]
    return lines


def _strip_quotes(text: str) -> str:
    """``"a fox"`` -> ``a fox``; ``'a' and 'b'`` stays as it is."""
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1] and text[0] not in text[1:-1]:
        text = text[1:-1].strip()
    return text
