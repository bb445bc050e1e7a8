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
from functools import lru_cache
from typing import Any

from litellm.types.llms.openai import ValidUserMessageContentTypes

from custom_handlers.inference.errors import InvalidRequestError, NotFoundError

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
    for i, tool in enumerate(body.get("tools") or ()):
        _check_tool(f"tools[{i}]", tool)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            "'messages' must be a non-empty array of {role, content} objects.", param="messages"
        )
    for i, message in enumerate(messages):
        if not _is_plain_message(message):
            _check_message(f"messages[{i}]", message)


def _check_tool(where: str, tool: Any) -> None:
    """A tool is an object; a function tool names its function with a string (a provider given
    anything else answered with a body LiteLLM could not read: a 500)."""
    if not isinstance(tool, Mapping):
        raise InvalidRequestError(
            f"{where} must be an object such as "
            '{"type": "function", "function": {"name": ...}}.',
            param="tools",
        )
    if tool.get("type", "function") != "function":
        return
    function = tool.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(
            f"{where}.function.name must be a string: the function's name.", param="tools"
        )


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


# ---- LiteLLM's own request keys -----------------------------------------------------------------

# Body keys the gateway honours although LiteLLM also knows them: OpenAI's own fields, and
# LiteLLM's way to pass a provider a parameter it does not know (the local model refuses it).
HONOURED = frozenset(
    {"metadata", "user", "timeout", "stream_options", "extra_body", "keep_alive"}
    | {"allowed_openai_params"}
)
# LiteLLM's keys that its proxy reads from a request body but that are not in its list of
# parameters (``litellm.types.utils.all_litellm_params``), and why each one is refused.
_LITELLM_REQUEST_KEYS = {
    "mock_tool_calls": "it makes LiteLLM answer with made-up tool calls",
    "mock_testing_fallbacks": "it makes LiteLLM fail on purpose",
    "mock_testing_context_fallbacks": "it makes LiteLLM fail on purpose",
    "mock_testing_rate_limit_error": "it makes LiteLLM fail on purpose",
    "deployment_id": "a model is called by its name",
    "specific_deployment": "a model is called by its name",
    "callbacks": "logging is the gateway's",
    "success_callback": "logging is the gateway's",
    "failure_callback": "logging is the gateway's",
    "disable_fallbacks": f"fallbacks are set in {CONFIG_FILE} (router_settings)",
    "context_window_fallbacks": f"fallbacks are set in {CONFIG_FILE} (router_settings)",
    "content_policy_fallbacks": f"fallbacks are set in {CONFIG_FILE} (router_settings)",
}
_WHY = {
    "mock_response": "it makes LiteLLM answer with a made-up response instead of the model",
    "mock_timeout": "it makes LiteLLM fail on purpose",
    "fallbacks": f"fallbacks are set in {CONFIG_FILE} (router_settings)",
    "max_retries": f"retries are set in {CONFIG_FILE} (router_settings)",
    "guardrails": "this gateway runs no guardrails",
    "tags": "this gateway does no tag-based routing or spend tracking",
    "cache": "this gateway keeps no response cache",
    "caching": "this gateway keeps no response cache",
    "no-log": "logging is the gateway's",
}
MAX_METADATA_KEYS = 64  # OpenAI takes 16; LiteLLM's logging integrations read a few more


@lru_cache(maxsize=1)
def litellm_request_keys() -> dict[str, str]:
    """Body key -> why the gateway refuses it: LiteLLM's own parameters (its routing, logging,
    pricing, credentials, test hooks), which its proxy would obey, or silently drop, if a request
    set them."""
    from litellm.types.utils import all_litellm_params

    generic = "it is one of LiteLLM's own settings, which this gateway does not take from a request"
    keys = {name: _WHY.get(name, generic) for name in all_litellm_params if name not in HONOURED}
    return {**keys, **_LITELLM_REQUEST_KEYS}


def check_litellm_keys(body: Mapping[str, Any]) -> None:
    """Refuse LiteLLM's own request keys (``mock_response``, ``deployment_id``, ``callbacks``,
    ``guardrails``, ``tags``...) with a 400 naming the key: none of them is silently ignored."""
    refused = litellm_request_keys()
    extra = body.get("extra_body")
    nested = [(f"extra_body.{k}", k) for k in extra] if isinstance(extra, Mapping) else []
    for where, name in [*((k, k) for k in body), *nested]:
        if name in refused or (isinstance(name, str) and name.startswith(("_litellm", "litellm_"))):
            why = refused.get(name, "it is one of LiteLLM's internal keys")
            raise InvalidRequestError(
                f"'{where}' cannot be set in a request to this gateway: {why}. Remove it "
                "(docs/security.md lists the keys a request may set).",
                param=where,
            )
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping) and len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequestError(
            f"'metadata' has {len(metadata):,} keys; this gateway takes at most "
            f"{MAX_METADATA_KEYS} (OpenAI takes 16).",
            param="metadata",
        )


# ---- the bodies of the other routes -------------------------------------------------------------

LOCAL_ROUTES = ("chat/completions", "completions", "responses", "messages")
# Route (its last part) -> top-level fields and their JSON types, as OpenAI / Anthropic define them.
ROUTE_FIELD_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "responses": {
        "input": (_STRING, _ARRAY),
        "instructions": (_STRING,),
        "previous_response_id": (_STRING,),
        "max_output_tokens": (_INTEGER,),
        **dict.fromkeys(("temperature", "top_p"), (_NUMBER,)),
        **dict.fromkeys(("stream", "store", "parallel_tool_calls", "background"), (_BOOLEAN,)),
        **dict.fromkeys(("text", "reasoning", "metadata", "stream_options"), (_OBJECT,)),
        **dict.fromkeys(("tools", "include"), (_ARRAY,)),
        "tool_choice": (_STRING, _OBJECT),
        **dict.fromkeys(("user", "truncation", "service_tier"), (_STRING,)),
    },
    "messages": {
        "messages": (_ARRAY,),
        "max_tokens": (_INTEGER,),
        "system": (_STRING, _ARRAY),
        "stop_sequences": (_ARRAY,),
        "stream": (_BOOLEAN,),
        **dict.fromkeys(("temperature", "top_p"), (_NUMBER,)),
        "top_k": (_INTEGER,),
        "tools": (_ARRAY,),
        **dict.fromkeys(("tool_choice", "metadata", "thinking"), (_OBJECT,)),
    },
    "completions": {
        "prompt": (_STRING, _ARRAY),
        **dict.fromkeys(("max_tokens", "n", "seed", "logprobs", "best_of"), (_INTEGER,)),
        **dict.fromkeys(
            ("temperature", "top_p", "presence_penalty", "frequency_penalty"), (_NUMBER,)
        ),
        **dict.fromkeys(("stream", "echo"), (_BOOLEAN,)),
        "stop": (_STRING, _ARRAY),
        "suffix": (_STRING,),
        **dict.fromkeys(("logit_bias", "stream_options"), (_OBJECT,)),
    },
    "embeddings": {"input": (_STRING, _ARRAY), "dimensions": (_INTEGER,)},
}


def route_kind(path: str) -> str:
    """What a model route serves, by the end of its path (``/v1/chat/completions`` ->
    ``chat/completions``); the path itself when it is not a model route."""
    for kind in (*LOCAL_ROUTES[:1], "images/generations", "audio/speech", "audio/transcriptions"):
        if path.endswith("/" + kind):
            return kind
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last if last in (*LOCAL_ROUTES, "embeddings", "rerank", "count_tokens") else path


# Route -> the mode (LiteLLM's model map, or model_info.mode) of the models that serve it.
ROUTE_MODES = {
    "embeddings": "embedding",
    "images/generations": "image_generation",
    "audio/speech": "audio_speech",
    "audio/transcriptions": "audio_transcription",
    "rerank": "rerank",
}


def check_route_body(
    path: str, body: Mapping[str, Any], local: bool, modes: frozenset[str] | None = None
) -> None:
    """Refuse a body that does not fit its route's API (a 400 naming the field), and a model
    asked for what it does not serve: a local one (``local``) for anything but text, a cloud one
    whose ``modes`` (its deployments' modes, when all are known) lack the route's."""
    kind = route_kind(path)
    if local and kind not in LOCAL_ROUTES:
        raise InvalidRequestError(
            f"model {body.get('model')!r} does not serve {path}: local models answer "
            "/v1/chat/completions, /v1/completions, /v1/responses and /v1/messages. Use a model "
            f"of {CONFIG_FILE} whose provider serves this endpoint.",
            param="model",
            code="unsupported_endpoint",
        )
    if modes and kind in ROUTE_MODES and ROUTE_MODES[kind] not in modes:
        raise InvalidRequestError(
            f"model {body.get('model')!r} does not serve {path}: it is a "
            f"{' / '.join(sorted(modes))} model (its mode in LiteLLM's model map; if that is "
            f"wrong, set model_info.mode: {ROUTE_MODES[kind]} on it in {CONFIG_FILE}).",
            param="model",
            code="unsupported_endpoint",
        )
    for name, kinds in ROUTE_FIELD_TYPES.get(kind, {}).items():
        _check_type(name, body.get(name), kinds)
    if kind == "responses":
        _check_items(
            "input", body.get("input"), 'an input item such as {"role": "user", "content": "..."}'
        )
    elif kind == "messages":
        messages = body.get("messages")
        if not messages:
            raise InvalidRequestError(
                "'messages' must be a non-empty array of {role, content} objects.",
                param="messages",
            )
        _check_items("messages", messages, 'an object such as {"role": "user", "content": "..."}')
    elif kind == "completions":
        if "messages" in body:
            raise InvalidRequestError(
                "'messages' is a field of /v1/chat/completions; /v1/completions takes 'prompt'.",
                param="messages",
            )
        _check_prompt(body.get("prompt"), local)


def _check_items(name: str, items: Any, what: str) -> None:
    if not isinstance(items, list):
        return
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidRequestError(f"{name}[{i}] must be {what}.", param=name)


def _check_prompt(prompt: Any, local: bool) -> None:
    """``prompt``: a string, an array of strings, of token ids, or of arrays of token ids (mixed
    with strings too); token ids go to local models only (the provider checks the ids)."""
    if prompt is None or isinstance(prompt, str):
        return
    if prompt and all(isinstance(p, str) for p in prompt):
        return
    ids = prompt and all(_is(p, _INTEGER) for p in prompt)
    id_lists = prompt and all(
        isinstance(p, str) or (isinstance(p, list) and p and all(_is(t, _INTEGER) for t in p))
        for p in prompt
    )
    if not (ids or id_lists):
        raise InvalidRequestError(
            "'prompt' must be a string, an array of strings, an array of token ids or an array "
            "of arrays of token ids.",
            param="prompt",
        )
    if not local:
        raise InvalidRequestError(
            "'prompt' as token ids is served by the local models only (LiteLLM cannot pass them "
            "on to this model): send the prompt as a string or an array of strings.",
            param="prompt",
        )


LOCAL_PROVIDER = "zlocal/"


def served_by(model: Any, provider: str) -> bool:
    """Whether a deployment of the model name ``model`` has a ``<provider>...`` model id."""
    if not isinstance(model, str):
        return False
    try:
        deployments = router().get_model_list(model_name=model) or []
    except Exception:  # the router's own lookup; a wrong guess only changes a hint or a check
        return False
    return any(str(d["litellm_params"]["model"]).startswith(provider) for d in deployments)


# Routes whose body names a model of proxy_config.yaml.
MODEL_ROUTES = (*LOCAL_ROUTES, "embeddings", "rerank", "count_tokens", *ROUTE_MODES)


def check_model_name(model: Any, router: Any) -> None:
    """A model name the gateway serves, or a 4xx that says what to send instead.

    - A name the router does not know is a 404 ``model_not_found``, as OpenAI answers (LiteLLM's
      own answer was a 400 "Invalid model name", which the SDKs raise as ``BadRequestError``).
    - A deployment's provider id used as the name (``zlocal/qwen3-4b``) is a 400 naming the model
      to call: LiteLLM would serve that deployment alone, without the name's fallbacks.

    With a wildcard entry or a default deployment any name may be served: nothing is refused.
    """
    if router is None or not isinstance(model, str) or router.is_recognized_model(model):
        return
    if routes_any_name(router):
        return
    if model not in router.deployment_names:
        raise NotFoundError(
            f"The model '{model}' does not exist on this gateway. GET /v1/models lists the "
            f"model names it serves; a model is added in {CONFIG_FILE}.",
            param="model",
            code="model_not_found",
        )
    names = sorted(
        {d["model_name"] for d in router.model_list if d["litellm_params"]["model"] == model}
    )
    raise InvalidRequestError(
        f"'{model}' is the provider id behind the model {' / '.join(map(repr, names))}: call it "
        f'by its name, as in "model": "{names[0]}" (GET /v1/models lists the names). Which '
        f"provider serves a name is set in {CONFIG_FILE}.",
        param="model",
    )


def routes_any_name(router: Any) -> bool:
    """A wildcard entry or a default deployment: any name may be served, ids included."""
    return bool(router.pattern_router.patterns) or router.default_deployment is not None


def deployment_modes(model: Any) -> frozenset[str] | None:
    """The modes (``chat``, ``embedding``, ``rerank``...) of the model name's deployments, from
    their ``model_info.mode`` or LiteLLM's model map; None when any is unknown (a model the map
    lacks, an OpenAI-compatible server of one's own): then nothing is assumed."""
    if not isinstance(model, str):
        return None
    try:
        deployments = router().get_model_list(model_name=model) or []
    except Exception:  # the router's own lookup; a wrong guess only changes a check
        return None
    modes = set()
    for deployment in deployments:
        mode = (deployment.get("model_info") or {}).get("mode")
        if mode is None:
            mode = _mapped_mode(str(deployment["litellm_params"]["model"]))
        if not isinstance(mode, str):
            return None
        modes.add(mode)
    return frozenset(modes) or None


@lru_cache(maxsize=256)
def _mapped_mode(model_id: str) -> str | None:
    import litellm

    try:
        return litellm.get_model_info(model_id).get("mode")
    except Exception:  # "This model isn't mapped yet": unknown
        return None


def router() -> Any:
    from litellm.proxy import proxy_server

    return proxy_server.llm_router


# ---- the size of an answer ----------------------------------------------------------------------

MAX_LOGPROB_ENTRIES = 16_384
UNSET_MAX_TOKENS = 2048  # what a request without max_tokens is counted as (the local default)
UNSET_COMPLETION_TOKENS = 16  # the same on /v1/completions (OpenAI's legacy default, ours too)


def check_answer_size(body: Mapping[str, Any], completions: bool = False) -> None:
    """Refuse a request whose answer would carry more than ``MAX_LOGPROB_ENTRIES`` log
    probabilities: ``n * max_tokens * (top_logprobs + 1)``, times the prompts of a text
    completion (``completions``: ``/v1/completions``, whose ``max_tokens`` defaults to 16).

    LiteLLM turns each entry into objects and JSON on the event loop, ~27 µs each on this
    machine's CPU: one 176-byte request (``n: 8``, 1,800 tokens, ``top_logprobs: 20``) built a
    16 MB answer and held every route for 8.2 s. The bound keeps one answer under ~1 s of that.
    """
    asked = body.get("logprobs")
    if asked is None or asked is False:
        return
    top = body.get("top_logprobs") if isinstance(asked, bool) else asked
    n, max_tokens = body.get("n"), body.get("max_tokens") or body.get("max_completion_tokens")
    if not all(_is(v, _INTEGER) for v in (top or 0, n or 1, max_tokens or 1)):
        return  # a type the route's own check refuses
    unset = UNSET_COMPLETION_TOKENS if completions else UNSET_MAX_TOKENS
    prompt = body.get("prompt")
    several = completions and isinstance(prompt, list) and not all(_is(t, _INTEGER) for t in prompt)
    prompts = len(prompt) if several else 1
    entries = prompts * (n or 1) * (max_tokens or unset) * ((top or 0) + 1)
    if entries > MAX_LOGPROB_ENTRIES:
        raise InvalidRequestError(
            f"This answer could carry {entries:,} log probabilities ("
            + (f"{prompts} prompts x " if prompts > 1 else "")
            + f"n {n or 1} x max_tokens "
            f"{max_tokens or f'{unset} (unset)'} x (top_logprobs {top or 0} + 1)); "
            f"this gateway sends at most {MAX_LOGPROB_ENTRIES:,} in one answer. Lower "
            "max_tokens, n or top_logprobs.",
            param="max_tokens" if max_tokens else "logprobs",
        )
