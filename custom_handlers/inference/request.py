"""Validate an OpenAI chat request into a ``ChatRequest`` the engine can run.

Pure Python: no torch, no tokenizer. Every problem is an ``InvalidRequestError`` (HTTP 400) whose
message names the offending field, so the caller can fix it without reading our code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.settings import KEEP_ALIVE_RANGE, LocalModelSettings, is_keep_alive
from custom_handlers.inference.tools import ToolSet, closed, parse_tools

# "developer" is OpenAI's newer name for the system turn.
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
MAX_STOP_STRINGS = 16
# Characters in one stop string. Real stop strings are a few words; the matcher holds back up to the
# longest one's length of text and scans it on every token, so a 2 MB stop string (the body limit
# allows 16 of them) costs every row of the batch time on each token.
MAX_STOP_CHARS = 1000
# What a seed may be: any signed or unsigned 64-bit integer (what torch.Generator.manual_seed
# takes). OpenAI's API documents a signed 64-bit seed.
SEED_RANGE = (-(2**63), 2**64 - 1)
# Temperatures below this decode greedily: dividing the logits by one overflows them to inf (1e-45,
# NaN draws) or, below float32's range (1e-300), to a division by zero. vLLM does the same
# (``_SAMPLING_EPS = 1e-5`` in vllm/sampling_params.py and vllm/v1/sample/sampler.py).
GREEDY_BELOW = 1e-5
MAX_SCHEMA_CHARS = 64 * 1024
# Objects and arrays inside one another in a schema. A real schema needs a few dozen at most; the
# validator recurses per level and hit Python's recursion limit (a 500) at about 200.
MAX_SCHEMA_DEPTH = 64
JSON_OBJECT_SCHEMA = '{"type":"object"}'
# Parameters that change the answer in ways the local model does not implement: refusing them is
# better than silently answering as if they had not been sent.
_UNSUPPORTED = {
    "functions": "the legacy function calling: send 'tools' and 'tool_choice' instead",
    "function_call": "the legacy function calling: send 'tools' and 'tool_choice' instead",
    "audio": "audio output",
    "modalities": "non-text modalities",
    "thinking": "Anthropic's thinking switch: send 'reasoning_effort' instead",
    "verbosity": "OpenAI's answer-length setting; ask for the length in the prompt",
    "web_search_options": "web search",
    # LiteLLM's way to pass a parameter it would refuse: the model would then silently ignore it.
    "allowed_openai_params": "parameters beyond those it supports",
    # Sampling and decoding extensions of vLLM, Ollama, llama.cpp and transformers that the local
    # model does not implement (it does: top_k, min_p, repetition_penalty, the penalties and
    # logit_bias). Sent in extra_body they reach the model as top-level keys.
    **dict.fromkeys(
        (
            "typical_p",
            "tfs_z",
            "top_a",
            "mirostat",
            "mirostat_tau",
            "mirostat_eta",
            "epsilon_cutoff",
            "eta_cutoff",
            "xtc_probability",
            "xtc_threshold",
            "dry_multiplier",
            "dry_base",
            "dry_allowed_length",
            "dry_sequence_breakers",
            "repeat_last_n",
            "penalize_newline",
            "no_repeat_ngram_size",
            "encoder_repetition_penalty",
            "length_penalty",
            "diversity_penalty",
            "num_beams",
            "use_beam_search",
            "min_tokens",
            "ignore_eos",
            "stop_token_ids",
            "bad_words",
            "allowed_token_ids",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "structured_outputs",
        ),
        "a sampling or decoding option it does not implement",
    ),
    "repeat_penalty": "Ollama's native name: send 'repetition_penalty' instead",
}
# Sampling controls that may also come inside a raw body's "extra_body" object (the openai SDK
# sends its extra_body keys at the top level; LiteLLM leaves a raw "extra_body" key nested).
SAMPLING_EXTRAS = ("top_k", "min_p", "repetition_penalty")
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
LOGIT_BIAS_RANGE = (-100.0, 100.0)
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty, frequency_penalty (OpenAI)
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # > 0 in vLLM; the ends keep float32 finite

# Body keys that look like a server-only setting of the local model, and the gateway's environment
# variable that sets it ("": none, the loaded model fixes it). A request that tries one is refused:
# it cannot change what the server does, and answering as if it had would mislead the caller.
# keep_alive is per request on purpose; "model" is the alias, never an optional parameter.
_CONFIG = "proxy_config.yaml"
_SERVER_ONLY: dict[str, str] = {
    **{
        name: f"LOCAL_LLM_{name.upper()}"
        for name in LocalModelSettings.model_fields
        if name not in ("model", "keep_alive")
    },
    **dict.fromkeys(
        ("model_path", "model_dir", "model_name_or_path", "pretrained_model_name_or_path"),
        "LOCAL_LLM_MODEL",
    ),
    **dict.fromkeys(("checkpoint", "repo_id", "revision", "tokenizer"), "LOCAL_LLM_MODEL"),
    **dict.fromkeys(("device_map", "cuda_device", "gpu_id"), "LOCAL_LLM_DEVICE"),
    "torch_dtype": "LOCAL_LLM_DTYPE",
    **dict.fromkeys(
        (
            "load_in_4bit",
            "load_in_8bit",
            "quantization_config",
            "bnb_4bit_quant_type",
            "bnb_4bit_compute_dtype",
        ),
        "LOCAL_LLM_QUANTIZATION",
    ),
    "batch_size": "LOCAL_LLM_MAX_BATCH_SIZE",
    **dict.fromkeys(("model_info", "litellm_params", "max_loaded_models"), _CONFIG),
    **dict.fromkeys(("queue_size", "max_queue_size"), "LOCAL_LLM_MAX_QUEUE"),
    **dict.fromkeys(("token", "hf_token", "use_auth_token"), "HF_TOKEN"),
    "cache_dir": "HF_HOME",
    **dict.fromkeys(
        (
            "max_memory",
            "gpu_memory_utilization",
            "memory_limit",
            "max_model_len",
            "context_length",
            "max_position_embeddings",
            "attn_implementation",
            "low_cpu_mem_usage",
            "offload_folder",
            "local_files_only",
        ),
        "",
    ),
}
_ENV_PREFIX = "local_llm_"


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
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # None: the checkpoint's (1: none)
    min_p: float | None = None  # None: the checkpoint's (0: none)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids distinct

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one too small to differ from it (``GREEDY_BELOW``)."""
        return self.temperature is not None and self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # role, content; an assistant's tool_calls; a tool's result
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    json_schema: str | None = None  # canonical JSON of the schema the answer must follow
    keep_alive: float | None = None  # seconds to keep the model loaded after this request
    tools: ToolSet | None = None  # functions the model may call, and how it may
    logprobs: int | None = None  # None: no logprobs; else the number of alternatives per token
    thinking: bool | None = None  # Qwen3's thinking switch (reasoning_effort); None: not asked

    @property
    def chars(self) -> int:
        """Characters of text in the messages (what bounds the prompt's tokens)."""
        return sum(
            len(m["content"])
            + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls", ()))
            for m in self.messages
        )


def parse_chat_request(
    messages: Any, params: Mapping[str, Any], *, stream: bool = False, max_n: int = 8
) -> ChatRequest:
    """Check ``messages`` and LiteLLM's ``optional_params``; raise ``InvalidRequestError``."""
    _reject_server_only(params)
    reject_unsupported(params)
    extras = _Extras(params)
    sampling = SamplingParams(
        max_tokens=_max_tokens(params),
        temperature=_number(params, "temperature", 0.0, 2.0),
        top_p=_number(params, "top_p", 0.0, 1.0, low_open=True),
        top_k=_integer(extras, "top_k", 0, None),
        seed=_integer(params, "seed", *SEED_RANGE),
        n=_integer(params, "n", 1, max_n) or 1,
        stop=_stop(params.get("stop")),
        presence_penalty=_number(params, "presence_penalty", *PENALTY_RANGE),
        frequency_penalty=_number(params, "frequency_penalty", *PENALTY_RANGE),
        repetition_penalty=_number(extras, "repetition_penalty", *REPETITION_PENALTY_RANGE),
        min_p=_number(extras, "min_p", 0.0, 1.0),
        logit_bias=_logit_bias(params.get("logit_bias")),
    )
    if stream and sampling.n > 1:
        raise InvalidRequestError(
            "n > 1 is not supported with stream=true on the local model: send n streaming "
            "requests, or n > 1 without streaming.",
            param="n",
        )
    # stream_options.include_usage is LiteLLM's business: the final chunk always carries usage.
    json_schema = _json_schema(params.get("response_format"))
    keep_alive = _keep_alive(params)
    tools = parse_tools(params, checked_schema)
    return ChatRequest(
        _messages(messages),
        sampling,
        stream,
        json_schema,
        keep_alive,
        tools,
        _logprobs(params),
        thinking(params),
    )


# OpenAI's reasoning_effort values; "none" and "minimal" mean no thinking on Qwen3.
REASONING_EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


def thinking(params: Mapping[str, Any]) -> bool | None:
    """Qwen3's thinking switch from ``reasoning_effort`` (or Qwen's own ``enable_thinking``)."""
    effort, switch = params.get("reasoning_effort"), params.get("enable_thinking")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise InvalidRequestError(
                f"'reasoning_effort' must be one of {', '.join(map(repr, REASONING_EFFORTS))}, "
                f"got {effort!r}.",
                param="reasoning_effort",
            )
        return REASONING_EFFORTS[effort]
    if switch is not None and not isinstance(switch, bool):
        raise InvalidRequestError(
            f"'enable_thinking' must be true or false, got {switch!r}.", param="enable_thinking"
        )
    return switch


MAX_TOP_LOGPROBS = 20


def _logprobs(params: Mapping[str, Any]) -> int | None:
    """OpenAI's chat ``logprobs`` (true/false) and ``top_logprobs`` (0 to 20, needs logprobs)."""
    asked = params.get("logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise InvalidRequestError(
            f"'logprobs' must be true or false, got {asked!r} (on /v1/completions the local "
            "model has no logprobs: use /v1/chat/completions for them).",
            param="logprobs",
        )
    top = _integer(params, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not asked:
        raise InvalidRequestError(
            "'top_logprobs' needs 'logprobs': true (on /v1/responses the local model has no "
            "logprobs: use /v1/chat/completions for them).",
            param="top_logprobs",
        )
    return (top or 0) if asked else None


def _keep_alive(params: Mapping[str, Any]) -> float | None:
    """Ollama's knob, in seconds: 0 unloads the model right after this request, -1 never; at most
    a week (``KEEP_ALIVE_MAX``). Ollama's duration strings ("5m") are refused, saying so.

    The body's own key, else a raw ``extra_body``'s (LiteLLM leaves that one nested: it was
    ignored, whatever its value); both are checked."""
    nested = params.get("extra_body")
    nested = nested.get("keep_alive") if isinstance(nested, Mapping) else None
    found = None
    for name, value in (
        ("keep_alive", params.get("keep_alive")),
        ("extra_body.keep_alive", nested),
    ):
        if value is None:
            continue
        if not is_keep_alive(value):
            raise InvalidRequestError(
                f"'{name}' must be {KEEP_ALIVE_RANGE}, got {_keep_alive_shown(value)}.", param=name
            )
        found = float(value) if found is None else found
    return found


def _keep_alive_shown(value: Any) -> str:
    if isinstance(value, str):
        return f'the string {value!r} (send seconds as a number, e.g. 300 for Ollama\'s "5m")'
    return _shown(value)


def _shown(value: Any) -> str:
    """``value`` for a message; an integer past 64 bits as its size (``str`` refuses one of over
    4,300 digits, and nobody reads a hundred)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _reject_server_only(params: Mapping[str, Any]) -> None:
    """Refuse body keys (top level or a raw ``extra_body``) that name a server-only setting."""
    nested = params.get("extra_body")
    nested = nested if isinstance(nested, Mapping) else {}
    for where, source in (("", params), ("extra_body.", nested)):
        for name in source:
            if (env := _server_only_env(name)) is not None:
                where_name = f"{where}{name}"
                raise InvalidRequestError(_server_only_message(where_name, env), param=where_name)


def _server_only_env(name: Any) -> str | None:
    """The variable that sets ``name`` on the gateway ("" if none), or None: not a setting."""
    key = str(name).strip().lower().replace("-", "_")
    if key.startswith(_ENV_PREFIX):
        return _SERVER_ONLY.get(key.removeprefix(_ENV_PREFIX), key.upper())
    return _SERVER_ONLY.get(key)


def _server_only_message(name: str, env: str) -> str:
    if not env:
        how = "it is fixed by the model the gateway loads and cannot be set per request"
    elif env == _CONFIG:
        how = f"each local model's settings are set in {_CONFIG} and the gateway's environment"
    elif env == "LOCAL_LLM_MODEL":
        how = f"each local model's checkpoint is its entry's litellm_params.model in {_CONFIG}"
    elif not env.startswith(_ENV_PREFIX.upper()):
        how = f"set {env} in the gateway's environment (see env.example) instead"
    else:
        setting = env.removeprefix(_ENV_PREFIX.upper()).lower()
        how = (
            f"set it as the model's model_info.{setting} in {_CONFIG}, or {env} in the "
            "gateway's environment for every local model, instead"
        )
    return (
        f"'{name}' is a server-only setting of the local model: {how}. Remove it from the request."
    )


def reject_unsupported(params: Mapping[str, Any]) -> None:
    """A 400 naming the first parameter the local model does not support (also run on the body,
    before LiteLLM's own refusal, whose message advised changing the server's settings)."""
    for name, feature in _UNSUPPORTED.items():
        if params.get(name) not in (None, False, [], {}):
            raise InvalidRequestError(
                f"'{name}' is not supported by the local model ({feature}); use a cloud model "
                "for it, or remove the parameter.",
                param=name,
            )
    nested = params.get("extra_body")
    for name in nested if isinstance(nested, Mapping) else ():
        if name in _UNSUPPORTED and nested[name] not in (None, False, [], {}):
            raise InvalidRequestError(
                f"'extra_body.{name}' is not supported by the local model ({_UNSUPPORTED[name]});"
                " use a cloud model for it, or remove the parameter.",
                param=f"extra_body.{name}",
            )


class _Extras(dict):
    """The sampling extensions of a request: a body key, else the same key in a raw
    ``extra_body`` (named so in errors)."""

    def __init__(self, params: Mapping[str, Any]):
        nested = params.get("extra_body")
        nested = nested if isinstance(nested, Mapping) else {}
        super().__init__()
        self.names: dict[str, str] = {}
        for name in SAMPLING_EXTRAS:
            if params.get(name) is not None:
                self[name], self.names[name] = params[name], name
            elif nested.get(name) is not None:
                self[name], self.names[name] = nested[name], f"extra_body.{name}"


def _logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: {token id (a string of digits): bias from -100 to 100}, at most
    ``MAX_LOGIT_BIAS`` entries. Whether each id is in the vocabulary is checked once the model is
    loaded (``check_logit_bias``)."""
    if bias is None:
        return ()
    if not isinstance(bias, Mapping):
        raise InvalidRequestError(
            "'logit_bias' must be an object mapping token ids to a bias from -100 to 100, such as "
            '{"1234": -100}.',
            param="logit_bias",
        )
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            f"'logit_bias' may have at most {MAX_LOGIT_BIAS} entries; it has {len(bias)}.",
            param="logit_bias",
        )
    out: dict[int, float] = {}
    low, high = LOGIT_BIAS_RANGE
    for key, value in bias.items():
        token = _token_id(key)
        if token is None:
            raise InvalidRequestError(
                f"'logit_bias' keys must be token ids (non-negative integers), got {_shown(key)}.",
                param="logit_bias",
            )
        if token in out:
            raise InvalidRequestError(
                f"'logit_bias' names token {token} more than once.", param="logit_bias"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise InvalidRequestError(
                f"'logit_bias' values must be numbers; token {token} has {_shown(value)}.",
                param="logit_bias",
            )
        if not low <= value <= high:
            raise InvalidRequestError(
                f"'logit_bias' values must be between {low:g} and {high:g}; token {token} has "
                f"{_shown(value)}.",
                param="logit_bias",
            )
        out[token] = float(value)
    return tuple(out.items())


def _token_id(key: Any) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 18:
        return int(key)
    return None


def check_logit_bias(sampling: SamplingParams, vocab_size: int) -> None:
    """A 400 naming the first ``logit_bias`` token id past the loaded model's vocabulary."""
    for token, _ in sampling.logit_bias:
        if token >= vocab_size:
            raise InvalidRequestError(
                f"'logit_bias' names token {token}, which is not in the local model's vocabulary "
                f"(ids 0 to {vocab_size - 1}).",
                param="logit_bias",
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
    return checked_schema(
        schema,
        "response_format.json_schema.schema",
        param="response_format",
        strict=spec.get("strict") is True,
    )


def checked_schema(
    schema: Mapping[str, Any], where: str, param: str | None = None, strict: bool = False
) -> str:
    """The schema, ``closed`` (``strict``: every object), as canonical JSON, once known to be a
    JSON Schema of a size we accept."""
    param = param or where
    if _nests_deeper(schema, MAX_SCHEMA_DEPTH):
        raise InvalidRequestError(
            f"{where} nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep; flatten "
            "it (a $ref to a $defs entry is one level).",
            param=param,
        )
    schema = closed(schema, every_object=strict)
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(
            f"{where} is {len(text)} characters; the limit is {MAX_SCHEMA_CHARS}.", param=param
        )
    _check_schema(schema, where, param)
    return text


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether objects/arrays in ``value`` nest more than ``limit`` deep (no recursion: the input
    is what could be deep)."""
    level = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, Mapping) else item)
            if isinstance(child, Mapping | list)
        ]
        if not level:
            return False
    return True


def _check_schema(schema: Mapping[str, Any], where: str, param: str) -> None:
    from jsonschema import Draft202012Validator, SchemaError, validators

    try:
        validators.validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidRequestError(
            f"{where} is not a valid JSON Schema at {at}: {exc.message}", param=param
        ) from exc
    except RecursionError as exc:  # the depth limit should prevent it; a 400 if it does not
        raise InvalidRequestError(
            f"{where} is too deeply nested to check; flatten it.", param=param
        ) from exc


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise InvalidRequestError(
            "'messages' must be a non-empty list of {role, content} objects.", param="messages"
        )
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, message: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise InvalidRequestError(
            f"{where} must be an object with 'role' and 'content'.", param=where
        )
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(
            f"{where}.role {role!r} is not supported by the local model; use one of "
            "'system', 'developer', 'user', 'assistant', 'tool'.",
            param=f"{where}.role",
        )
    if message.get("function_call"):
        raise InvalidRequestError(
            f"{where} carries a legacy 'function_call'; send 'tool_calls' instead.", param=where
        )
    calls = message.get("tool_calls") if role == "assistant" else None
    content = message.get("content")
    if calls and content is None:  # an assistant turn that only calls tools
        content = ""
    out: dict[str, Any] = {"role": _ROLES[role], "content": _content(where, content)}
    if calls:
        out["tool_calls"] = _tool_calls(where, calls)
    if role == "tool" and isinstance(message.get("tool_call_id"), str):
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _tool_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    """An assistant turn's earlier calls, as the chat template reads them."""
    if not isinstance(calls, Sequence) or isinstance(calls, str | bytes):
        raise InvalidRequestError(f"{where}.tool_calls must be a list.", param=where)
    out = []
    for j, call in enumerate(calls):
        spec = call.get("function") if isinstance(call, Mapping) else None
        name = spec.get("name") if isinstance(spec, Mapping) else None
        arguments = spec.get("arguments", "{}") if isinstance(spec, Mapping) else None
        if isinstance(arguments, Mapping):
            arguments = json.dumps(arguments)
        if not isinstance(name, str) or not name or not isinstance(arguments, str):
            raise InvalidRequestError(
                f"{where}.tool_calls[{j}] must be "
                '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "..."}}.',
                param=f"{where}.tool_calls",
            )
        call_id = call.get("id")
        function = {"name": name, "arguments": arguments}
        out.append(
            {
                "id": call_id if isinstance(call_id, str) else "",
                "type": "function",
                "function": function,
            }
        )
    return out


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
    name = _label(params, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"'{name}' must be an integer, got {value!r}.", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequestError(
            f"'{name}' must be {_range(low, high)}, got {_shown(value)}.", param=name
        )
    return value


def _number(
    params: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = False
) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    name = _label(params, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"'{name}' must be a number, got {value!r}.", param=name)
    too_low = value <= low if low_open else value < low
    if too_low or value > high or math.isnan(value):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise InvalidRequestError(
            f"'{name}' must be {bound} and at most {high}, got {_shown(value)}.", param=name
        )
    return float(value)


def _label(params: Mapping[str, Any], name: str) -> str:
    """How errors name ``name``: where in the body it came from."""
    return params.names.get(name, name) if isinstance(params, _Extras) else name


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
    if (longest := max(map(len, stops), default=0)) > MAX_STOP_CHARS:
        raise InvalidRequestError(
            f"'stop' strings may be at most {MAX_STOP_CHARS} characters long; one has {longest}.",
            param="stop",
        )
    return tuple(dict.fromkeys(stops))
