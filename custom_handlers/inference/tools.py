"""Tool calling on the local model: the request's tools, and the calls read back from the tokens.

Pure Python (no torch, no tokenizer). ``parse_tools`` checks ``tools``, ``tool_choice`` and
``parallel_tool_calls`` into a ``ToolSet`` (400 naming the field otherwise); the grammar that makes
every call valid is built from it in ``constraints.py``; ``CallReader`` turns one choice's tokens,
once the model opens a call, into ``CallDelta``s: id and name first, then the arguments in pieces,
as OpenAI streams them.

Qwen3 writes a call as its chat template renders one in the history::

    <tool_call>\\n{"name": "NAME", "arguments": ARGUMENTS}\\n</tool_call>

with ``<tool_call>`` and ``</tool_call>`` single tokens of its vocabulary, calls separated by a
newline, and nothing after the last call but the end of the turn. The grammar forces that layout
exactly, with ``ARGUMENTS`` compact JSON following the function's ``parameters``; so the reader
needs no JSON parser and can never see anything else.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from custom_handlers.inference.errors import InvalidRequestError

# OpenAI's own limits: at most 128 tools; names of letters, digits, '_' and '-', up to 64.
MAX_TOOLS = 128
# All the tools' schemas together (each is also held to response_format's 64 KiB): what one
# request may make the gateway compile into a grammar.
MAX_TOOLS_SCHEMA_CHARS = 256 * 1024
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_ARGUMENTS = {"type": "object", "properties": {}}
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
CALL_HEAD = '\n{"name": "'  # after <tool_call>; then the name
CALL_ARGUMENTS = '", "arguments": '  # after the name; then the arguments
CALL_TAIL = "}\n"  # after the arguments; then </tool_call>


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: str  # canonical JSON of the schema the arguments must follow (strict applied)

    def template_entry(self) -> dict[str, Any]:
        """The tool as the chat template renders it for the model."""
        entry: dict[str, Any] = {"name": self.name}
        if self.description:
            entry["description"] = self.description
        entry["parameters"] = json.loads(self.parameters)
        return {"type": "function", "function": entry}


@dataclass(frozen=True)
class ToolSet:
    """What the caller offered and what it allows: ``choice`` is "auto", "none" or "required";
    ``forced`` names the one function to call when the caller named one."""

    functions: tuple[Function, ...]
    choice: str = "auto"
    forced: str | None = None
    parallel: bool = True

    @property
    def may_call(self) -> bool:
        return self.choice != "none"

    @property
    def must_call(self) -> bool:
        return self.choice == "required" or self.forced is not None

    @property
    def callable(self) -> tuple[Function, ...]:
        """The functions a call may name."""
        if self.forced is not None:
            return tuple(f for f in self.functions if f.name == self.forced)
        return self.functions

    def template_tools(self) -> list[dict[str, Any]]:
        return [f.template_entry() for f in self.functions]


def parse_tools(params: Mapping[str, Any], check_schema: Callable) -> ToolSet | None:
    """The request's tools, or None when it offers none. ``check_schema(schema, where)`` is the
    JSON-schema check ``response_format`` uses (400 on a schema that is too deep, too big, or not a
    JSON Schema), which returns the schema ``closed`` as canonical JSON."""
    tools, choice = params.get("tools"), params.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise InvalidRequestError(
                "'tool_choice' asks for a tool call but the request offers no 'tools'.",
                param="tool_choice",
            )
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes):
        raise InvalidRequestError("'tools' must be a list of functions.", param="tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(
            f"'tools' lists {len(tools)} tools; the limit is {MAX_TOOLS}.", param="tools"
        )
    functions = tuple(_function(i, tool, check_schema) for i, tool in enumerate(tools))
    size = sum(len(f.parameters) for f in functions)
    if size > MAX_TOOLS_SCHEMA_CHARS:
        raise InvalidRequestError(
            f"The tools' parameters add up to {size} characters of JSON Schema; the limit is "
            f"{MAX_TOOLS_SCHEMA_CHARS}.",
            param="tools",
        )
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InvalidRequestError(f"'tools' lists the function {twice!r} twice.", param="tools")
    mode, forced = _choice(choice, names)
    parallel = params.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequestError(
            f"'parallel_tool_calls' must be true or false, got {parallel!r}.",
            param="parallel_tool_calls",
        )
    return ToolSet(functions, mode, forced, parallel is not False)


def _function(i: int, tool: Any, check_schema: Callable) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
        raise InvalidRequestError(
            f"{where} is of type {kind!r}; the local model supports tools of type 'function' "
            '({"type": "function", "function": {"name": ..., "parameters": {...}}}).',
            param=where,
        )
    spec = tool.get("function")
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(
            f"{where}.function must be an object with 'name' and 'parameters'.", param=where
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}.",
            param=f"{where}.function.name",
        )
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(
            f"{where}.function.description must be a string.", param=f"{where}.function"
        )
    schema = spec.get("parameters")
    schema = _NO_ARGUMENTS if schema in (None, {}) else schema
    where_schema = f"{where}.function.parameters"
    if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
        raise InvalidRequestError(
            f"{where_schema} must be a JSON Schema of type 'object' (the arguments are an "
            "object of named values).",
            param=where_schema,
        )
    strict = spec.get("strict") is True
    return Function(name, description, check_schema(schema, where_schema, strict=strict))


_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


# Keywords whose values are JSON data, not schemas: closing an object there would change the data
# (a const {"properties": {"a": 1}} became one with "additionalProperties": false).
_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})


def closed(schema: Any, every_object: bool = False) -> Any:
    """The schema with no room for keys it does not name.

    An object that lists ``properties`` and says nothing of other keys gets no other keys (as
    xgrammar's default strict mode in vLLM): JSON Schema would allow any, and a model, a random one
    above all, then spends its tokens on keys nobody asked for. ``every_object`` (``strict: true``)
    also closes objects that list no properties, as OpenAI's strict mode requires.
    """
    if isinstance(schema, list):
        return [closed(s, every_object) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: v if k in _DATA_KEYS else closed(v, every_object) for k, v in schema.items()}
    is_object = out.get("type") == "object" or "properties" in out
    if (
        is_object
        and ("properties" in out or every_object)
        and not any(k in out for k in _OPEN_KEYS)
    ):
        out["additionalProperties"] = False
    return out


def _choice(choice: Any, names: list[str]) -> tuple[str, str | None]:
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto", None
    name = None
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        spec = choice.get("function")
        name = spec.get("name") if isinstance(spec, Mapping) else choice.get("name")
    if not isinstance(name, str):
        raise InvalidRequestError(
            "'tool_choice' must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}, '
            f"got {json.dumps(choice)[:200]}.",
            param="tool_choice",
        )
    if name not in names:
        raise InvalidRequestError(
            f"'tool_choice' names the function {name!r}, which 'tools' does not offer.",
            param="tool_choice",
        )
    return "required", name


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class CallDelta:
    """A piece of one tool call of one choice: the first carries ``id`` and ``name``."""

    index: int  # the choice
    call: int  # the call's position among this choice's calls
    arguments: str = ""
    id: str | None = None
    name: str | None = None


class CallReader:
    """One choice's tool calls, read from the text between the call markers.

    ``open()`` at each ``<tool_call>`` token, ``push(text)`` with the text decoded in between,
    ``close()`` at ``</tool_call>``. The arguments are released as they come, except a trailing
    ``}`` or ``}\\n`` that may be the end of the call rather than of the arguments.
    """

    def __init__(self, index: int):
        self.index = index
        self.calls: list[dict[str, str]] = []  # {"id", "name", "arguments"}, complete or not
        self.complete = 0  # calls closed so far (a call cut by max_tokens is not complete)
        self._text = ""  # the open call's text so far
        self._sent = 0  # characters of the open call's arguments already released
        self._open = False

    def open(self) -> None:
        self._open, self._text, self._sent = True, "", 0

    def push(self, text: str) -> list[CallDelta]:
        if not self._open or not text:
            return []
        self._text += text
        out = []
        if len(self.calls) == self.complete:  # the name is not known yet
            start = len(CALL_HEAD)
            end = self._text.find(CALL_ARGUMENTS, start)
            if end < 0:
                return []
            call = {"id": new_call_id(), "name": self._text[start:end], "arguments": ""}
            self.calls.append(call)
            out.append(CallDelta(self.index, self.complete, id=call["id"], name=call["name"]))
        body = self._arguments_text()
        ready = len(body) - _held_back(body)
        if ready > self._sent:
            piece = body[self._sent : ready]
            self._sent = ready
            self.calls[-1]["arguments"] += piece
            out.append(CallDelta(self.index, self.complete, arguments=piece))
        return out

    def close(self) -> list[CallDelta]:
        """``</tool_call>``: the call is complete; the end of the call is not its arguments."""
        if not self._open or len(self.calls) == self.complete:
            self._open = False
            return []
        body = self._arguments_text().removesuffix(CALL_TAIL)
        piece = body[self._sent :]
        self.calls[-1]["arguments"] += piece
        self._open = False
        self.complete += 1
        return [CallDelta(self.index, self.complete - 1, arguments=piece)] if piece else []

    def _arguments_text(self) -> str:
        return self._text[self._text.find(CALL_ARGUMENTS) + len(CALL_ARGUMENTS) :]


def _held_back(body: str) -> int:
    """How many trailing characters could be the call's own ``}\\n`` rather than arguments."""
    for size in (2, 1):
        if body.endswith(CALL_TAIL[:size]) and len(body) > size:
            return size
    return 0
