"""Z-Explorer's LiteLLM custom provider: a local Qwen3 served in-process.

Layers, each in its own module (see docs/architecture.md):

- ``handler``  the file LiteLLM loads by path; it only re-exports the provider instance.
- ``provider`` LiteLLM ``CustomLLM``: OpenAI request -> engine job -> OpenAI response. No tensors.
- ``request``  validation of an OpenAI chat request into a ``ChatRequest`` (pure Python).
- ``text``     incremental detokenization, think-block filtering and stop strings (pure Python).
- ``engine``   the generation thread: queue, sampling, cancellation.
- ``constraints`` JSON-schema constrained decoding (llguidance).
- ``loader``   the one owner of the model, its tokenizer and device memory.
- ``settings`` server-only settings from ``LOCAL_LLM_*`` environment variables.
- ``auth``     the gateway's key check (401 for a missing or wrong key).
- ``litellm_patches`` work-arounds for LiteLLM behaviour that hurts the gateway (the SIGSEGV).
- ``serve``, ``supervisor``, ``journal`` ``z-explorer-gateway``: starts the proxy, restarts it if
  it dies, and keeps its last requests where a crash cannot lose them.

Nothing here imports torch or transformers until the local model is first used.
"""
