"""The gateway answers the routes it serves and no other: a closed surface, and CORS kept shut.

LiteLLM's proxy mounts about 720 paths: its admin UI, login and SSO, key, user and team management
(which need its database), pass-through routes to a dozen providers, ``/public/*``, the API
description. Out of the box many answer without a key, some with a traceback in the log, and five
failed logins lock the login route for everyone at that address. This gateway serves models, so
``ClosedSurface`` (an ASGI middleware outside every other) lets through only the routes of
``OPEN_ROUTES``: the OpenAI routes that take a model, the stored Responses answers, Anthropic's
``/v1/messages``, the health routes and ``/local/*``. Any other path is a 404 in OpenAI's error
shape, with or without a key, before LiteLLM sees it (so it writes nothing to the log but the
access line); a served path asked with another method is a 405. An operator who wants LiteLLM's
admin surface, with its database, sets ``general_settings.gateway_admin_routes: true`` in
``proxy_config.yaml`` (docs/security.md).

CORS: LiteLLM allows every origin (``Access-Control-Allow-Origin: *``, with the ``authorization``
header) unless ``LITELLM_CORS_ORIGINS`` is set. Here no origin is allowed unless that variable lists
it: the middleware answers CORS itself with those origins, and hides the ``Origin`` header from
LiteLLM's own CORS layer, so a web page on another site cannot call the gateway from a browser.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

ADMIN_SETTING = "gateway_admin_routes"  # general_settings key that opens LiteLLM's whole surface
CORS_VAR = "LITELLM_CORS_ORIGINS"  # LiteLLM's own variable: comma-separated origins

_MODEL = r"[^/]+"
_ID = r"[^/]+"
# Where LiteLLM serves the same OpenAI route: /v1/x, /x, Azure's and the legacy engines' paths.
_OPENAI_PREFIXES = (r"/v1", "", rf"/openai/deployments/{_MODEL}", rf"/engines/{_MODEL}")


@dataclass(frozen=True)
class OpenRoute:
    """Paths (a regular expression) answered for ``methods``; ``key``: whether the key is needed."""

    what: str
    methods: frozenset[str]
    pattern: re.Pattern[str]
    key: bool = True

    def matches(self, path: str) -> bool:
        return self.pattern.fullmatch(path) is not None


def _route(what: str, methods: str, *paths: str, key: bool = True) -> OpenRoute:
    return OpenRoute(what, frozenset(methods.split()), re.compile("|".join(paths)), key)


def _openai(suffix: str, prefixes: Iterable[str] = _OPENAI_PREFIXES) -> list[str]:
    return [f"{prefix}{suffix}" for prefix in prefixes]


OPEN_ROUTES: tuple[OpenRoute, ...] = (
    _route("chat completions", "POST", *_openai("/chat/completions")),
    _route("completions", "POST", *_openai("/completions")),
    _route("responses", "POST", *_openai("/responses", (r"/v1", ""))),
    _route("stored responses", "GET DELETE", *_openai(f"/responses/{_ID}", (r"/v1", ""))),
    _route("stored responses", "GET", *_openai(f"/responses/{_ID}/input_items", (r"/v1", ""))),
    _route("embeddings", "POST", *_openai("/embeddings")),
    _route("images", "POST", *_openai("/images/generations", _OPENAI_PREFIXES[:3])),
    _route("speech", "POST", *_openai("/audio/speech", (r"/v1", ""))),
    _route("transcriptions", "POST", *_openai("/audio/transcriptions", (r"/v1", ""))),
    _route("rerank", "POST", "/v1/rerank", "/rerank", "/v2/rerank"),
    _route("models", "GET", "/v1/models", "/models", rf"/v1/models/{_MODEL}", rf"/models/{_MODEL}"),
    _route("Anthropic messages", "POST", "/v1/messages", "/v1/messages/count_tokens"),
    _route("liveliness", "GET", "/health/liveliness", "/health/readiness", key=False),
    _route("health", "GET", "/health"),
    _route("local models", "GET", "/local/state"),
    _route("local models", "POST", "/local/release"),
)


def open_route(path: str) -> OpenRoute | None:
    """The open route serving ``path`` (any method), or None."""
    return next((route for route in OPEN_ROUTES if route.matches(path)), None)


def allowed_methods(path: str) -> frozenset[str]:
    """The methods ``path`` is served for (none: the path is not served)."""
    return frozenset().union(*(r.methods for r in OPEN_ROUTES if r.matches(path)))


def cors_origins() -> list[str]:
    """The origins a browser may call the gateway from: ``LITELLM_CORS_ORIGINS``, else none."""
    raw = os.environ.get(CORS_VAR, "")
    return [origin.strip() for origin in raw.split(",") if origin.strip()]


class ClosedSurface:
    """Answer 404 for paths outside ``OPEN_ROUTES`` and 405 for their other methods; CORS."""

    def __init__(self, app: ASGIApp, *, admin_routes: bool = False) -> None:
        self.app = app
        self.admin_routes = admin_routes
        origins = cors_origins()
        inner = _WithoutOrigin(self._check_route)
        self._handle = (
            CORSMiddleware(
                inner,
                allow_origins=origins,
                allow_methods=["*"],
                allow_headers=["*"],
                allow_credentials="*" not in origins,
            )
            if origins
            else inner
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._handle(scope, receive, send)

    async def _check_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.admin_routes:
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        methods = allowed_methods(path)
        if method in methods or (method == "HEAD" and "GET" in methods):
            await self.app(scope, receive, send)
        elif methods:
            allow = ", ".join(sorted(methods))
            message = f"{method} is not allowed on {path}: it answers {allow}."
            await send_error(send, 405, message, code="method_not_allowed", allow=allow)
        else:
            await send_error(send, 404, not_served_message(method, path), code="unknown_url")


def not_served_message(method: str, path: str) -> str:
    return (
        f"Invalid URL ({method} {path}): this gateway does not serve it. It serves the OpenAI "
        "API under /v1 (chat/completions, completions, responses, embeddings, models, ...), "
        "Anthropic's /v1/messages, /health and /local/*; see docs/security.md."
    )


class _WithoutOrigin:
    """Hide the ``Origin`` header from the app within, so LiteLLM's CORS layer adds nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers", [])
        if any(name == b"origin" for name, _ in headers):
            scope = {**scope, "headers": [(n, v) for n, v in headers if n != b"origin"]}
        await self.app(scope, receive, send)


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


async def send_error(
    send: Send,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    allow: str | None = None,
) -> None:
    """Send OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    if allow is not None:
        headers.append((b"allow", allow.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
