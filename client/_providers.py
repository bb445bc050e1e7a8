"""The cloud providers ``z-explorer setup`` offers: their LiteLLM prefix, models and key variables.

"Other" takes any LiteLLM model id (``gemini/gemini-2.5-flash``); LiteLLM itself, imported only
then (it takes seconds), checks the id and says which variables that provider reads.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass

from client._errors import ClientError


class SetupError(ClientError):
    """A setup choice that cannot work (unknown provider, a name already taken, ...)."""


@dataclass(frozen=True)
class Model:
    id: str  # the provider's model id, without the LiteLLM prefix
    alias: str  # the model_name callers use
    note: str


@dataclass(frozen=True)
class Provider:
    name: str  # as given to --provider
    label: str
    prefix: str  # LiteLLM's provider prefix ("" for "other": the id carries it)
    key_vars: tuple[str, ...]
    key_url: str | None
    models: tuple[Model, ...]

    def litellm_model(self, model_id: str) -> str:
        """``openai/gpt-4o`` from ``gpt-4o`` (or from ``openai/gpt-4o``)."""
        model_id = model_id.strip()
        if not self.prefix or model_id.startswith(f"{self.prefix}/"):
            return model_id
        return f"{self.prefix}/{model_id}"

    def catalog_alias(self, model_id: str) -> str | None:
        bare = model_id.removeprefix(f"{self.prefix}/") if self.prefix else model_id
        return next((m.alias for m in self.models if m.id == bare), None)


PROVIDERS: dict[str, Provider] = {
    "openai": Provider(
        "openai",
        "OpenAI",
        "openai",
        ("OPENAI_API_KEY",),
        "https://platform.openai.com/api-keys",
        (
            Model("gpt-4o-mini", "gpt-4o-mini", "fast and cheap"),
            Model("gpt-4o", "gpt-4o", "stronger, dearer"),
        ),
    ),
    "anthropic": Provider(
        "anthropic",
        "Anthropic",
        "anthropic",
        ("ANTHROPIC_API_KEY",),
        "https://console.anthropic.com/settings/keys",
        (
            Model("claude-haiku-4-5", "claude-haiku", "Claude Haiku: fast and cheap"),
            Model("claude-sonnet-4-5", "claude-sonnet", "Claude Sonnet: stronger, dearer"),
        ),
    ),
    "ollama": Provider(
        "ollama",
        "Ollama",
        "ollama_chat",
        (),
        None,
        (Model("qwen3:4b", "ollama-qwen3", "Qwen3 4B in your Ollama"),),
    ),
    "other": Provider("other", "Other", "", (), None, ()),
}
PROVIDER_NAMES = tuple(PROVIDERS)
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


def provider(name: str) -> Provider:
    found = PROVIDERS.get(name.strip().lower())
    if found is None:
        raise SetupError(
            f"Unknown provider {name!r}: use one of {', '.join(PROVIDER_NAMES)} ('other' takes "
            "any LiteLLM model id, e.g. --provider other --model gemini/gemini-2.5-flash)."
        )
    return found


def default_alias(prov: Provider, litellm_model: str) -> str:
    """The name callers will use: the catalog's, else one made from the model id."""
    known = prov.catalog_alias(litellm_model)
    if known:
        return known
    bare = litellm_model.split("/", 1)[1] if "/" in litellm_model else litellm_model
    if prov.name == "ollama":
        return "ollama-" + bare.replace(":", "-")
    return bare.rsplit("/", 1)[-1]


def check_alias(alias: str) -> str:
    alias = alias.strip()
    if not _ALIAS.fullmatch(alias):
        raise SetupError(
            f"{alias!r} cannot be a model name: use letters, digits and . _ : / - (no spaces)."
        )
    return alias


def key_vars_for(prov: Provider, litellm_model: str) -> tuple[str, ...]:
    """The variables the gateway reads for this model's key (none for Ollama)."""
    if prov.name != "other":
        return prov.key_vars
    return tuple(_litellm_check(litellm_model)["missing_keys"])


def key_url(prov: Provider, litellm_model: str) -> str:
    if prov.key_url:
        return prov.key_url
    return f"https://docs.litellm.ai/docs/providers/{litellm_model.split('/', 1)[0]}"


def check_other_model(litellm_model: str) -> str:
    """A LiteLLM model id LiteLLM knows the provider of; raises ``SetupError`` otherwise."""
    litellm_model = litellm_model.strip()
    if "/" not in litellm_model:
        raise SetupError(
            f"{litellm_model!r} is not a LiteLLM model id: write <provider>/<model>, e.g. "
            "gemini/gemini-2.5-flash or groq/llama-3.3-70b-versatile "
            "(providers: https://docs.litellm.ai/docs/providers)."
        )
    _litellm_check(litellm_model)
    return litellm_model


def _litellm_check(litellm_model: str) -> dict:
    """LiteLLM's view of a model id: its provider must exist; which key variables are unset.

    Variables LiteLLM lists as missing although set in ``./.env`` are dropped by the caller; here
    only the process environment counts, as LiteLLM sees it.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    # Importing LiteLLM loads a .env into os.environ; setup must keep seeing the environment the
    # user's shell gave it, or it would take the file's old values for the shell's.
    saved = dict(os.environ)
    try:
        return _ask_litellm(litellm_model)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _ask_litellm(litellm_model: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # LiteLLM prints hints on errors
        import litellm

        litellm.suppress_debug_info = True
        try:
            litellm.get_llm_provider(litellm_model)
        except Exception:
            raise SetupError(
                f"LiteLLM does not know the provider of {litellm_model!r}: write "
                "<provider>/<model> with a provider from https://docs.litellm.ai/docs/providers."
            ) from None
        found = litellm.validate_environment(model=litellm_model)
    found["missing_keys"] = [k for k in found.get("missing_keys", []) if not k.endswith("_BASE")]
    return found
