"""The file LiteLLM loads by path (``custom_handler: custom_handlers.handler.local_llm``).

LiteLLM imports this file by its path, as a module outside the package, so it holds no logic and
no state of its own: it hands LiteLLM the one ``LocalLLM`` instance that lives in the installed
``custom_handlers`` package, and gives the proxy the local model's routes (``routes``).
"""

from custom_handlers.provider import local_llm
from custom_handlers.routes import mount_on_proxy

mount_on_proxy(local_llm)

__all__ = ["local_llm"]
