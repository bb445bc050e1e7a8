"""The file LiteLLM loads by path (``custom_handler: custom_handlers.handler.local_llm``).

LiteLLM imports this file by its path, as a module outside the package, so it holds no logic and
no state of its own: it hands LiteLLM the one ``LocalLLM`` instance that lives in the installed
``custom_handlers`` package, gives it the local models of the proxy's configuration
(``local_models``), gives the proxy the local models' routes (``routes``), and applies
the work-arounds for LiteLLM behaviour that hurts this gateway (``litellm_patches``: the crash
of issue 11 first).
"""

from custom_handlers.gateway import litellm_patches
from custom_handlers.gateway.local_models import configure_from_proxy
from custom_handlers.gateway.routes import mount_on_proxy
from custom_handlers.inference.provider import local_llm

litellm_patches.apply()
configure_from_proxy(local_llm)
mount_on_proxy(local_llm)

__all__ = ["local_llm"]
