"""What the gateway gains when LiteLLM loads our handler: the local model's routes and a body limit.

- ``GET /local/state``: loaded or not, device, dtype, quantization, memory, requests running and
  queued, seconds idle, when it unloads. Reading it never loads the model (nor imports torch).
- ``POST /local/release``: unload the model once the requests already sent are done, and return
  once its memory is given back (Z-Explorer calls it before it loads the image model). Requests
  sent after it load the model again.
- Request bodies over ``GATEWAY_MAX_REQUEST_MB`` get 413 before they are read (``body_limit``).

LiteLLM has no setting for extra routes, so ``mount`` adds them to its FastAPI app when the proxy
imports our handler (during its start-up, from ``custom_provider_map``). Both routes need the
gateway key, checked as on every other route.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute

from custom_handlers.gateway.auth import unauthorized
from custom_handlers.gateway.body_limit import BodySizeLimit
from custom_handlers.gateway.journal import JOURNAL_VAR, Journal, RequestJournal
from custom_handlers.gateway.supervisor import restarts_reported
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

    async def local_release() -> dict:
        return await provider.release()

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
