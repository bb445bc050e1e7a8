"""Z-Explorer's LiteLLM custom provider: a local Qwen3 served in-process, behind a hardened gateway.

Two layers, each in its own folder (see docs/architecture.md); imports run one way, from the
gateway to the inference stack, never back:

- ``handler``    the file LiteLLM loads by path: the provider instance, our routes and patches.
- ``gateway/``   the gateway's own hardening around LiteLLM's proxy: the key check (``auth``), the
  body limit, reader and type checks, the failure hook that gives errors their status
  (``hooks``), the ``/local/*`` routes, the work-arounds for LiteLLM (``litellm_patches``) and
  ``z-explorer-gateway`` (``serve``, ``supervisor``, ``journal``).
- ``inference/`` the local model: the LiteLLM ``CustomLLM`` (``provider``, the one module here that
  imports LiteLLM), request translation (``request``, ``tools``), and the stack that imports
  neither LiteLLM nor FastAPI: ``engine`` (queue, batching, cancellation), ``kvbatch`` and
  ``prefix`` (the KV cache), ``sampling``, ``constraints`` (llguidance), ``text``, ``loader``
  (the one owner of the model and its memory), ``settings`` and ``errors``.

Nothing here imports torch or transformers until the local model is first used.
"""
