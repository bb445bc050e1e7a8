"""The gateway's local models: read from ``proxy_config.yaml`` when the proxy loads our handler.

LiteLLM imports the handler while it reads its configuration (``custom_provider_map``), so the
file's path is known by then (``proxy_server.user_config_file_path``). Its ``zlocal/...`` entries
become the provider's registry, and those marked ``preload: true`` start loading. A wrong local
entry (an unknown ``model_info`` key, a bad value) stops the gateway at once with one line naming
the entry, the key and what is allowed: a typo is never silently ignored.

Which ``model_info`` keys are LiteLLM's own is read from LiteLLM's types (and the health-check
keys its proxy reads), so they pass without being taken for our typos.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from custom_handlers.inference.catalog import (
    ConfigError,
    local_entries,
    problem_line,
    read_config,
)
from custom_handlers.inference.registry import Registry
from custom_handlers.inference.settings import LocalModelsSettings

if TYPE_CHECKING:
    from custom_handlers.inference.provider import LocalLLM

log = logging.getLogger("custom_handlers.local_models")

# model_info keys LiteLLM's proxy reads that its types do not list.
_PROXY_KEYS = (
    "access_groups",
    "aliases",
    "description",
    "disable_background_health_check",
    "display_name",
    "health_check_model",
    "health_check_params",
    "health_check_timeout",
    "health_check_max_tokens",
    "health_check_reasoning_effort",
    "health_check_voice",
)


def litellm_model_info_keys() -> frozenset[str]:
    """The ``model_info`` keys LiteLLM itself knows."""
    from litellm.types.router import ModelInfo as RouterModelInfo
    from litellm.types.utils import ModelInfo

    typed = ModelInfo.__required_keys__ | ModelInfo.__optional_keys__
    return frozenset(typed) | frozenset(RouterModelInfo.model_fields) | frozenset(_PROXY_KEYS)


def configure_from_proxy(provider: LocalLLM) -> None:
    """Serve the local entries of the proxy's configuration; nothing outside the proxy."""
    proxy_server = sys.modules.get("litellm.proxy.proxy_server")
    path = getattr(proxy_server, "user_config_file_path", None)
    if not path:
        return
    try:
        entries = local_entries(
            read_config(path), source=str(path), foreign_keys=litellm_model_info_keys()
        )
        max_loaded = LocalModelsSettings().max_loaded_models
    except ConfigError as exc:
        refuse_to_start(str(exc))
    except ValidationError as exc:
        refuse_to_start(problem_line(exc))
    provider.use(Registry.of_entries(entries, max_loaded))
    if entries:
        names = ", ".join(f"{e.name} ({e.checkpoint})" for e in entries)
        log.info("Local models: %s; at most %d loaded at once", names, max_loaded)
    provider.preload()


def refuse_to_start(reason: str) -> None:
    """Stop the gateway with one line: it must not serve a configuration it cannot honour."""
    print(f"The gateway cannot start: {reason}", file=sys.stderr, flush=True)
    os._exit(1)  # raised instead (even SystemExit), it is 400 lines of traceback from uvicorn
