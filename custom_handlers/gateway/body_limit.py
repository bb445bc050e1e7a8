"""ASGI middleware: refuse a request body too large to be a request (413) before anyone parses it.

LiteLLM reads and parses the whole body on the event loop before any hook of ours sees the
request, and its own size limit (``max_request_size_mb``) is an enterprise feature. Two bounds are
kept here, before that parse:

- its size, ``GATEWAY_MAX_REQUEST_MB``: a body that declares a larger size is refused from the
  header alone; a chunked one is read up to the limit, then refused;
- how many JSON values it can hold, ``GATEWAY_MAX_JSON_ITEMS``: its commas, colons and opening
  brackets, counted in the raw bytes (strings included, so it is an upper bound). Parsing costs
  per value, not per byte: 2.3 million metadata keys in 27 MiB took 1.6 s to parse on this
  machine's CPU, and 900,000 messages in 26 MiB held every route (the keyless liveliness check
  included) for 3.9 s while LiteLLM handled them. Counting takes milliseconds.

A body within both bounds is handed on as it was read.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_STRUCTURE = (b",", b":", b"{", b"[")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, max_items: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes  # 0: no limit
        self.max_items = max_items  # 0: no limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if self.max_bytes and length is not None and length > self.max_bytes:
            await self._too_large(send, f"this one declares {length} bytes")
            return
        if length is not None and (not self.max_items or length <= self.max_items):
            await self.app(scope, receive, send)  # too small to hold too many values
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if self.max_bytes and len(body) > self.max_bytes:
                await self._too_large(send, f"this one went past {len(body)} bytes")
                return
            if not message.get("more_body", False):
                break
        if self.max_items and _is_json(scope) and (items := json_items(body)) > self.max_items:
            await self._refuse(
                send,
                f"Request body too large: it holds up to {items:,} JSON values (commas, colons "
                f"and brackets); this gateway accepts at most {self.max_items:,} "
                "(GATEWAY_MAX_JSON_ITEMS).",
            )
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, send: Send, what: str) -> None:
        limit_mb = self.max_bytes / (1024 * 1024)
        await self._refuse(
            send,
            f"Request body too large: this gateway accepts at most {limit_mb:g} MiB "
            f"(GATEWAY_MAX_REQUEST_MB); {what}.",
        )

    async def _refuse(self, send: Send, message: str) -> None:
        payload = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})


def json_items(body: bytes | bytearray) -> int:
    """An upper bound on the JSON values in ``body``: its commas, colons and opening brackets."""
    return sum(body.count(mark) for mark in _STRUCTURE)


def _is_json(scope: Scope) -> bool:
    """A JSON body, or one sent without a content type (LiteLLM parses both as JSON)."""
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return b"json" in value.lower() or b"x-www-form-urlencoded" in value.lower()
    return True


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives the body read already, then the client's later messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, for whoever watches for it

    return replayed
