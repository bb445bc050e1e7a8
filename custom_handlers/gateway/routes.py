"""What the gateway gains when LiteLLM loads our handler: the local models' routes and a body limit.

- ``GET /local/state``: every local model by its ``model_name``: loaded or not, device, dtype,
  quantization, memory, requests running and queued, seconds idle, when it unloads. Reading it
  never loads a model (nor imports torch).
- ``POST /local/release``: unload every local model (or the one named by ``{"model": ...}``) once
  the requests already sent are done, and return once its memory is given back (Z-Explorer calls
  it before it loads the image model). Requests sent after it load the model again.
- Request bodies over ``GATEWAY_MAX_REQUEST_MB`` get 413 before they are read (``body_limit``).

LiteLLM has no setting for extra routes, so ``mount`` adds them to its FastAPI app when the proxy
imports our handler (during its start-up, from ``custom_provider_map``). Both routes need the
gateway key, checked as on every other route.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from custom_handlers.gateway.auth import unauthorized
from custom_handlers.gateway.body_limit import BodySizeLimit
from custom_handlers.gateway.journal import JOURNAL_VAR, Journal, RequestJournal
from custom_handlers.gateway.supervisor import restarts_reported
from custom_handlers.inference.errors import InvalidRequestError, LocalLLMError
from custom_handlers.inference.settings import (
    GatewaySettings,
    gateway_workers,
    several_workers_problem,
)

if TYPE_CHECKING:
    from custom_handlers.inference.provider import LocalLLM

log = logging.getLogger("custom_handlers.routes")

STATE_PATH = "/local/state"
RELEASE_PATH = "/local/release"


def mount_on_proxy(provider: LocalLLM) -> None:
    """Mount on the running LiteLLM proxy's app; nothing when not inside the proxy (tests, CLI)."""
    proxy_server = sys.modules.get("litellm.proxy.proxy_server")
    if proxy_server is None:
        return
    mount(proxy_server.app, provider)
    if (workers := gateway_workers()) > 1:  # said at start, in each worker's log
        log.warning("%s", several_workers_problem(workers))


def mount(app: FastAPI, provider: LocalLLM) -> None:
    """Add the routes and the body limit to ``app``; a second call changes nothing."""
    if getattr(app.state, "local_llm_mounted", False):
        return
    app.state.local_llm_mounted = True

    async def require_key(request: Request) -> None:
        if (denied := unauthorized(request)) is not None:
            raise denied

    async def local_state() -> dict:
        return {**provider.state(), "gateway": gateway_state()}

    async def local_release(request: Request):
        try:
            return await provider.release(await _model_to_release(request))
        except LocalLLMError as error:
            log.info("POST %s refused: %s", RELEASE_PATH, error.message)
            return JSONResponse(_error_body(error), status_code=error.status_code)

    routes = [
        APIRoute(STATE_PATH, local_state, methods=["GET"], dependencies=[Depends(require_key)]),
        APIRoute(
            RELEASE_PATH, local_release, methods=["POST"], dependencies=[Depends(require_key)]
        ),
    ]
    # First, so no catch-all route of the proxy's (pass-through providers) can shadow them.
    app.router.routes[:0] = routes
    _limit_body_size(app, GatewaySettings().max_request_mb)
    _journal_requests(app)


async def _model_to_release(request: Request) -> str | None:
    """The ``model`` of the body (``{"model": "<model_name>"}``); None: every local model."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequestError(
            'The body must be JSON: {"model": "<model_name>"} to release one local model, or '
            "empty to release them all."
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("model", ""), str | None):
        raise InvalidRequestError(
            '\'model\' must be the model_name of a local model: {"model": "qwen3-4b"}.',
            param="model",
        )
    unknown = sorted(set(body) - {"model"})
    if unknown:
        raise InvalidRequestError(
            f"Unknown field {unknown[0]!r}: the body takes only 'model'.", param=unknown[0]
        )
    return body.get("model") or None


def _error_body(error: LocalLLMError) -> dict:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code or str(error.status_code),
        }
    }


def gateway_state() -> dict:
    """Whether ``z-explorer-gateway`` watches this process, and the deaths it restarted it after."""
    restarts = restarts_reported() or {}
    return {
        "supervised": bool(os.environ.get(JOURNAL_VAR)),
        "restarts": restarts.get("restarts", 0),
        "last_restart": restarts.get("last"),
    }


def _journal_requests(app: FastAPI) -> None:
    """Under ``z-explorer-gateway``: note each request where a crash cannot lose it."""
    if not (path := os.environ.get(JOURNAL_VAR)):
        return
    try:
        journal = Journal(Path(path))
    except OSError as exc:
        log.warning("Cannot keep the request journal at %s: %s", path, exc)
        return
    _outermost(app, RequestJournal, journal=journal)


def _limit_body_size(app: FastAPI, max_mb: float) -> None:
    if max_mb <= 0:
        log.info("GATEWAY_MAX_REQUEST_MB=0: request bodies are not limited")
        return
    _outermost(app, BodySizeLimit, max_bytes=int(max_mb * 1024 * 1024))


def _outermost(app: FastAPI, middleware: type, **options: object) -> None:
    """Wrap ``app`` in ``middleware``, outside every middleware the proxy has."""
    if app.middleware_stack is None:  # the app has not started yet: the usual way
        app.add_middleware(middleware, **options)
    else:  # mounted during start-up: the stack is built, so wrap it
        app.middleware_stack = middleware(app.middleware_stack, **options)
