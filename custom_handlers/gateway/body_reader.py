"""Request bodies are checked as LiteLLM's auth stage reads them, before anything acts on them.

LiteLLM parses the body before it calls our key check (``custom_handlers.gateway.auth``), then reads
``body.get(...)``, checks it for provider endpoints and credentials, and copies it. Left alone,
these bodies went wrong there, before any callback of ours could answer:

- JSON that is not an object (an array, a string, a number, null): ``.get`` fails, and the error
  path needs the ``prisma`` package: a bare 500 "Internal Server Error";
- JSON nested past the parser's limit (about 1000 levels): the parse fails with a RecursionError
  that LiteLLM swallows, reading the body as ``{}``: the caller was told "'messages' must be a
  non-empty array" about a body that had them;
- a body that sets a provider's endpoint or credentials (``api_base``, ``api_key``...): LiteLLM
  refuses it with a ValueError, answered as a 500, or through a failure hook as an "auth_error";
- NaN, Infinity and deep nesting (``body_checks.check_json_values``): 500s further on;
- JSON sent as a form (``curl -d`` without ``-H 'Content-Type: application/json'``): LiteLLM read
  it as one form field named after the whole text, and the caller was told "'messages' must be a
  non-empty array", which sent them looking in the wrong place.

``install`` wraps the body reader that LiteLLM's auth module calls. The first two are refused
like malformed JSON (a 400 whatever the key, as LiteLLM answers malformed bodies). Then a caller
without the gateway's key gets the key check's 401 at once; the others get a 400 naming the field.

LiteLLM raises what the reader raised once its own checks are done, so these answers are the ones
sent, and it goes on with an empty body meanwhile. That matters for the 401: given the body, its
failure logging walked every message on the event loop (0.7 s for 100,000 messages), so anyone
could hold up every request, cloud ones included, without a key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from litellm.proxy._types import ProxyException

from custom_handlers.gateway.body_checks import (
    LOCAL_PROVIDER,
    MODEL_ROUTES,
    check_answer_size,
    check_endpoint_and_credentials,
    check_gateway_only,
    check_json_values,
    check_litellm_keys,
    check_model_name,
    check_route_body,
    deployment_modes,
    route_kind,
    router,
    served_by,
)
from custom_handlers.inference.errors import InvalidRequestError

NOT_AN_OBJECT = 'The request body must be a JSON object, as in {"model": ..., "messages": [...]}.'
UNREADABLE = (
    "The request body could not be read as JSON: it nests objects or arrays too deeply (about "
    "1000 levels) or is not valid JSON."
)
SENT_AS_FORM = (
    "The request body is JSON but was sent as a form (Content-Type: "
    "application/x-www-form-urlencoded, which is what curl -d sends by default). Send it with the "
    "header 'Content-Type: application/json' (curl: -H 'Content-Type: application/json')."
)
_EMPTY_OBJECT = re.compile(rb"\{\s*\}")

# The caller's 401, or None when the request carries the gateway's key.
KeyCheck = Callable[[Any], ProxyException | None]


def install(unauthorized: KeyCheck) -> None:
    """Wrap LiteLLM's auth-stage body reader once (a second call changes nothing)."""
    from litellm.proxy.auth import user_api_key_auth as litellm_auth

    read = getattr(litellm_auth, "read_request_body", None)
    if read is None or getattr(read, "checks_json_objects", False):
        return

    async def read_json_object(request: Any, *args: Any, **kwargs: Any) -> dict:
        body = await read(request, *args, **kwargs)
        if not isinstance(body, dict):
            raise _bad_body(NOT_AN_OBJECT)
        if not body and await _was_json_read_as_empty(request):
            raise _bad_body(UNREADABLE)
        if (denied := unauthorized(request)) is not None:
            raise denied
        if _json_sent_as_form(request, body):
            raise _bad_body(SENT_AS_FORM)
        if (refusal := _refusal(request, body)) is not None:
            raise refusal
        return body

    read_json_object.checks_json_objects = True
    litellm_auth.read_request_body = read_json_object


class RefusedBody(ProxyException):
    """LiteLLM's ``ProxyException`` whose body keeps OpenAI's ``code`` (``model_not_found``,
    ``unsupported_endpoint``): LiteLLM's own always shows the status there (``"404"``)."""

    def to_dict(self) -> dict:
        body = super().to_dict()
        if isinstance(self.openai_code, str):
            body["code"] = self.openai_code
        return body


def _refusal(request: Any, body: dict) -> ProxyException | None:
    """A 400 for a body the gateway will not act on, or None."""
    try:
        check_json_values(body)
        check_gateway_only(body)
        check_endpoint_and_credentials(body, route=request.url.path)
        check_litellm_keys(body)
        check_answer_size(body, completions=route_kind(request.url.path) == "completions")
        model = body.get("model")
        if route_kind(request.url.path) in MODEL_ROUTES:
            check_model_name(model, router())
        local = served_by(model, LOCAL_PROVIDER)
        check_route_body(
            request.url.path, body, local=local, modes=None if local else deployment_modes(model)
        )
    except InvalidRequestError as error:
        return RefusedBody(
            message=error.message,
            type=error.type,
            param=error.param,
            code=error.status_code,
            openai_code=error.code,
        )
    return None


async def _was_json_read_as_empty(request: Any) -> bool:
    """Whether a JSON body that is not ``{}`` came back as ``{}`` (a parse LiteLLM swallowed)."""
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type:
        return False  # forms and binary uploads are LiteLLM's to read
    raw = (await request.body()).strip()
    return raw[:1] in (b"{", b"[") and not _EMPTY_OBJECT.fullmatch(raw)


def _json_sent_as_form(request: Any, body: dict) -> bool:
    """Whether a form-encoded body is really JSON: LiteLLM read it as a field named ``{"model"...``.

    (The form parser has consumed the request's stream by now, so the parsed fields are checked.)
    """
    content_type = request.headers.get("content-type", "").lower()
    if "application/x-www-form-urlencoded" not in content_type:
        return False
    return any(str(name).lstrip().startswith(("{", "[")) for name in body)


def _bad_body(message: str) -> ProxyException:
    return ProxyException(
        message=message, type="invalid_request_error", param="request_body", code=400
    )
