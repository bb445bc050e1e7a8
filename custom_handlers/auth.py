"""Kept for proxy_config.yaml files written before the package had its two folders: they name
``custom_handlers.auth.user_api_key_auth``. The module is ``custom_handlers.gateway.auth``."""

from custom_handlers.gateway.auth import user_api_key_auth

__all__ = ["user_api_key_auth"]
