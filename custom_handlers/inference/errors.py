"""Errors the local provider raises, each carrying the HTTP status the caller should see.

    Exception
     └── LocalLLMError                      500  something broke inside the gateway
          ├── InvalidRequestError           400  the caller's request is wrong
          │    ├── ContextLengthExceededError 400  prompt + max_tokens > the model's context
          │    └── NotFoundError             404  no local model of that name
          ├── ModelUnavailableError         503  the local model cannot be loaded or run right now
          └── OverloadedError               503  too many requests queued (with Retry-After)

Messages say what is wrong and how to fix it; they never carry a stack trace.

They have the shape of LiteLLM's ``CustomLLMError`` (``status_code`` and ``message``), which is all
LiteLLM reads of an exception a custom provider raises (it checks no class), without importing
LiteLLM: the inference stack (engine, loader, sampling, constraints) imports no web framework, so
it can be driven in-process where only torch and transformers are installed (``bench/gpu.py``).
"""

from __future__ import annotations

import traceback


class LocalLLMError(Exception):
    status_code = 500
    type = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(LocalLLMError):
    status_code = 400
    type = "invalid_request_error"


class NotFoundError(InvalidRequestError):
    status_code = 404


class ContextLengthExceededError(InvalidRequestError):
    def __init__(self, message: str, param: str = "messages"):
        super().__init__(
            f"context_length_exceeded: {message}", param=param, code="context_length_exceeded"
        )


class ModelUnavailableError(LocalLLMError):
    status_code = 503
    type = "service_unavailable"
    out_of_memory = False  # a load failed for lack of device memory (worth one more try)


class OverloadedError(LocalLLMError):
    status_code = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message, code="overloaded")
        self.retry_after = retry_after
        self.headers = {"retry-after": str(retry_after)}


def drop_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames in ``exc``'s traceback, and in those of
    the errors it chains; messages and the traceback's lines stay. A kept error (a failed load's,
    answered to the next requests) or one still in hand (a failed step's, while the batch's memory
    is given back) would otherwise keep what those frames held alive: a partly built model, the
    step's tensors, on a GPU gigabytes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # a frame still running is left as it is
        exc = exc.__cause__ or exc.__context__
