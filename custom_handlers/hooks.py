"""Kept for proxy_config.yaml files written before the package had its two folders: they name
``custom_handlers.hooks.local_error_hook``. The module is ``custom_handlers.gateway.hooks``."""

from custom_handlers.gateway.hooks import local_error_hook

__all__ = ["local_error_hook"]
