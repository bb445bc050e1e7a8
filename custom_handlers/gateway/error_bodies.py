"""Every error the gateway sends has one shape and carries no internals (an ASGI middleware).

LiteLLM answers errors in several shapes: OpenAI's ``{"error": {...}}`` from its LLM routes,
FastAPI's ``{"detail": ...}`` for its 404, 405 and 422, plain text for an exception nothing caught,
Anthropic's on ``/v1/messages``. Some of them carried a Python traceback with the virtual
environment's and the interpreter's paths (``/v1/audio/speech`` and ``/v1/rerank`` on a local
model), an object's address (``<ssl.SSLContext object at 0x7f...>``) or the first and last
characters of a provider key (``"sk****YZ"``).

``ErrorBodies`` sits outside every other middleware and rewrites each error response (status 400
and up) before it leaves, and each error event of a stream:

- the body becomes ``{"error": {"message", "type", "param", "code"}}`` (on ``/v1/messages``,
  Anthropic's ``{"type": "error", "error": {"type", "message"}}``), keeping the message, ``param``
  and ``code`` given; FastAPI's 422 (a body that does not fit the route's model) is a 400;
- the message is cut at a traceback (``Traceback (most recent call last)``, LiteLLM's
  ``stack trace:``), and file paths, object addresses and anything shaped like a key, masked or
  not, are replaced (``clean``);
- an exception that escapes the app before it answered is a 500 with that shape instead of
  Starlette's plain text (the traceback stays in the log, where it belongs).

The specific fixes (a 400 naming the field, a 404 for a model that does not exist) are made where
the mistake is understood; this is the boundary that holds whatever was missed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custom_handlers.gateway.surface import error_type

log = logging.getLogger("custom_handlers.error_bodies")

MAX_MESSAGE = 2000  # characters of an error message sent; the log has the rest
_MAX_BODY = 1 << 20  # an error body larger than this is replaced whole
ANTHROPIC_PATHS = ("/v1/messages",)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}

_TRACEBACK = re.compile(r"(Traceback \(most recent call last\)|stack trace:|\n\s+File \").*", re.S)
# Absolute file paths (Unix, macOS, Windows), told apart from the gateway's own routes by their
# first folder: messages name routes (/v1/chat/completions, /local/state) on purpose.
_ABSOLUTE_PATH = re.compile(
    r"(?<![\w:/.~])(?:~|/[\w.@+-]+)(?:/[\w.@+-]*)+|(?<![\w:/.])/[\w.@+-]+\.pyx?\b"
    r"|\b[A-Za-z]:\\[^\s'\"<>]+"
)
_ROUTE_ROOTS = frozenset(
    "v1 v2 openai engines local health chat completions responses embeddings models images "
    "audio rerank messages api".split()
)


def _path_or_route(match: re.Match[str]) -> str:
    text = match.group(0)
    first = text.lstrip("/").split("/", 1)[0]
    return text if text.startswith("/") and first in _ROUTE_ROOTS else "[path]"


_ADDRESS = re.compile(r"\s+(?:object )?at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{8,}")
# Keys in the clear (OpenAI's sk-..., Anthropic's sk-ant-..., Google's AIza..., GitHub's, HF's)
# and LiteLLM's masked form of them ("sk****YZ").
_KEY = re.compile(
    r"\b(?:sk|pk|rk)-[\w-]{6,}|\bAIza[\w-]{20,}|\bgh[pousr]_\w{20,}|\bhf_\w{20,}"
    r"|[\w-]{0,8}\*{3,}[\w-]{0,8}"
)
_SECRET_VARS = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$")


def _secrets() -> list[str]:
    """Values of the environment's secrets (keys, tokens), longest first."""
    values = {
        value for name, value in os.environ.items() if _SECRET_VARS.search(name) and len(value) >= 8
    }
    return sorted(values, key=len, reverse=True)


def clean(message: Any) -> str:
    """``message`` without tracebacks, file paths, object addresses or keys, at most
    ``MAX_MESSAGE`` characters."""
    text = message if isinstance(message, str) else json.dumps(message, default=str)
    text = _TRACEBACK.sub("", text)
    for secret in _secrets():
        text = text.replace(secret, "[key]")
    text = _KEY.sub("[key]", text)
    text = _ADDRESS.sub("", text)
    text = _ABSOLUTE_PATH.sub(_path_or_route, text).strip()
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3].rstrip() + "..."
    return text or "The gateway could not answer this request."


# What LiteLLM says, in a 500, when a model's provider has no such endpoint (rerank for OpenAI,
# speech for a custom provider...): the caller asked the wrong model, a 400.
_NOT_SERVED = re.compile(r"Unsupported provider: |is not a valid LlmProviders|Not implemented yet!")
_MODEL_GROUP = re.compile(r"model group '([^']{1,200})'")
_MODEL_PATH = re.compile(r"(?:/v1)?/models/[^/]+")


def error_body(status: int, raw: bytes, path: str) -> tuple[int, bytes]:
    """The status and body to send for an error response ``raw`` of ``status`` on ``path``."""
    message, param, code, kind = _parts(raw, status)
    if status == 422:  # FastAPI: the body does not fit the route's model (the caller's mistake)
        status = 400
    if status == 500 and _NOT_SERVED.search(str(message)):
        group = _MODEL_GROUP.search(str(message))
        model = f"model '{group.group(1)}'" if group else "this model"
        status, param, code, kind = 400, "model", "unsupported_endpoint", None
        message = f"{model} does not serve {path}: its provider has no such endpoint."
    if status == 404 and code is None and _MODEL_PATH.fullmatch(path):
        code, param = "model_not_found", "model"  # GET /v1/models/{name}: OpenAI's code
    message = clean(message)
    if path.startswith(ANTHROPIC_PATHS):
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else kind)
        body: dict = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {
            "error": {
                "message": message,
                "type": kind if isinstance(kind, str) and kind else error_type(status),
                "param": clean(param) if param is not None else None,
                "code": clean(code) if code is not None else None,
            }
        }
    return status, json.dumps(body).encode()


def _parts(raw: bytes, status: int) -> tuple[Any, Any, Any, Any]:
    """(message, param, code, type) of an error body in any of the shapes LiteLLM sends."""
    try:
        data = json.loads(raw) if len(raw) <= _MAX_BODY else None
    except ValueError:
        data = None
    if data is None:
        text = raw[:_MAX_BODY].decode("utf-8", "replace").strip()
        return text or _default_message(status), None, None, None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        return error.get("message"), error.get("param"), error.get("code"), error.get("type")
    if isinstance(data, dict) and "detail" in data:
        return _detail_message(data["detail"], status), None, None, None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"], None, None, None
    return _default_message(status), None, None, None


def _detail_message(detail: Any, status: int) -> str:
    """FastAPI's ``detail``: a string, an object, or (422) a list of field errors."""
    if isinstance(detail, list):
        problems = []
        for item in detail[:5]:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                problems.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
        return "Invalid request: " + "; ".join(problems) if problems else _default_message(status)
    if isinstance(detail, dict):
        inner = detail.get("error")
        if isinstance(inner, dict):
            return str(inner.get("message") or _default_message(status))
        return str(inner or detail.get("message") or _default_message(status))
    if status == 404 and detail == "Not Found":
        return "Not found."
    return str(detail)


def _default_message(status: int) -> str:
    if status >= 500:
        return "The gateway failed on this request; its log says why."
    return f"The request was refused ({status})."


class ErrorBodies:
    """Rewrite error responses (and a stream's error events) as described in the module doc."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _Response(scope["path"], send)
        try:
            await self.app(scope, receive, response.send)
        except Exception:
            if response.started:
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            await response.send_error(500, b"")


class _Response:
    """``send`` for one request: error responses are held, rewritten, then sent."""

    def __init__(self, path: str, send: Send) -> None:
        self.path = path
        self._send = send
        self._start: Message | None = None  # an error response's start, held
        self._body = bytearray()
        self._events = False  # a stream: its error events are cleaned
        self.started = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if message["status"] >= 400:
                self._start = message
                return
            self.started = True
            self._events = b"text/event-stream" in _header(message, b"content-type")
            await self._send(message)
        elif kind == "http.response.body" and self._start is not None:
            if len(self._body) <= _MAX_BODY:
                self._body += message.get("body", b"")
            if not message.get("more_body", False):
                start, self._start = self._start, None
                await self.send_error(start["status"], bytes(self._body), start)
        elif kind == "http.response.body" and self._events:
            await self._send({**message, "body": clean_events(message.get("body", b""))})
        else:
            await self._send(message)

    async def send_error(self, status: int, raw: bytes, start: Message | None = None) -> None:
        status, body = error_body(status, raw, self.path)
        kept = [
            (name, value)
            for name, value in (start or {}).get("headers", [])
            if name not in (b"content-length", b"content-type", b"content-encoding")
        ]
        headers = [
            *kept,
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ]
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


def _header(message: Message, name: bytes) -> bytes:
    return next((v for n, v in message.get("headers", []) if n.lower() == name), b"")


_ERROR_EVENT = re.compile(rb'^data: (\{"error".*)$', re.M)


def clean_events(chunk: bytes) -> bytes:
    """A stream's chunk with the message of each ``data: {"error": ...}`` event cleaned."""
    if b'"error"' not in chunk:
        return chunk

    def cleaned(match: re.Match[bytes]) -> bytes:
        try:
            event = json.loads(match.group(1))
        except ValueError:
            return match.group(0)
        error = event.get("error") if isinstance(event, dict) else None
        if isinstance(error, dict) and "message" in error:
            error["message"] = clean(error["message"])
        return b"data: " + json.dumps(event).encode()

    return _ERROR_EVENT.sub(cleaned, chunk)
