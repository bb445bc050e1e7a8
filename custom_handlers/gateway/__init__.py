"""The gateway's own hardening around LiteLLM's proxy (key check, body limit and checks, failure
hook, routes, LiteLLM work-arounds, the ``z-explorer-gateway`` wrapper). It may import the
inference stack (``custom_handlers.inference``); the inference stack never imports it."""
