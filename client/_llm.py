"""Calls to the gateway with the OpenAI SDK, sync and async, and the one place errors are mapped.

The gateway is reached like any OpenAI-compatible server: local and cloud models are only names.
``translate`` turns the SDK's exceptions into the client's (``raise Mapped(...) from exc``), using
what this gateway actually answers (LiteLLM 1.108 with our auth hook):

- its own 401: ``type`` ``authentication_error``, a message naming LITELLM_MASTER_KEY;
- a provider's key problem: a message starting ``litellm.AuthenticationError`` (401) or
  ``litellm.InternalServerError: ... OpenAIException - Missing credentials ... OPENAI_API_KEY``
  (500), naming the provider (``OpenAIException``, ``Missing Anthropic API Key``);
- an unknown model: 404 ``model_not_found`` (LiteLLM alone, before this gateway: 400
  ``Invalid model name passed in model=...``, still understood);
- a rate limit: 429, the provider's ``Retry-After`` passed on as ``llm_provider-retry-after``; a
  model paused after failures: 429 ``all_deployments_in_cooldown`` with ``retry-after``;
- the local model's own errors as it wrote them (the gateway's failure hook unwraps them): 400
  ``context_length_exceeded: This model's maximum context length is ...``, 503 when it cannot
  load, 503 with ``retry-after`` when its queue is full.

The gateway's own ``/local/state`` and ``/local/release`` routes are called through the same SDK
client (its generic ``get``/``post``), so they share the URL, the key, the timeout and the HTTP
client; ``translate_local`` maps their errors (a 404 ``model_not_found``: a release naming none of
the local models; any other 404: a gateway without those routes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from client._config import Settings
from client._errors import (
    ClientError,
    ContextLengthError,
    GatewayAuthError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    ModelNotFoundError,
    ModelUnavailableError,
    ProviderAuthError,
    RateLimitError,
    RequestError,
    ResponseError,
)
from client._local import (
    RELEASE_ROUTE,
    STATE_ROUTE,
    LocalState,
    ReleaseResult,
    release_body,
    release_of,
    state_of,
    unknown_local_model,
)
from client._prompts import ChatRequest

_PROVIDER_EXCEPTION = re.compile(r"\b([A-Za-z][\w]*?)Exception - ")
_MISSING_PROVIDER_KEY = re.compile(r"Missing (\w+) API Key", re.IGNORECASE)
_ENV_KEY = re.compile(r"\b((?!LITELLM_)[A-Z][A-Z0-9]*_(?:API_KEY|AUTH_TOKEN))\b")
_KEY_TROUBLE = re.compile(
    r"AuthenticationError|api[_ -]?key|credentials|unauthori[sz]ed", re.IGNORECASE
)
_MISSING = re.compile(r"missing|not set|no key|no api key", re.IGNORECASE)
_CANNOT_CONNECT = re.compile(r"APIConnectionError|Cannot connect|Connection refused", re.I)
_CONTEXT = re.compile(r"maximum context length is (\d+) tokens.*?\((\d+) in the messages", re.S)
_RETRY_IN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s\b|sec|second)", re.IGNORECASE)
_KEY_VARS = {
    "openai": "OPENAI_API_KEY",
    "azure": "AZURE_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "vertex_ai": "VERTEXAI_CREDENTIALS",
    "groq": "GROQ_API_KEY",
    "mistral": "MISTRAL_API_KEY",
}


@dataclass(frozen=True)
class Completion:
    """A model's answer: its text and why it ended (``stop``, ``length``)."""

    text: str
    finish_reason: str | None
    model: str


class Transport:
    """Sync calls to the gateway for one set of settings."""

    def __init__(self, settings: Settings, http_client: httpx.Client | None = None):
        self.settings = settings
        self._http_client = http_client
        self._sdk: openai.OpenAI | None = None

    @property
    def sdk(self) -> openai.OpenAI:
        if self._sdk is None:
            self.settings.validate()
            self._sdk = openai.OpenAI(**sdk_options(self.settings, self._http_client))
        return self._sdk

    def complete(self, request: ChatRequest, model: str | None = None) -> Completion:
        model = model or self.settings.model_name
        try:
            response = self.sdk.chat.completions.create(**chat_options(request, model))
        except openai.APIError as exc:
            if (plain := without_refused(request, exc)) is not None:
                return self.complete(plain, model)
            raise self._translate(exc, model) from exc
        return completion_of(response, model)

    def list_models(self) -> list[str]:
        try:
            return sorted(m.id for m in self.sdk.models.list().data)
        except openai.APIError as exc:
            raise translate(exc, self.settings, model=None) from exc

    def local_state(self) -> LocalState:
        """GET /local/state: every local model's state (it never loads one)."""
        return state_of(self._local(STATE_ROUTE))

    def release_local(self, timeout: float, model: str | None = None) -> ReleaseResult:
        """POST /local/release: unload ``model`` (None: every local model) once the requests
        before it are done."""
        return release_of(self._local(RELEASE_ROUTE, timeout, model))

    def close(self) -> None:
        if self._sdk is not None:
            self._sdk.close()

    def _local(self, route: str, timeout: float | None = None, model: str | None = None) -> Any:
        url, options = local_call(self.settings, route, timeout)
        body = release_body(model)
        try:
            if route == RELEASE_ROUTE:
                return self.sdk.post(url, cast_to=object, body=body, options=options)
            return self.sdk.get(url, cast_to=object, options=options)
        except openai.APIError as exc:
            available = None
            if model is not None and is_unknown_local(exc):
                with contextlib.suppress(ClientError):  # the error itself matters more
                    available = list(self.local_state().names)
            raise translate_local(exc, self.settings, route, timeout, model, available) from exc

    def _translate(self, exc: openai.APIError, model: str) -> ClientError:
        available = None
        if is_unknown_model(exc):
            with contextlib.suppress(ClientError):  # the error itself matters more
                available = self.list_models()
        return translate(exc, self.settings, model=model, available=available)


class AsyncTransport:
    """Async calls to the gateway for one set of settings (the twin of ``Transport``)."""

    def __init__(self, settings: Settings, http_client: httpx.AsyncClient | None = None):
        self.settings = settings
        self._http_client = http_client
        self._sdk: openai.AsyncOpenAI | None = None

    @property
    def sdk(self) -> openai.AsyncOpenAI:
        if self._sdk is None:
            self.settings.validate()
            self._sdk = openai.AsyncOpenAI(**sdk_options(self.settings, self._http_client))
        return self._sdk

    async def complete(self, request: ChatRequest, model: str | None = None) -> Completion:
        model = model or self.settings.model_name
        try:
            response = await self.sdk.chat.completions.create(**chat_options(request, model))
        except openai.APIError as exc:
            if (plain := without_refused(request, exc)) is not None:
                return await self.complete(plain, model)
            raise await self._translate(exc, model) from exc
        return completion_of(response, model)

    async def list_models(self) -> list[str]:
        try:
            return sorted([m.id async for m in self.sdk.models.list()])
        except openai.APIError as exc:
            raise translate(exc, self.settings, model=None) from exc

    async def local_state(self) -> LocalState:
        return state_of(await self._local(STATE_ROUTE))

    async def release_local(self, timeout: float, model: str | None = None) -> ReleaseResult:
        return release_of(await self._local(RELEASE_ROUTE, timeout, model))

    async def aclose(self) -> None:
        if self._sdk is not None:
            await self._sdk.close()

    async def _local(
        self, route: str, timeout: float | None = None, model: str | None = None
    ) -> Any:
        url, options = local_call(self.settings, route, timeout)
        body = release_body(model)
        try:
            if route == RELEASE_ROUTE:
                return await self.sdk.post(url, cast_to=object, body=body, options=options)
            return await self.sdk.get(url, cast_to=object, options=options)
        except openai.APIError as exc:
            available = None
            if model is not None and is_unknown_local(exc):
                with contextlib.suppress(ClientError):  # the error itself matters more
                    available = list((await self.local_state()).names)
            raise translate_local(exc, self.settings, route, timeout, model, available) from exc

    async def _translate(self, exc: openai.APIError, model: str) -> ClientError:
        available = None
        if is_unknown_model(exc):
            with contextlib.suppress(ClientError):  # the error itself matters more
                available = await self.list_models()
        return translate(exc, self.settings, model=model, available=available)


def http_timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(10.0, seconds))


def sdk_options(settings: Settings, http_client: Any) -> dict[str, Any]:
    options = {
        "base_url": settings.base_url,
        # Always explicit: the SDK would otherwise send OPENAI_API_KEY to the gateway.
        "api_key": settings.api_key or "",
        "timeout": http_timeout(settings.timeout_seconds),
        "max_retries": 0,  # one clear answer, fast; a rate-limit error says when to retry
    }
    if http_client is not None:
        options["http_client"] = http_client
    return options


def chat_options(request: ChatRequest, model: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    }
    if request.response_format is not None:
        options["response_format"] = request.response_format
    if request.presence_penalty is not None:
        options["presence_penalty"] = request.presence_penalty
    return options


def without_refused(request: ChatRequest, exc: openai.APIError) -> ChatRequest | None:
    """``request`` without the optional part a model refused (worth asking again), or None."""
    if request.response_format and refuses_response_format(exc):
        return dataclasses.replace(request, response_format=None)
    if request.presence_penalty is not None and refuses_parameter(exc, "presence_penalty"):
        return dataclasses.replace(request, presence_penalty=None)
    return None


def local_call(settings: Settings, route: str, timeout: float | None) -> tuple[str, dict]:
    """The URL of a /local route (beside /v1, not under it) and the SDK's request options."""
    if timeout is not None and not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a number of seconds above 0, got {timeout!r}")
    options = {"timeout": http_timeout(timeout)} if timeout is not None else {}
    return f"{settings.gateway_url}{route}", options


def completion_of(response: Any, model: str) -> Completion:
    if not getattr(response, "choices", None):
        raise ResponseError(f"Model '{model}' sent an answer with no choices in it.")
    choice = response.choices[0]
    return Completion(choice.message.content or "", choice.finish_reason, model)


# ---- error translation --------------------------------------------------------------------------


def refuses_response_format(exc: openai.APIError) -> bool:
    """A 400 saying the model cannot do ``response_format``: worth asking again without it."""
    if not isinstance(exc, openai.BadRequestError) or is_unknown_model(exc):
        return False
    message = error_message(exc).lower()
    return "response_format" in message or "json_schema" in message


def refuses_parameter(exc: openai.APIError, name: str) -> bool:
    """A 400 saying the model does not support ``name`` (LiteLLM: "anthropic does not support
    parameters: ['presence_penalty'] ...")."""
    if not isinstance(exc, openai.BadRequestError) or is_unknown_model(exc):
        return False
    message = error_message(exc)
    return name in message and "not support" in message.lower()


def is_unknown_model(exc: openai.APIError) -> bool:
    message = error_message(exc)
    return "Invalid model name" in message or (
        getattr(exc, "status_code", None) == 404 and "model" in message.lower()
    )


def translate(
    exc: openai.APIError, settings: Settings, *, model: str | None, available=None
) -> ClientError:
    """The client's exception for an OpenAI SDK exception."""
    where = {"model": model, "base_url": settings.gateway_url}
    if isinstance(exc, openai.APITimeoutError):
        return GatewayTimeoutError(
            f"No answer from model '{model}' at {settings.gateway_url} within "
            f"{settings.timeout_seconds:g} s. The first request to the local model loads it, which "
            "can take minutes: raise LLM_TIMEOUT, or see the gateway's log.",
            **where,
        )
    if isinstance(exc, openai.APIConnectionError):
        return GatewayUnreachableError(
            f"Cannot reach the gateway at {settings.gateway_url}. Start it in the project folder "
            "with `uv run z-explorer-gateway`, or set LITELLM_PROXY_API_BASE to where it runs.",
            **where,
        )
    return _translate_status(exc, settings, model, available, where)


def is_unknown_local(exc: openai.APIError) -> bool:
    """A 404 ``model_not_found`` from /local/release: the name is none of the local models."""
    if getattr(exc, "status_code", None) != 404:
        return False
    code = getattr(exc, "code", None)
    body = getattr(exc, "body", None)
    detail = body.get("detail") if isinstance(body, dict) else None  # FastAPI's HTTPException
    if code is None and isinstance(detail, dict):
        inner = detail.get("error", detail)
        code = inner.get("code") if isinstance(inner, dict) else None
    return code == "model_not_found"


def translate_local(
    exc: openai.APIError,
    settings: Settings,
    route: str,
    timeout: float | None,
    model: str | None = None,
    available: list[str] | None = None,
) -> ClientError:
    """The client's exception for a failed call to one of the gateway's /local routes.

    ``model`` is the local model a release named (None: every one); ``available``, the local
    models' names when the gateway said it has no such model."""
    where = {"model": model, "base_url": settings.gateway_url}
    url = f"{settings.gateway_url}{route}"
    status = getattr(exc, "status_code", None)
    if isinstance(exc, openai.APITimeoutError):
        seconds = timeout if timeout is not None else settings.timeout_seconds
        if route == RELEASE_ROUTE:
            which = "the local models" if model is None else f"the local model '{model}'"
            text = (
                f"The gateway at {settings.gateway_url} did not release {which} within "
                f"{seconds:g} s: it first waits for the requests already running or queued. Give "
                "it longer (release_gpu(timeout=...), `z-explorer release-gpu --timeout`), or see "
                "the gateway's log."
            )
        else:
            text = f"No answer from {url} within {seconds:g} s: see the gateway's log."
        return GatewayTimeoutError(text, **where)
    if status == 404 and model is not None and is_unknown_local(exc):
        return unknown_local_model(model, available, settings.gateway_url)
    if status == 404:
        return RequestError(
            f"The gateway at {settings.gateway_url} has no local-model routes ({route} answered "
            "404): it is older than this client, or was not started with this project's "
            "proxy_config.yaml. Start it in the project folder with `uv run z-explorer-gateway`.",
            status_code=404,
            **where,
        )
    if status is None or status == 401:  # unreachable, or our key: the usual words
        return translate(exc, settings, model=None)
    detail = short_detail(error_message(exc))
    said = "" if detail.startswith("Error code:") else f": {detail}"  # the SDK's, for no body
    return RequestError(
        f"{url} answered HTTP {status}{said} (see the gateway's log).", status_code=status, **where
    )


def _translate_status(exc, settings, model, available, where) -> ClientError:
    status = getattr(exc, "status_code", None)
    message = error_message(exc)
    if _is_provider_message(message) and _KEY_TROUBLE.search(message):
        return _provider_auth_error(message, model, where)
    if status == 401:
        return _gateway_auth_error(settings, where)
    if is_unknown_model(exc):
        return _model_not_found(settings, model, available, where)
    if status == 429:
        return _rate_limit_error(exc, message, model, where)
    if status == 502:  # the gateway's own words: the model, the address, what to do
        return ModelUnavailableError(
            f"Model '{model}' cannot answer: {short_detail(message)}", **where
        )
    if status == 500 and _CANNOT_CONNECT.search(message):  # gateways before the 502
        hint = "Start it (Ollama: `ollama serve`)" if "ollama" in message.lower() else "Start it"
        return ModelUnavailableError(
            f"The gateway cannot reach the server behind model '{model}': "
            f"{short_detail(message)}. {hint}, or fix its address where the gateway runs "
            "(e.g. OLLAMA_API_BASE).",
            **where,
        )
    if status == 503 and retry_after(exc, message) is not None:  # a full queue: busy, not broken
        return _rate_limit_error(exc, message, model, where)
    if status == 503:
        return ModelUnavailableError(
            f"Model '{model}' cannot answer now: {short_detail(message)} (see the gateway's log).",
            **where,
        )
    if status == 400 and ("context_length_exceeded" in message or _CONTEXT.search(message)):
        found = _CONTEXT.search(message)
        return ContextLengthError(
            f"The request is too long for model '{model}': {short_detail(message)}",
            context_tokens=int(found.group(1)) if found else None,
            prompt_tokens=int(found.group(2)) if found else None,
            status_code=status,
            **where,
        )
    return RequestError(
        f"The gateway refused the request for model '{model}' (HTTP {status}): "
        f"{short_detail(message)}",
        status_code=status,
        **where,
    )


def _gateway_auth_error(settings: Settings, where: dict) -> GatewayAuthError:
    if settings.key_source is None:
        return GatewayAuthError(
            f"The gateway at {settings.gateway_url} wants a key and none is set: set "
            "LITELLM_PROXY_API_KEY to the gateway's LITELLM_MASTER_KEY (environment or ./.env).",
            **where,
        )
    return GatewayAuthError(
        f"The gateway at {settings.gateway_url} refused the key from {settings.key_source}: "
        "set LITELLM_PROXY_API_KEY (environment or ./.env) to the gateway's LITELLM_MASTER_KEY.",
        **where,
    )


def _provider_auth_error(message: str, model: str | None, where: dict) -> ProviderAuthError:
    provider, env_var = provider_of(message)
    name = provider or "its provider"
    if _MISSING.search(message):
        text = f"Model '{model}' needs {name}'s API key, and the gateway has none"
    else:
        text = f"{name} refused the API key the gateway sent for model '{model}'"
    fix = f"set {env_var}" if env_var else "set the provider's API key"
    return ProviderAuthError(
        f"{text}: {fix} where the gateway runs (its environment or .env) and restart it.",
        provider=provider,
        env_var=env_var,
        **where,
    )


def _model_not_found(settings, model, available, where) -> ModelNotFoundError:
    source = "" if model != settings.model_name else f" (from {settings.model_source})"
    text = f"The gateway at {settings.gateway_url} has no model '{model}'{source}."
    if available:
        text += f" It serves: {', '.join(available)}."
        guess = _closest(model or "", available)
        text += f" Did you mean {guess}?" if guess else ""
        text += " Set LLM_MODEL to one of them, or add the model to proxy_config.yaml."
    else:
        text += " See `z-explorer models` for the ones it serves."
    return ModelNotFoundError(text, available=available, **where)


def _rate_limit_error(exc, message: str, model, where) -> RateLimitError:
    seconds = retry_after(exc, message)
    when = f"retry in {seconds:g} s" if seconds is not None else "wait a minute and retry"
    if "cooldown" in message.lower():
        text = (
            f"The gateway paused model '{model}' after recent failures (its log says why); {when}."
        )
    elif getattr(exc, "status_code", None) == 503:
        text = f"Model '{model}' is busy; {when}. The gateway said: {short_detail(message)}"
    else:
        text = f"Model '{model}' is rate limited by its provider; {when}."
    return RateLimitError(text, retry_after=seconds, **where)


def retry_after(exc: openai.APIError, message: str) -> float | None:
    """Seconds to wait, from the response's headers or the message ("try again in 7s")."""
    response = getattr(exc, "response", None)
    headers = response.headers if response is not None else {}
    for name in ("retry-after", "llm_provider-retry-after"):
        try:
            return float(headers[name])
        except (KeyError, ValueError):
            pass
    for name in ("retry-after-ms", "llm_provider-retry-after-ms"):
        try:
            return float(headers[name]) / 1000
        except (KeyError, ValueError):
            pass
    match = _RETRY_IN.search(message)
    if match:
        value = float(match.group(1))
        return value / 1000 if match.group(2).lower() == "ms" else value
    return None


def provider_of(message: str) -> tuple[str | None, str | None]:
    """The provider named in a LiteLLM error, and the env var that holds its key."""
    match = _PROVIDER_EXCEPTION.search(message) or _MISSING_PROVIDER_KEY.search(message)
    provider = match.group(1) if match else None
    named = _ENV_KEY.findall(message)
    if named:
        return provider, named[0]
    if provider is None:
        return None, None
    key = provider.lower().split("_")[0]
    return provider, _KEY_VARS.get(key, f"{key.upper()}_API_KEY")


def error_message(exc: openai.APIError) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(getattr(exc, "message", None) or exc)


def short_detail(message: str) -> str:
    """The useful part of a LiteLLM message: its first paragraph, without class-name prefixes."""
    first = message.strip().split("\n\n")[0].strip()
    first = re.sub(r"^(?:litellm\.)?\w+Error:\s*", "", first)
    first = re.sub(r"^\w+Error:\s*", "", first)
    first = re.sub(r"\s*ssl:<[^>]*>", "", first)  # aiohttp's repr of its SSL context: noise
    first = " ".join(first.split())
    return first if len(first) <= 300 else first[:297] + "..."


def _is_provider_message(message: str) -> bool:
    """LiteLLM's provider errors; the gateway's own auth errors have neither mark."""
    return message.startswith("litellm.") or bool(_PROVIDER_EXCEPTION.search(message))


def _closest(model: str, available: list[str]) -> str | None:
    import difflib

    tail = model.rsplit("/", 1)[-1]
    if tail in available:
        return tail
    close = difflib.get_close_matches(model, available, n=1, cutoff=0.6)
    return close[0] if close else None
