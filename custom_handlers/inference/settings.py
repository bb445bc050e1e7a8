"""Server-only settings of the local models.

Each local model's settings are its ``model_info`` in ``proxy_config.yaml`` (``catalog``), on top of
the ``LOCAL_LLM_*`` environment variables (and the gateway's ``.env``), which are every local
model's defaults. A client's request body never reaches these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "unsloth/Qwen3-4B-Instruct-2507-bnb-4bit"

# keep_alive's range, for the setting and for a request alike. A week covers "keep it loaded over
# the weekend"; -1 is there for longer. Unbounded, a value past ~9.2e9 s overflowed the engine's
# idle wait (threading's TIMEOUT_MAX, the platform's time_t) on every loop of its thread.
KEEP_ALIVE_MAX = 7 * 24 * 3600
KEEP_ALIVE_RANGE = f"-1 (never unload), or 0 to {KEEP_ALIVE_MAX} seconds (7 days)"


def is_keep_alive(value: object) -> bool:
    """Whether ``value`` is a keep_alive in range: -1, or 0 to ``KEEP_ALIVE_MAX`` seconds (NaN,
    infinities and integers past a float's range are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value == -1 or 0 <= value <= KEEP_ALIVE_MAX


class LocalModelSettings(BaseSettings):
    """How the gateway loads and runs the local model."""

    model_config = SettingsConfigDict(env_prefix="LOCAL_LLM_", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face repo id or local directory of the model (LOCAL_LLM_MODEL).",
    )
    device: str = Field(
        "auto",
        description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.",
    )
    quantization: Literal["auto", "4bit", "none"] = Field(
        "auto",
        description=(
            "'auto': bitsandbytes 4-bit on CUDA for unquantized checkpoints, none on CPU; "
            "pre-quantized checkpoints always load as they are. '4bit' forces it, 'none' turns "
            "it off."
        ),
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="'auto': bfloat16 on GPUs that support it (else float16), float32 on CPU.",
    )
    default_max_tokens: int = Field(
        2048,
        ge=1,
        description="Output budget of a request without max_tokens (capped by the context left).",
    )
    max_n: int = Field(8, ge=1, description="Largest 'n' (choices per request) accepted.")
    max_batch_size: int = Field(
        16, ge=1, description="Most rows (choices of requests) decoded together in one batch."
    )
    keep_alive: float = Field(
        300,
        description=(
            "Seconds the model stays loaded after the last request; then it is unloaded and its "
            "(GPU) memory returned; the next request loads it again. 0: unload after each "
            f"request; -1: never; at most {KEEP_ALIVE_MAX} (7 days). A request may set its own "
            "with keep_alive in the body, in the same range."
        ),
    )
    max_queue: int = Field(
        64,
        ge=1,
        description="Most requests waiting for room in the batch; beyond: 503 + Retry-After.",
    )
    kv_cache_mb: float = Field(
        2048,
        ge=0,
        description="Memory (MiB, on the model's device) for the running requests' KV cache, "
        "allocated as they need it and written in place. A request that does not fit next to "
        "the running ones waits; one that cannot fit alone gets a 400. 2048 MiB holds about "
        "14,500 tokens of Qwen3-4B (144 KiB each). 0: no limit.",
    )
    prefix_cache_mb: float = Field(
        512,
        ge=0,
        description="Memory (MiB, on the model's device) for prompts' KV kept for reuse: a prompt "
        "that starts like an earlier one (the same system prompt) skips that part of its "
        "prefill. 0 turns it off. 512 MiB holds about 3,600 tokens of Qwen3-4B.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, replay decoding steps from captured CUDA graphs (one launch a step "
        "instead of hundreds), each checked against an eager step when captured; on any error or "
        "mismatch the model decodes eagerly and the log says why. false: always eager. The KV "
        "cache then stays allocated while the model is loaded (the graphs point into it).",
    )
    draft_tokens: int | None = Field(
        None,
        ge=0,
        le=16,
        description="Prompt-lookup speculation: a request without logprobs checks up to this "
        "many tokens taken from its prompt and answer in a forward pass (in batches of at most 4 "
        "requests; greedy answers unchanged, sampled ones from the same distribution); a JSON "
        "or tool-call "
        "constrained one checks the tokens its grammar forces instead (grammar fast-forward, up "
        "to 15 a pass). Unset: 7 on the CPU (measured faster there), 0 (off, both kinds) on CUDA "
        "until a GPU run measures it. 0: off.",
    )
    prefill_chunk: int | None = Field(
        None,
        ge=0,
        le=8192,
        description="Chunked prefill: a prompt longer than this many tokens (beyond what the "
        "prefix cache reuses) that arrives while other requests decode joins in chunks of this "
        "many tokens, one a step, in the same forward pass as the running rows' next tokens, so "
        "their streams never stop for a long prefill. Unset: 256 on the CPU, 1024 on CUDA (a "
        "step with a chunk runs without CUDA graphs: fewer, larger chunks). 0: prompts are "
        "prefilled whole.",
    )
    preload: bool = Field(
        False,
        description="Load the model when the gateway starts, so the first request finds it warm.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow custom modelling code from the model repo (off: Qwen3 needs none).",
    )
    subfolder: str = Field(
        "",
        description=(
            "Folder inside LOCAL_LLM_MODEL that holds the model's config.json and weights, e.g. "
            "'text_encoder' for Z-Image's Qwen3 text encoder; empty: the top level."
        ),
    )
    tokenizer_subfolder: str | None = Field(
        None,
        description=(
            "Folder inside LOCAL_LLM_MODEL that holds the tokenizer, e.g. 'tokenizer' for "
            "Z-Image; unset: the same as LOCAL_LLM_SUBFOLDER."
        ),
    )

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_in_range(cls, value: float) -> float:
        if not is_keep_alive(value):
            raise ValueError(f"keep_alive must be {KEEP_ALIVE_RANGE}")
        return value

    _entry: str | None = PrivateAttr(None)  # the proxy_config.yaml entry these settings are for
    _from_env: bool = PrivateAttr(True)  # the checkpoint is LOCAL_LLM_MODEL's

    def for_entry(self, name: str, *, checkpoint_from_env: bool) -> LocalModelSettings:
        """These settings, named after the ``model_name`` they belong to (in messages)."""
        self._entry, self._from_env = name, checkpoint_from_env
        return self

    @property
    def checkpoint_setting(self) -> str:
        """Where the checkpoint is set, as messages tell the user to fix it."""
        if self._from_env:
            return "LOCAL_LLM_MODEL"
        return f"the litellm_params.model of {self._entry!r} in proxy_config.yaml"

    @property
    def tokenizer_folder(self) -> str:
        """The tokenizer's subfolder: LOCAL_LLM_TOKENIZER_SUBFOLDER, else LOCAL_LLM_SUBFOLDER."""
        folder = self.subfolder if self.tokenizer_subfolder is None else self.tokenizer_subfolder
        return folder.strip().strip("/")

    @property
    def checkpoint_is_a_path(self) -> bool:
        """Whether the checkpoint is written as a path (it must then exist), not a repo id."""
        source = self.model.strip()
        return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source

    @property
    def shown(self) -> str:
        """The checkpoint as answers show it: a repo id, or a folder's name, never its path (the
        gateway's answers carry no file path; its log has the whole path)."""
        if not self.checkpoint_is_a_path:
            return self.model
        return f"{Path(self.model.strip()).name} (a local folder)"

    @property
    def model_folder(self) -> str:
        return self.subfolder.strip().strip("/")

    @property
    def source_label(self) -> str:
        if self._entry is not None:
            folder = f", subfolder {self.model_folder!r}" if self.model_folder else ""
            source = f"LOCAL_LLM_MODEL={self.model!r}" if self._from_env else repr(self.model)
            return f"model {self._entry!r} ({source}{folder})"
        if self.model_folder:
            return f"LOCAL_LLM_MODEL={self.model!r} (LOCAL_LLM_SUBFOLDER={self.model_folder!r})"
        return f"LOCAL_LLM_MODEL={self.model!r}"


class LocalModelsSettings(BaseSettings):
    """Settings of the local models as a whole."""

    model_config = SettingsConfigDict(env_prefix="LOCAL_LLM_", extra="ignore")

    max_loaded_models: int = Field(
        1,
        ge=1,
        description=(
            "Most local models loaded at once (LOCAL_LLM_MAX_LOADED_MODELS). A request for another "
            "one first unloads the least recently used idle model. 1 by default: the GPU is shared "
            "with the image model."
        ),
    )

    download_wait: float = Field(
        60,
        ge=0,
        description=(
            "Seconds a request waits for its model's download (a checkpoint not in the Hugging "
            "Face cache yet) before a 503 that says how far it is; the download goes on "
            "(LOCAL_LLM_DOWNLOAD_WAIT). `z-explorer pull` downloads ahead."
        ),
    )


class GatewaySettings(BaseSettings):
    """Settings of the gateway as a whole (every model, cloud ones included)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    max_request_mb: float = Field(
        32,
        ge=0,
        description=(
            "Largest request body accepted, in MiB; a larger one gets 413 before it is read into "
            "memory (GATEWAY_MAX_REQUEST_MB). 0: no limit."
        ),
    )
    max_json_items: int = Field(
        500_000,
        ge=0,
        description=(
            "Most JSON values a request body may hold, counted before it is parsed as its commas, "
            "colons and opening brackets (strings included); a body with more gets 413 "
            "(GATEWAY_MAX_JSON_ITEMS). Parsing costs per value: this bounds how long one body "
            "can hold the gateway's event loop. 0: no limit."
        ),
    )


def gateway_workers() -> int:
    """How many worker processes serve the gateway. LiteLLM sets ``NUM_WORKERS`` from
    ``--num_workers`` (or takes it from there) before it starts them, whichever server runs them."""
    try:
        return max(1, int(os.environ.get("NUM_WORKERS", "1")))
    except ValueError:
        return 1


def several_workers_problem(workers: int) -> str:
    """Why the local model is not served by a gateway of ``workers`` (> 1) processes."""
    return (
        f"The gateway runs {workers} worker processes (--num_workers / NUM_WORKERS): each would "
        "load its own copy of the local model onto the GPU, so the local model is not served "
        "(cloud models are). Start the gateway with one worker, the default: it serves requests "
        "concurrently and batches them. To scale out, see docs/scaling.md."
    )
