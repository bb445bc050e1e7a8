"""Gateway callback (``litellm_settings.callbacks``): our errors reach the caller as we wrote them.

LiteLLM re-wraps a provider's exception on its way out ("litellm.BadRequestError: ZlocalException
- ...", "LiteLLM: model group ... No fallback was attempted"), drops its ``param``, and turns a
``Retry-After`` header into ``llm_provider-retry-after``. Its failure hook lets a callback answer
instead: for errors raised by the local model we return the original message, status, type,
param and headers. Errors from cloud providers are left to LiteLLM.
"""

from __future__ import annotations

from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

from custom_handlers.errors import LocalLLMError


class LocalErrorResponse(HTTPException):
    """An HTTPException that carries OpenAI's ``type`` and ``param`` for the error body."""

    def __init__(self, error: LocalLLMError):
        super().__init__(error.status_code, error.message, getattr(error, "headers", None))
        self.type = error.type
        self.param = error.param


def find_local_error(exc: BaseException | None) -> LocalLLMError | None:
    """The ``LocalLLMError`` behind ``exc``, following LiteLLM's re-wrapping."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LocalLLMError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "original_exception", None) or exc.__cause__ or exc.__context__
    return None


class LocalErrorHook(CustomLogger):
    async def async_post_call_failure_hook(
        self, request_data, original_exception, user_api_key_dict, traceback_str=None
    ):
        error = find_local_error(original_exception)
        return LocalErrorResponse(error) if error is not None else None


local_error_hook = LocalErrorHook()
