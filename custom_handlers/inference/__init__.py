"""The local model: the LiteLLM provider (``provider``), request translation, and the inference
stack (engine, KV cache, sampling, constraints, loader, settings), which imports neither LiteLLM
nor FastAPI and nothing from ``custom_handlers.gateway``."""
