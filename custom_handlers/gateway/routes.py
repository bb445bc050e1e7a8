"""What the gateway gains when LiteLLM loads our handler: its routes, and the layers around them.

- ``GET /local/state``: every local model by its ``model_name``: loaded or not, device, dtype,
  quantization, memory, requests running and queued, seconds idle, when it unloads. Reading it
  never loads a model (nor imports torch).
- ``POST /local/release``: unload every local model (or the one named by ``{"model": ...}``) once
  the requests already sent are done, and return once its memory is given back (Z-Explorer calls
  it before it loads the image model). Requests sent after it load the model again.
- ``GET``/``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``: the Responses
  answers the gateway stores (``responses_state``, ``response_store``).
- ``GET /health``: each model of ``proxy_config.yaml`` by its name, healthy or not, with a
  one-line reason (LiteLLM's own answer carried tracebacks, provider request bodies and masked
  keys). Cloud models are checked by LiteLLM's health check; a local one reports its state without
  being loaded.
- Request bodies over ``GATEWAY_MAX_REQUEST_MB`` or ``GATEWAY_MAX_JSON_ITEMS`` get 413 before they
  are parsed (``body_limit``).
- Only the routes the gateway serves answer (``surface``), and every error leaves in one shape
  with no internals (``error_bodies``).

LiteLLM has no setting for extra routes, so ``mount`` adds them to its FastAPI app when the proxy
imports our handler (during its start-up, from ``custom_provider_map``). They need the gateway
key, checked as on every other route.
"""

from __future__ import annotations

import gc
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
from custom_handlers.gateway.error_bodies import ErrorBodies, clean
from custom_handlers.gateway.journal import JOURNAL_VAR, Journal, RequestJournal
from custom_handlers.gateway.local_models import refuse_to_start
from custom_handlers.gateway.responses_state import open_store, state_routes
from custom_handlers.gateway.supervisor import restarts_reported
from custom_handlers.gateway.surface import ADMIN_SETTING, ClosedSurface
from custom_handlers.inference.catalog import ConfigError, read_config
from custom_handlers.inference.errors import InvalidRequestError, LocalLLMError
from custom_handlers.inference.settings import (
    GatewaySettings,
    gateway_workers,
    several_workers_problem,
)

if TYPE_CHECKING:
    from custom_handlers.inference.provider import LocalLLM

log = logging.getLogger("custom_handlers.routes")

HEALTH_PATH = "/health"
STATE_PATH = "/local/state"
RELEASE_PATH = "/local/release"


def mount_on_proxy(provider: LocalLLM) -> None:
    """Mount on the running LiteLLM proxy's app; nothing when not inside the proxy (tests, CLI)."""
    proxy_server = sys.modules.get("litellm.proxy.proxy_server")
    if proxy_server is None:
        return
    open_store(getattr(proxy_server, "user_config_file_path", None))
    mount(proxy_server.app, provider, admin_routes=_admin_routes(proxy_server))
    freeze_heap()  # LiteLLM's ~700,000 objects of start-up, never walked again by a collection
    if (workers := gateway_workers()) > 1:  # said at start, in each worker's log
        log.warning("%s", several_workers_problem(workers))


def _admin_routes(proxy_server) -> bool:
    """``general_settings.gateway_admin_routes`` of the proxy's configuration (default false)."""
    path = getattr(proxy_server, "user_config_file_path", None)
    if not path:
        return False
    try:
        settings = read_config(path).get("general_settings") or {}
    except ConfigError:
        return False  # the proxy reports a configuration it cannot read
    value = settings.get(ADMIN_SETTING, False) if isinstance(settings, dict) else False
    if value is not True and value is not False:
        refuse_to_start(f"general_settings.{ADMIN_SETTING} must be true or false, got {value!r}")
    if value:
        log.warning(
            "general_settings.%s: true: every route of LiteLLM answers (admin UI, login, key "
            "management); see docs/security.md",
            ADMIN_SETTING,
        )
    return value


def freeze_heap() -> None:
    """Collect, then move every object alive now out of the cyclic collector's sight (gc.freeze).

    A full collection walks every tracked object: with LiteLLM's proxy imported, about 700,000,
    0.6 s on this machine's CPU, holding the GIL, so the event loop (every route) and the engine
    thread stop meanwhile; one request that allocates many objects can set one off. What is alive
    once the proxy has started (its modules, its app) stays alive, so walking it again finds
    nothing. Called once, at start-up (``mount_on_proxy``). A model is never frozen: its
    modules hold reference cycles that only a collection frees when it is unloaded.
    """
    gc.collect()
    gc.freeze()


def mount(app: FastAPI, provider: LocalLLM, *, admin_routes: bool = False) -> None:
    """Add the routes and the layers around the app to ``app``; a second call changes nothing."""
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

    async def health(model: str | None = None) -> JSONResponse:
        return await health_report(provider, model)

    routes = [
        APIRoute(HEALTH_PATH, health, methods=["GET"], dependencies=[Depends(require_key)]),
        APIRoute(STATE_PATH, local_state, methods=["GET"], dependencies=[Depends(require_key)]),
        APIRoute(
            RELEASE_PATH, local_release, methods=["POST"], dependencies=[Depends(require_key)]
        ),
        *state_routes(),
    ]
    # First, so no catch-all route of the proxy's (pass-through providers) can shadow them.
    app.router.routes[:0] = routes
    settings = GatewaySettings()
    _limit_body_size(app, settings.max_request_mb, settings.max_json_items)
    _journal_requests(app)
    _outermost(app, ClosedSurface, admin_routes=admin_routes)
    _outermost(app, ErrorBodies)


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


def _limit_body_size(app: FastAPI, max_mb: float, max_items: int) -> None:
    if max_mb <= 0:
        log.info("GATEWAY_MAX_REQUEST_MB=0: request bodies are not limited in size")
    if max_items <= 0:
        log.info("GATEWAY_MAX_JSON_ITEMS=0: request bodies are not limited in JSON values")
    if max_mb > 0 or max_items > 0:
        _outermost(
            app, BodySizeLimit, max_bytes=int(max(max_mb, 0) * 1024 * 1024), max_items=max_items
        )


async def health_report(provider: LocalLLM, model: str | None) -> JSONResponse:
    """``GET /health``: every model by name, its status and a one-line reason, nothing more."""
    from fastapi import Response
    from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth
    from litellm.proxy.health_endpoints._health_endpoints import health_endpoint
    from litellm.proxy.proxy_server import llm_router

    answer = Response()
    result = await health_endpoint(
        response=answer,
        user_api_key_dict=UserAPIKeyAuth(user_role=LitellmUserRoles.PROXY_ADMIN),
        model=model,
        model_id=None,
    )
    names = {
        d.get("model_info", {}).get("id"): d["model_name"]
        for d in (llm_router.model_list if llm_router else [])
    }
    models = [
        *(
            {"model": names.get(e.get("model_id"), "?"), "status": "healthy"}
            for e in result.get("healthy_endpoints", [])
        ),
        *(
            {
                "model": names.get(e.get("model_id"), "?"),
                "status": "unhealthy",
                "reason": _one_line(e.get("error")),
            }
            for e in result.get("unhealthy_endpoints", [])
        ),
    ]
    checked = {m["model"] for m in models}
    for state in provider.state()["models"]:
        if state["model"] not in checked and model in (None, state["model"]):
            models.append(_local_health(state))
    body = {
        "models": sorted(models, key=lambda m: m["model"]),
        "healthy_count": result.get("healthy_count", 0),
        "unhealthy_count": result.get("unhealthy_count", 0),
    }
    return JSONResponse(body, status_code=answer.status_code or 200)


def _local_health(state: dict) -> dict:
    """A local model as /health reports it: never loaded for the check (it would take the GPU)."""
    if state["loaded"]:
        reason = f"loaded on {state['device']}"
    elif state["loading"]:
        reason = "loading"
    else:
        reason = "not loaded; the next request loads it"
    return {
        "model": state["model"],
        "status": "not checked",
        "reason": f"local model, {reason} (GET /local/state)",
    }


def _one_line(error: object) -> str:
    """The first line of a health check's error, without internals, at most 300 characters."""
    text = clean(str(error or "unhealthy"))
    text = text.strip().splitlines()[0] if text.strip() else "unhealthy"
    for prefix in ("litellm.", "stack trace"):
        if text.startswith(prefix) and ": " in text:
            text = text.split(": ", 1)[1]
    return text[:300]


def _outermost(app: FastAPI, middleware: type, **options: object) -> None:
    """Wrap ``app`` in ``middleware``, outside every middleware the proxy has."""
    if app.middleware_stack is None:  # the app has not started yet: the usual way
        app.add_middleware(middleware, **options)
    else:  # mounted during start-up: the stack is built, so wrap it
        app.middleware_stack = middleware(app.middleware_stack, **options)
