"""Checks on a request body before LiteLLM acts on it, for every model (local and cloud).

Three kinds of problem are refused with an ``InvalidRequestError`` (400) naming the field:

- keys only the gateway may set, which LiteLLM would otherwise obey for any model: a client could
  replace the provider key, bill it to another organization, add headers to the provider call,
  send a model to another provider or multiply its retries; and, by LiteLLM's own rule
  (``check_endpoint_and_credentials``), a provider's endpoint or credentials (``api_base``...);
- chat fields of the wrong JSON type. LiteLLM does not check them: it crashed on several
  (``content`` or ``tool_calls`` a number, ``response_format`` a string, ``timeout`` a string,
  ``prompt_id`` a number, a user content part of an unknown type: a 500), streamed Python reprs
  for ``stream: "yes"``, and forwarded the rest to the provider. OpenAI answers the same mistakes
  with a 400; so do we, before any provider is called;
- NaN and Infinity anywhere (not JSON; a provider client cannot encode them: a 500), and nesting
  deeper than ``MAX_BODY_DEPTH`` (LiteLLM recursed past Python's limit on it: a 500).

Values are checked for type only: ranges and what a model supports are the provider's business
(``custom_handlers/inference/request.py`` for the local model).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from litellm.types.llms.openai import ValidUserMessageContentTypes

from custom_handlers.inference.errors import InvalidRequestError

CONFIG_FILE = "proxy_config.yaml"  # where each model's settings are, as messages name it
_HEADERS = "the gateway sets the headers of its calls to providers"
_MODEL_SETTINGS = f"each model's settings are set in {CONFIG_FILE}"
# Body key -> why it is the gateway's to set.
GATEWAY_ONLY = {
    "api_key": "provider keys are the gateway's (OPENAI_API_KEY, ANTHROPIC_API_KEY, ...); send "
    "the gateway key in the Authorization header",
    "organization": "the provider account the gateway's key belongs to is set on the gateway",
    "headers": _HEADERS,
    "extra_headers": _HEADERS,
    "custom_llm_provider": f"the provider behind each model is set in {CONFIG_FILE}",
    "num_retries": f"retries are set in {CONFIG_FILE} (router_settings)",
    "litellm_params": _MODEL_SETTINGS,
    "model_info": _MODEL_SETTINGS,
}

_NUMBER = "a number"
_INTEGER = "an integer"
_STRING = "a string"
_BOOLEAN = "true or false"
_OBJECT = "an object"
_ARRAY = "an array"
# Top-level chat fields -> the JSON types they may have (null always may: it means unset).
CHAT_FIELD_TYPES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("temperature", "top_p", "presence_penalty", "frequency_penalty", "timeout"), (_NUMBER,)
    ),
    **dict.fromkeys(
        ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs", "top_k"), (_INTEGER,)
    ),
    **dict.fromkeys(("user", "service_tier", "reasoning_effort", "prompt_id"), (_STRING,)),
    **dict.fromkeys(("stream", "logprobs", "store", "parallel_tool_calls"), (_BOOLEAN,)),
    **dict.fromkeys(
        (
            "response_format",
            "stream_options",
            "logit_bias",
            "metadata",
            "audio",
            "prediction",
            "web_search_options",
            "prompt_variables",
            "extra_body",
        ),
        (_OBJECT,),
    ),
    **dict.fromkeys(("tools", "functions", "modalities"), (_ARRAY,)),
    **dict.fromkeys(("tool_choice", "function_call"), (_STRING, _OBJECT)),
    "stop": (_STRING, _ARRAY),
}
# Fields of one message -> their JSON types.
MESSAGE_FIELD_TYPES: dict[str, tuple[str, ...]] = {
    "role": (_STRING,),
    "content": (_STRING, _ARRAY),
    "name": (_STRING,),
    "tool_call_id": (_STRING,),
    "tool_calls": (_ARRAY,),
    "function_call": (_OBJECT,),
}

MAX_BODY_DEPTH = 128  # real requests nest a few dozen levels at most
_CONTENT_REQUIRED = ("system", "developer", "user")
# Content part type -> the type of the field that carries its payload (named like the type).
_PART_PAYLOADS: dict[str, type | tuple[type, ...]] = {
    "text": str,
    "refusal": str,
    "image_url": (str, Mapping),
    "input_audio": Mapping,
    "audio_url": (str, Mapping),
    "video_url": (str, Mapping),
    "file": Mapping,
}


def check_gateway_only(body: Mapping[str, Any]) -> None:
    """Refuse the first key only the gateway may set."""
    for name, why in GATEWAY_ONLY.items():
        if body.get(name) is not None:
            raise InvalidRequestError(
                f"'{name}' is a server-only setting: {why}. Remove it from the request.",
                param=name,
            )


_REJECTED = "Rejected Request: "
_REJECTED_FIELD = re.compile(r"Rejected Request: (\S+) is not allowed in (?:the )?request body")


def check_endpoint_and_credentials(body: Mapping[str, Any], *, route: str) -> None:
    """Refuse a body that sets a provider's endpoint or credentials (``api_base``, ``base_url``,
    ``model_list``, a nested ``metadata.api_base``...), by LiteLLM's own rule and settings."""
    from litellm.proxy import proxy_server
    from litellm.proxy.auth.auth_utils import is_request_body_safe

    try:
        is_request_body_safe(
            request_body=dict(body),
            general_settings=proxy_server.general_settings,
            llm_router=proxy_server.llm_router,
            model=body.get("model") if isinstance(body.get("model"), str) else "",
            route=route,
        )
    except ValueError as exc:
        if (error := rejected_request_error(exc)) is not None:
            raise error from None
        # Not a refusal we recognise: LiteLLM's own check meets it again and answers it.


def rejected_request_error(exc: BaseException) -> InvalidRequestError | None:
    """Our 400 for LiteLLM's refusal of a body that sets an endpoint or credentials, or None."""
    text = str(exc)
    if not (isinstance(exc, ValueError) and text.startswith(_REJECTED)):
        return None
    if match := _REJECTED_FIELD.match(text):
        field = match.group(1)
        return InvalidRequestError(
            f"'{field}' cannot be set in the request: a model's endpoint and credentials are "
            f"server-only settings ({CONFIG_FILE} and the gateway's environment). Remove it.",
            param=field,
        )
    return InvalidRequestError(text.removeprefix(_REJECTED).split(". ")[0].rstrip(".") + ".")


def check_json_values(body: Mapping[str, Any]) -> None:
    """Refuse NaN and Infinity anywhere in the body, and nesting deeper than MAX_BODY_DEPTH.

    JSON has no NaN, but LiteLLM's parser accepts it, and a provider client then fails to encode
    the body (a 500). Deep nesting made LiteLLM's copying and encoding of a body recurse past
    Python's limit (a 500 after retries). The walk itself does not recurse, and names the
    offending field only once it knows there is one: a 100,000-message body took 0.5 s when every
    value's path was built, on the event loop.
    """
    if _finite_and_shallow(list(body.values())):
        return
    level: list[tuple[str, Any]] = list(_children("", body))
    for _ in range(MAX_BODY_DEPTH):
        for where, value in level:
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequestError(
                    f"'{where}' is {value}, which is not a JSON number; send a finite number.",
                    param=where,
                )
        level = [child for where, value in level for child in _children(where, value)]
        if not level:
            return
    raise InvalidRequestError(
        f"The request nests objects or arrays more than {MAX_BODY_DEPTH} levels deep; flatten it.",
        param=level[0][0].split(".")[0].split("[")[0],
    )


def _finite_and_shallow(level: list[Any]) -> bool:
    """Whether no float in ``level`` (values at depth 1) or below is NaN or infinite, and
    nothing lies deeper than MAX_BODY_DEPTH."""
    for _ in range(MAX_BODY_DEPTH):
        below: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                below.extend(value.values())
            elif isinstance(value, list):
                below.extend(value)
            elif isinstance(value, float) and not math.isfinite(value):
                return False
        if not below:
            return True
        level = below
    return False


def _children(where: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
    if isinstance(value, list):
        return [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    return []


def check_chat_types(body: Mapping[str, Any]) -> None:
    """Refuse a chat completion body whose fields have the wrong JSON type."""
    for name, kinds in CHAT_FIELD_TYPES.items():
        _check_type(name, body.get(name), kinds)
    stop = body.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("'stop' must be a string or an array of strings.", param="stop")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            "'messages' must be a non-empty array of {role, content} objects.", param="messages"
        )
    for i, message in enumerate(messages):
        if not _is_plain_message(message):
            _check_message(f"messages[{i}]", message)


def _is_plain_message(message: Any) -> bool:
    """``{"role": str, "content": str}`` and nothing else: most messages, checked at a glance
    (checking every field of 100,000 messages took 0.3 s on the event loop)."""
    return (
        type(message) is dict
        and len(message) == 2
        and type(message.get("role")) is str
        and type(message.get("content")) is str
    )


def _check_message(where: str, message: Any) -> None:
    if not isinstance(message, Mapping):
        raise InvalidRequestError(
            f"{where} must be an object with 'role' and 'content'.", param=where
        )
    if not isinstance(message.get("role"), str):
        raise InvalidRequestError(
            f"{where}.role must be a string such as 'user'.", param=f"{where}.role"
        )
    for name, kinds in MESSAGE_FIELD_TYPES.items():
        _check_type(f"{where}.{name}", message.get(name), kinds)
    content = message.get("content")
    if content is None and message["role"] in _CONTENT_REQUIRED:
        # OpenAI's rule too; LiteLLM crashed (a 500) on a "developer" turn without content.
        raise InvalidRequestError(
            f"{where}.content is required in a '{message['role']}' turn: a string or an array "
            "of parts.",
            param=f"{where}.content",
        )
    if not isinstance(content, list):
        return
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise InvalidRequestError(
                f"{where}.content must be a string or an array of objects such as "
                '{"type": "text", "text": "..."}.',
                param=f"{where}.content",
            )
        kind = part.get("type")
        # LiteLLM refuses other part types in a user turn, but with a 500.
        if message["role"] == "user" and kind not in ValidUserMessageContentTypes:
            raise InvalidRequestError(
                f"{where}.content[{j}].type must be one of "
                f"{', '.join(map(repr, ValidUserMessageContentTypes))}.",
                param=f"{where}.content",
            )
        # A part carries its payload under its type's name; LiteLLM crashed without it.
        if kind in _PART_PAYLOADS and not isinstance(part.get(kind), _PART_PAYLOADS[kind]):
            raise InvalidRequestError(
                f"{where}.content[{j}] of type {kind!r} needs its {kind!r} field, as in "
                f'{{"type": "{kind}", "{kind}": ...}}.',
                param=f"{where}.content",
            )


def _check_type(name: str, value: Any, kinds: tuple[str, ...]) -> None:
    if value is None or any(_is(value, kind) for kind in kinds):
        return
    raise InvalidRequestError(
        f"'{name}' must be {' or '.join(kinds)}, got {_json_type(value)}.", param=name
    )


def _is(value: Any, kind: str) -> bool:
    if kind == _NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == _INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _BOOLEAN:
        return isinstance(value, bool)
    if kind == _STRING:
        return isinstance(value, str)
    if kind == _OBJECT:
        return isinstance(value, Mapping)
    return isinstance(value, list)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        # LiteLLM's JSON parser (orjson) reads integers past 64 bits as floats.
        if value.is_integer() and abs(value) >= 2**63:
            return f"an integer outside the 64-bit range ({value:.4g})"
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, Mapping) else "an array"
