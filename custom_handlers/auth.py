"""The gateway's key check, plugged in as ``general_settings.custom_auth``.

Out of the box this LiteLLM answers a missing key with a 500 (its error path needs a database
client) and a wrong key with a 400 ("No connected db"). This check answers both with a 401 and an
OpenAI-shaped error body, and never echoes the key it was given.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth


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


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    master_key = _master_key()
    if not master_key:
        raise _unauthorized(
            "The gateway has no master key configured; set LITELLM_MASTER_KEY and restart it."
        )
    if not api_key:
        raise _unauthorized(
            "No API key provided. Send the gateway key as 'Authorization: Bearer <key>' "
            "(LITELLM_MASTER_KEY on the gateway; LITELLM_PROXY_API_KEY for the Z-Explorer client)."
        )
    if not hmac.compare_digest(api_key.encode(), master_key.encode()):
        raise _unauthorized("Invalid API key: it does not match the gateway's LITELLM_MASTER_KEY.")
    return UserAPIKeyAuth(api_key=api_key, user_role=LitellmUserRoles.PROXY_ADMIN)
