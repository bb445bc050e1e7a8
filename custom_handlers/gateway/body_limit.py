"""ASGI middleware: refuse a request body over the limit (413) before anyone parses it.

LiteLLM reads and parses the whole body before any hook of ours sees the request, and its own size
limit (``max_request_size_mb``) is an enterprise feature: without this, a 1 GB body would be held
in memory, then parsed. A body that declares its size is refused from the header alone; a chunked
one is read here up to the limit, then handed on (so the limit also bounds what it costs).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None:
            if length > self.max_bytes:
                await self._refuse(send, f"this one declares {length} bytes")
                return
            await self.app(scope, receive, send)  # the server holds the body to its declared size
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send, f"this one went past {len(body)} bytes")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, send: Send, what: str) -> None:
        limit_mb = self.max_bytes / (1024 * 1024)
        payload = {
            "error": {
                "message": (
                    f"Request body too large: this gateway accepts at most {limit_mb:g} MiB "
                    f"(GATEWAY_MAX_REQUEST_MB); {what}."
                ),
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
