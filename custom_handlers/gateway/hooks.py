"""Gateway callback (``litellm_settings.callbacks``): a request's mistakes get a 4xx that says
what is wrong, never a 500, and a request cannot change server-only settings.

LiteLLM re-wraps a provider's exception on its way out ("litellm.BadRequestError: ZlocalException
- ...", "LiteLLM: model group ... No fallback was attempted"), drops its ``param``, and turns a
``Retry-After`` header into ``llm_provider-retry-after``. Its failure hook lets a callback answer
instead: for errors raised by the local model we return the original message, status, type,
param and headers; for an endpoint the local model does not serve (embeddings, images...), a 400
that says so instead of LiteLLM's 500. Errors from cloud providers are left to LiteLLM, except for
three of the caller's mistakes that LiteLLM answered with a 500, each now a 400 naming it:

- A body that sets a provider's endpoint or credentials: LiteLLM refuses it with a ``ValueError``
  whose error path needs the ``prisma`` package. The auth stage's check is answered earlier, by
  ``body_reader``; this covers LiteLLM's other callers of the same check (its RAG, batch and
  prompt endpoints call ``is_request_body_safe`` themselves; not exercised by a test here).
- A body nested deeply enough to make LiteLLM's own copying or encoding of it recurse past
  Python's limit (``body_reader`` refuses more than 128 levels first; this is the fallback).
- A chat field of the wrong type that LiteLLM reads before the pre-call hook (``prompt_id``).

And a provider it cannot connect to (Ollama not running, a wrong ``api_base``), which LiteLLM
answered with a 500 that named no address, is a 502 naming the model and the address it tried.

The pre-call hook checks the JSON types of a chat request's fields
(``custom_handlers.gateway.body_checks``). The model name is checked before it, as the body is
read (``body_reader``): an unknown name is a 404 ``model_not_found``, a provider id a 400.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger
from litellm.llms.custom_llm import CustomLLMError
from litellm.types.utils import ModelResponseStream

from custom_handlers.gateway.body_checks import (
    CONFIG_FILE,
    LOCAL_PROVIDER,
    check_chat_types,
    rejected_request_error,
    served_by,
)
from custom_handlers.inference.errors import InvalidRequestError, LocalLLMError
from custom_handlers.inference.request import reject_unsupported, thinking

_E = TypeVar("_E", bound=BaseException)
_RECURSION = "maximum recursion depth exceeded"
_NOT_IMPLEMENTED = "Not implemented yet!"  # LiteLLM's CustomLLM default for what we do not serve
_NOT_A_PROVIDER = "is not a valid LlmProviders"


class ErrorResponse(HTTPException):
    """An HTTPException that carries OpenAI's ``type`` and ``param`` for the error body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code, message, headers)
        self.message = message  # what /v1/completions shows (it ignores the failure hook)
        self.type = type
        self.param = param

    @classmethod
    def from_local(cls, error: LocalLLMError) -> ErrorResponse:
        return cls(
            error.status_code,
            error.message,
            type=error.type,
            param=error.param,
            headers=getattr(error, "headers", None),
        )


def _speak_for(wrapper: BaseException, error: LocalLLMError) -> None:
    """Give LiteLLM's wrapper of a local error that error's message, type and param.

    ``/v1/completions`` ignores what this hook returns and answers from the exception it caught
    (its ``message``, ``type``, ``param``): without this the caller read "litellm.BadRequestError:
    OpenAIException - ... LiteLLM: model group 'qwen3-4b' failed..." with ``type`` and ``param``
    null, where chat said what was wrong and which field.
    """
    for name, value in (("message", error.message), ("type", error.type), ("param", error.param)):
        try:
            setattr(wrapper, name, value)
        except (AttributeError, TypeError):  # an exception type that forbids it: leave it be
            return


def find_cause(exc: BaseException | None, kind: type[_E]) -> _E | None:
    """The ``kind`` exception behind ``exc``, following LiteLLM's re-wrapping."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "original_exception", None) or exc.__cause__ or exc.__context__
    return None


def find_local_error(exc: BaseException | None) -> LocalLLMError | None:
    """The ``LocalLLMError`` behind ``exc``, following LiteLLM's re-wrapping."""
    return find_cause(exc, LocalLLMError)


def refused_body_response(exc: BaseException) -> ErrorResponse | None:
    """A 400 for LiteLLM's refusal of a body that sets an endpoint or credentials, or None."""
    error = rejected_request_error(exc)
    return None if error is None else ErrorResponse.from_local(error)


def too_deep_response(exc: BaseException) -> ErrorResponse | None:
    """A 400 for a body nested so deeply that LiteLLM's copying or encoding of it recursed past
    Python's limit (a 500 otherwise), or None."""
    if find_cause(exc, RecursionError) is None and _RECURSION not in str(exc):
        return None
    return ErrorResponse(
        400,
        "The request nests objects or arrays too deeply for the gateway to process; flatten it.",
        type="invalid_request_error",
    )


def unsupported_endpoint_response(exc: BaseException) -> ErrorResponse | None:
    """A 400 for an endpoint the local model does not serve (LiteLLM: a 500 "Not implemented yet!"
    for embeddings and images, "'zlocal' is not a valid LlmProviders" with a traceback for audio
    and rerank), or None."""
    custom = find_cause(exc, CustomLLMError)
    not_implemented = custom is not None and _NOT_IMPLEMENTED in str(custom.message)
    if not not_implemented and _NOT_A_PROVIDER not in str(exc):
        return None
    return ErrorResponse(
        400,
        "The local model answers chat requests only: /v1/chat/completions, and through LiteLLM "
        "/v1/completions, /v1/responses and /v1/messages. Use a cloud model for this endpoint.",
        type="invalid_request_error",
        param="model",
    )


def _is_chat(call_type: str | None) -> bool:
    return call_type in ("acompletion", "completion")


def ill_typed_chat_response(request_data: dict) -> ErrorResponse | None:
    """A 400 for a chat body LiteLLM crashed on before our pre-call check ran (``prompt_id`` a
    number crashes its prompt registry), or None."""
    route = str((request_data.get("proxy_server_request") or {}).get("url") or "")
    if not route.endswith("/chat/completions"):
        return None
    try:
        check_chat_types(request_data)
    except InvalidRequestError as error:
        return ErrorResponse.from_local(error)
    return None


def unreachable_provider_response(exc: BaseException, request_data: dict) -> ErrorResponse | None:
    """A 502 naming the model and the address LiteLLM could not connect to, or None.

    LiteLLM answered a provider it cannot reach (Ollama not running, a wrong ``api_base``) with a
    500 "APIConnectionError ... Cannot connect to host REDACTED:11434", or for OpenAI-style
    providers "Connection error.", with no address at all.
    """
    failure = _connection_failure(exc)
    if failure is None:
        return None
    model = request_data.get("model") or "?"
    where, reason = failure
    start = "Start Ollama (`ollama serve`)" if served_by(model, "ollama") else "Start that server"
    return ErrorResponse(
        502,
        f"The provider behind model '{model}' cannot be reached at {where} ({reason}). {start}, "
        f"or fix its address: the model's api_base in {CONFIG_FILE}, or the provider's variable "
        "where the gateway runs (OLLAMA_API_BASE, OPENAI_BASE_URL...).",
        type="api_connection_error",
        param="model",
    )


def _connection_failure(exc: BaseException) -> tuple[str, str] | None:
    """(address, reason) of the connection that failed behind ``exc``, or None."""
    import httpx
    from aiohttp import ClientConnectorError

    refused = find_cause(exc, httpx.ConnectError)
    connector = find_cause(exc, ClientConnectorError)
    if refused is None and connector is None:
        return None
    os_error = connector.os_error if connector is not None else find_cause(exc, OSError)
    reason = getattr(os_error, "strerror", None) or "the connection failed"
    if refused is not None:
        return _url_of(refused), reason
    return f"{connector.host}:{connector.port}", reason


def _url_of(error: Any) -> str:
    try:
        url = error.request.url
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is set
        return "its address"
    return f"{url.scheme}://{url.host}:{url.port}" if url.port else f"{url.scheme}://{url.host}"


def _pass_reasoning_effort(data: dict) -> None:
    """Hand ``reasoning_effort`` to the local model as Qwen3's ``enable_thinking``: LiteLLM would
    refuse it for a custom provider (and advise changing the server's drop_params)."""
    if data.get("reasoning_effort") is not None:
        data["enable_thinking"] = thinking(data)
        del data["reasoning_effort"]


def openai_usage_chunk(chunk: Any) -> Any:
    """A chat stream's usage chunk as OpenAI sends it, with ``choices: []``.

    LiteLLM sends the usage (``stream_options.include_usage``) on a chunk of its own whose
    ``choices`` hold one empty choice (``[{"index": 0, "delta": {}}]``); OpenAI's has none, and a
    client that reads ``choices[0]`` of every chunk would take the empty one for a turn.
    """
    if (
        isinstance(chunk, ModelResponseStream)
        and getattr(chunk, "usage", None) is not None
        and chunk.choices
        and all(_is_empty(choice) for choice in chunk.choices)
    ):
        chunk.choices = []
    return chunk


def _is_empty(choice: Any) -> bool:
    if choice.finish_reason is not None or getattr(choice, "logprobs", None) is not None:
        return False
    delta = getattr(choice, "delta", None)
    return delta is None or all(v is None for v in delta.model_dump().values())


class LocalErrorHook(CustomLogger):
    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        try:
            if _is_chat(call_type):
                check_chat_types(data)
            if served_by(data.get("model"), LOCAL_PROVIDER):
                reject_unsupported(data)
                _pass_reasoning_effort(data)
        except InvalidRequestError as error:
            raise ErrorResponse.from_local(error) from None
        return data

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict, response, request_data
    ):
        async for chunk in response:
            yield openai_usage_chunk(chunk)

    async def async_post_call_failure_hook(
        self, request_data, original_exception, user_api_key_dict, traceback_str=None
    ):
        if (error := find_local_error(original_exception)) is not None:
            _speak_for(original_exception, error)
            return ErrorResponse.from_local(error)
        return (
            unsupported_endpoint_response(original_exception)
            or refused_body_response(original_exception)
            or too_deep_response(original_exception)
            or ill_typed_chat_response(request_data)
            or unreachable_provider_response(original_exception, request_data)
        )


local_error_hook = LocalErrorHook()
