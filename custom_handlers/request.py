"""Validate an OpenAI chat request into a ``ChatRequest`` the engine can run.

Pure Python: no torch, no tokenizer. Every problem is an ``InvalidRequestError`` (HTTP 400) whose
message names the offending field, so the caller can fix it without reading our code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from custom_handlers.errors import InvalidRequestError

# "developer" is OpenAI's newer name for the system turn.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 16
MAX_SCHEMA_CHARS = 64 * 1024
JSON_OBJECT_SCHEMA = '{"type":"object"}'
# Parameters that change the answer in ways the local model does not implement: refusing them is
# better than silently answering as if they had not been sent.
_UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "logit_bias": "logit_bias",
    "audio": "audio output",
    "modalities": "non-text modalities",
}
_ZERO_OR_UNSET = ("presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; ``None`` means "use the model's recommended default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    json_schema: str | None = None  # canonical JSON of the schema the answer must follow
    keep_alive: float | None = None  # seconds to keep the model loaded after this request


def parse_chat_request(
    messages: Any, params: Mapping[str, Any], *, stream: bool = False, max_n: int = 8
) -> ChatRequest:
    """Check ``messages`` and LiteLLM's ``optional_params``; raise ``InvalidRequestError``."""
    _reject_unsupported(params)
    sampling = SamplingParams(
        max_tokens=_max_tokens(params),
        temperature=_number(params, "temperature", 0.0, 2.0),
        top_p=_number(params, "top_p", 0.0, 1.0, low_open=True),
        top_k=_integer(params, "top_k", 0, None),
        seed=_integer(params, "seed", None, None),
        n=_integer(params, "n", 1, max_n) or 1,
        stop=_stop(params.get("stop")),
    )
    if stream and sampling.n > 1:
        raise InvalidRequestError(
            "n > 1 is not supported with stream=true on the local model: send n streaming "
            "requests, or n > 1 without streaming.",
            param="n",
        )
    # stream_options.include_usage is LiteLLM's business: the final chunk always carries usage.
    json_schema = _json_schema(params.get("response_format"))
    keep_alive = _keep_alive(params.get("keep_alive"))
    return ChatRequest(_messages(messages), sampling, stream, json_schema, keep_alive)


def _keep_alive(value: Any) -> float | None:
    """Ollama's knob, in seconds: 0 unloads the model right after this request, -1 never."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (value < 0 and value != -1):
        raise InvalidRequestError(
            "'keep_alive' must be a number of seconds (0 or more, or -1 for never), "
            f"got {value!r}.",
            param="keep_alive",
        )
    return float(value)


def _reject_unsupported(params: Mapping[str, Any]) -> None:
    for name, feature in _UNSUPPORTED.items():
        if params.get(name) not in (None, False, [], {}):
            raise InvalidRequestError(
                f"'{name}' is not supported by the local model ({feature}); use a cloud model "
                "for it, or remove the parameter.",
                param=name,
            )
    for name in _ZERO_OR_UNSET:
        if params.get(name) not in (None, 0, 0.0):
            raise InvalidRequestError(
                f"'{name}' is not supported by the local model; leave it unset or 0.", param=name
            )


def _json_schema(response_format: Any) -> str | None:
    """The schema an answer must follow (canonical JSON), or None for free text."""
    if response_format in (None, {}):
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError(
            '\'response_format\' must be an object such as {"type": "json_object"}.',
            param="response_format",
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format.type {kind!r} is not supported; use 'text', 'json_object' or "
            "'json_schema'.",
            param="response_format",
        )
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(
            "response_format.json_schema.schema must be a JSON Schema object, as in "
            '{"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}}.',
            param="response_format",
        )
    _check_schema(schema)
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(
            f"response_format.json_schema.schema is {len(text)} characters; the limit is "
            f"{MAX_SCHEMA_CHARS}.",
            param="response_format",
        )
    return text


def _check_schema(schema: Mapping[str, Any]) -> None:
    from jsonschema import Draft202012Validator, SchemaError, validators

    try:
        validators.validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidRequestError(
            f"response_format.json_schema.schema is not a valid JSON Schema at {where}: "
            f"{exc.message}",
            param="response_format",
        ) from exc


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise InvalidRequestError(
            "'messages' must be a non-empty list of {role, content} objects.", param="messages"
        )
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, message: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise InvalidRequestError(
            f"{where} must be an object with 'role' and 'content'.", param=where
        )
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(
            f"{where}.role {role!r} is not supported by the local model; use one of "
            "'system', 'developer', 'user', 'assistant'.",
            param=f"{where}.role",
        )
    if message.get("tool_calls") or message.get("function_call"):
        raise InvalidRequestError(
            f"{where} carries tool calls, which the local model does not support.", param=where
        )
    return {"role": _ROLES[role], "content": _content(where, message.get("content"))}


def _content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"{where}.content[{j}] is of type {kind!r}; the local model accepts only "
                    "text (a string, or parts of type 'text').",
                    param=f"{where}.content",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(
        f"{where}.content must be a string or a list of text parts.", param=f"{where}.content"
    )


def _max_tokens(params: Mapping[str, Any]) -> int | None:
    name = (
        "max_completion_tokens" if params.get("max_completion_tokens") is not None else "max_tokens"
    )
    return _integer(params, name, 1, None)


def _integer(params: Mapping[str, Any], name: str, low: int | None, high: int | None) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"'{name}' must be an integer, got {value!r}.", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequestError(f"'{name}' must be {_range(low, high)}, got {value}.", param=name)
    return value


def _number(
    params: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = False
) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"'{name}' must be a number, got {value!r}.", param=name)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise InvalidRequestError(
            f"'{name}' must be {bound} and at most {high}, got {value}.", param=name
        )
    return float(value)


def _range(low: int | None, high: int | None) -> str:
    if high is None:
        return f"at least {low}"
    return f"between {low} and {high}"


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, Sequence)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise InvalidRequestError(
            f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
            "non-empty strings.",
            param="stop",
        )
    return tuple(dict.fromkeys(stops))
