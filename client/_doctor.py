"""``diagnose``: check the settings, the gateway, the key and the model, and say what to fix.

When every check passes, more lines report the gateway's local models (``/local/state``): how many
are loaded of how many may be, then one line per model: loaded or not, where, how much memory, its
requests. Reading the state never loads a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from client._config import Settings
from client._errors import ClientError, RequestError
from client._llm import Transport
from client._local import describe_models, describe_restarts, describe_state
from client._prompts import text_request


@dataclass(frozen=True)
class Check:
    """One line of a diagnosis. ``ok`` is None for a warning that does not stop anything."""

    name: str
    ok: bool | None
    detail: str


def diagnose(
    settings: Settings,
    model: str | None = None,
    *,
    http_client: httpx.Client | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> list[Check]:
    """Run the checks in order, stopping at the first one the others depend on."""
    progress = on_progress or (lambda message: None)
    model = model or settings.model_name
    checks = [Check("setting", None, notice) for notice in settings.notices()]
    problems = settings.problems()
    checks += [Check("setting", False, problem) for problem in problems]
    if problems:
        return checks
    checks.append(Check("settings", True, _settings_summary(settings, model)))
    progress(f"Reaching the gateway at {settings.gateway_url}")
    up = _check_gateway(settings, http_client)
    checks.append(up)
    if not up.ok:
        return checks
    transport = Transport(settings, http_client)
    try:
        for step in (_check_key_and_model, _check_answer):
            progress(f"Checking {step.__name__.removeprefix('_check_').replace('_', ' ')}")
            found = step(transport, model)
            checks += found
            if not all(c.ok for c in found):
                break
        else:
            progress("Reading the local models' state")
            checks += _check_local_models(transport)
    finally:
        transport.close()
    return checks


def _settings_summary(settings: Settings, model: str) -> str:
    return (
        f"gateway {settings.gateway_url}, key from {settings.key_source}, model {model}, "
        f"library {settings.library_dir}"
    )


def _check_gateway(settings: Settings, http_client: httpx.Client | None) -> Check:
    url = f"{settings.gateway_url}/health/liveliness"
    client = http_client or httpx.Client(timeout=httpx.Timeout(10.0))
    try:
        response = client.get(url)
    except httpx.HTTPError:
        return Check(
            "gateway",
            False,
            f"Nothing answers at {settings.gateway_url}. Start the gateway in the project folder "
            "with `uv run z-explorer-gateway`, or set LITELLM_PROXY_API_BASE to where it runs.",
        )
    finally:
        if http_client is None:
            client.close()
    if response.status_code != 200:
        return Check(
            "gateway",
            False,
            f"{url} answered HTTP {response.status_code}: is LITELLM_PROXY_API_BASE the "
            "gateway's address?",
        )
    return Check("gateway", True, f"up at {settings.gateway_url}")


def _check_key_and_model(transport: Transport, model: str) -> list[Check]:
    try:
        available = transport.list_models()
    except ClientError as exc:
        return [Check("key", False, str(exc))]
    key = Check("key", True, f"accepted (from {transport.settings.key_source})")
    if model in available:
        return [key, Check("model", True, f"{model} is served (all: {', '.join(available)})")]
    try:  # a real request gets the same words the user would see, "did you mean" included
        transport.complete(text_request("ping", 1, 0.0), model)
    except ClientError as exc:
        return [key, Check("model", False, str(exc))]
    return [key, Check("model", True, f"{model} answers (the gateway does not list it)")]


def _check_answer(transport: Transport, model: str) -> list[Check]:
    started = time.monotonic()
    try:
        transport.complete(text_request("Say OK.", 4, 0.0), model)
    except ClientError as exc:
        return [Check("answer", False, str(exc))]
    return [Check("answer", True, f"{model} answered in {time.monotonic() - started:.1f} s")]


def _check_local_models(transport: Transport) -> list[Check]:
    try:
        state = transport.local_state()
    except RequestError as exc:
        if exc.status_code == 404:  # an older gateway: everything else works without the routes
            return [Check("local models", None, str(exc))]
        return [Check("local models", False, str(exc))]
    except ClientError as exc:
        return [Check("local models", False, str(exc))]
    checks = [Check("local models", True, describe_models(state))]
    checks += [
        Check(f"local model {m.model}", None if m.last_error else True, describe_state(m))
        for m in state.models
    ]
    if (restarts := describe_restarts(state)) is not None:
        checks.append(Check("gateway restarts", None, restarts))
    return checks


def gateway_answers(settings: Settings, timeout: float = 3.0) -> bool:
    """Whether something answers 200 at the gateway's /health/liveliness."""
    try:
        response = httpx.get(f"{settings.gateway_url}/health/liveliness", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200
