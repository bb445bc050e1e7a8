"""The gateway's key check, plugged in as ``general_settings.custom_auth``.

Out of the box this LiteLLM answers a missing key with a 500 (its error path needs a database
client) and a wrong key with a 400 ("No connected db"). This check answers both with a 401 and an
OpenAI-shaped error body, and never echoes the key it was given.

Importing it also installs ``body_reader`` (LiteLLM reads the body before it calls this check),
which gives a caller without the key this check's 401 before LiteLLM does anything with the body.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth

from custom_handlers.gateway import body_reader

# The headers LiteLLM takes the key from: OpenAI's, its own, Azure's, Anthropic's and Google's.
_KEY_HEADERS = ("x-litellm-api-key", "api-key", "x-api-key", "x-goog-api-key")


def _master_key() -> str | None:
    from litellm.proxy import proxy_server  # the key the proxy resolved from its config

    return proxy_server.master_key


def _unauthorized(message: str) -> ProxyException:
    return ProxyException(
        message=message,
        type="authentication_error",
        param="api_key",
        code=401,
        openai_code="invalid_api_key",
    )


def unauthorized_reason(api_key: str | None) -> str | None:
    """Why ``api_key`` does not open the gateway, or None when it is the gateway's key."""
    master_key = _master_key()
    if not master_key:
        return "The gateway has no master key configured; set LITELLM_MASTER_KEY and restart it."
    if not api_key:
        return (
            "No API key provided. Send the gateway key as 'Authorization: Bearer <key>' "
            "(LITELLM_MASTER_KEY on the gateway; LITELLM_PROXY_API_KEY for the Z-Explorer client)."
        )
    if not hmac.compare_digest(api_key.encode(), master_key.encode()):
        return "Invalid API key: it does not match the gateway's LITELLM_MASTER_KEY."
    return None


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """The key check of every LiteLLM route. LiteLLM hands it the key of the one header it picked
    (``x-litellm-api-key`` over ``Authorization`` over the others); the rule here is the one of
    ``/local/*`` and ``/health`` instead: any header holding the gateway's key is enough."""
    if (denied := unauthorized(request)) is not None:
        raise denied
    return UserAPIKeyAuth(api_key=_master_key(), user_role=LitellmUserRoles.PROXY_ADMIN)


def presented_keys(request: Request) -> list[str]:
    """Every key the request presents: ``Authorization: Bearer <key>`` and LiteLLM's other key
    headers (LiteLLM picks one of them by its own precedence)."""
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    keys = [bearer] if scheme.lower() == "bearer" else []
    keys += [request.headers.get(header, "") for header in _KEY_HEADERS]
    return [key.strip() for key in keys if key.strip()]


def unauthorized(request: Request) -> ProxyException | None:
    """The 401 for a request none of whose keys is the gateway's, or None."""
    reasons = [unauthorized_reason(key) for key in presented_keys(request) or [None]]
    return None if None in reasons else _unauthorized(reasons[0])


body_reader.install(unauthorized)
