"""The local models ``proxy_config.yaml`` declares: one ``LocalEntry`` per ``zlocal/...`` entry.

An entry's checkpoint is what follows ``zlocal/``: a Hugging Face repo id (``Qwen/Qwen3-1.7B``)
or a local directory. A bare name without a slash that is no directory (the shipped
``zlocal/qwen3-4b``) is the default local model, ``LOCAL_LLM_MODEL``, which is how a ``.env``
written before models were declared in the YAML keeps working.

Its settings are the ``LOCAL_LLM_*`` variables with its ``model_info`` on top, under the same names
in lower case (``quantization: none``). A key that is neither one of ours nor one LiteLLM reads,
or a value out of range, is a ``ConfigError`` whose one line names the entry, the key and what is
allowed: a typo is never silently ignored. Read once, when the gateway starts.

Pure Python (pydantic and PyYAML): the gateway, ``z-explorer pull`` and the tests read it alike.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from custom_handlers.inference.settings import LocalModelSettings

PROVIDER = "zlocal"
PREFIX = f"{PROVIDER}/"
CONFIG_FILE = "proxy_config.yaml"
# LOCAL_LLM_* settings a model_info may not set, and why.
NOT_PER_MODEL = {
    "model": "the checkpoint is litellm_params.model (zlocal/<repo id or directory>)",
}


class ConfigError(ValueError):
    """A local entry of the configuration is wrong; the message is one line and says how."""


@dataclass(frozen=True)
class LocalEntry:
    """One local model: its name, the entry's ``litellm_params.model`` and its settings."""

    name: str
    model: str  # "zlocal/<id>", as written
    settings: LocalModelSettings  # .model is the checkpoint

    @property
    def checkpoint(self) -> str:
        return self.settings.model


def per_model_keys() -> list[str]:
    """The settings a ``model_info`` may set."""
    return [k for k in LocalModelSettings.model_fields if k not in NOT_PER_MODEL]


def is_local(litellm_model: Any) -> bool:
    return isinstance(litellm_model, str) and litellm_model.startswith(PREFIX)


def checkpoint_of(model_id: str, default: str | None) -> str | None:
    """The checkpoint ``zlocal/<model_id>`` names: a repo id or directory, else ``default``."""
    model_id = model_id.strip()
    if "/" in model_id or "\\" in model_id or model_id.startswith(("~", ".")):
        return model_id
    if model_id and Path(model_id).is_dir():
        return model_id
    return default


def read_config(path: str | Path) -> dict:
    """The YAML at ``path`` as a mapping (``ConfigError`` if it cannot be read as one)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        reason = str(exc).replace("\n", " ")
        raise ConfigError(f"{path}: cannot be read: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a LiteLLM proxy configuration (a mapping)")
    return data


def local_entries(
    config: Mapping[str, Any],
    *,
    source: str = CONFIG_FILE,
    foreign_keys: Collection[str] | None = None,
) -> list[LocalEntry]:
    """Every ``zlocal/...`` entry of ``config``'s ``model_list``, in file order.

    ``foreign_keys``: the ``model_info`` keys someone else reads (LiteLLM's); any other key that is
    not a setting is an error. None: other keys are not checked (a reader that only needs the
    checkpoints, like ``z-explorer pull``, need not import LiteLLM to know its keys).
    """
    try:
        defaults = LocalModelSettings()  # LOCAL_LLM_*: every local model's defaults
    except ValidationError as exc:
        raise ConfigError(f"{source}: local models: {problem_line(exc)}") from None
    entries: list[LocalEntry] = []
    for position, item in enumerate(config.get("model_list") or []):
        params = item.get("litellm_params") if isinstance(item, Mapping) else None
        if not isinstance(params, Mapping) or not is_local(params.get("model")):
            continue
        name = item.get("model_name")
        where = f"{source}: model_list[{position}]"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where} ({params['model']}): model_name is missing")
        where = f"{source}: model {name!r}"
        if any(e.name == name for e in entries):
            raise ConfigError(
                f"{where}: two local entries have this model_name; give each local model a name "
                "of its own"
            )
        info = item.get("model_info") or {}
        if not isinstance(info, Mapping):
            raise ConfigError(f"{where}: model_info must be a mapping of settings")
        if "*" in params["model"]:
            raise ConfigError(
                f"{where}: {params['model']} is a wildcard; a local model is an entry of its own, "
                "with its checkpoint written out (a caller must not choose what is loaded)"
            )
        checkpoint = checkpoint_of(params["model"][len(PREFIX) :], None)
        from_env = checkpoint is None
        settings = _settings(where, info, checkpoint or defaults.model, foreign_keys)
        settings.for_entry(name, checkpoint_from_env=from_env)
        entries.append(LocalEntry(name, params["model"], settings))
    return entries


def _settings(
    where: str, info: Mapping[str, Any], checkpoint: str, foreign: Collection[str] | None
) -> LocalModelSettings:
    ours = per_model_keys()
    for key in info:
        if key in NOT_PER_MODEL:
            raise ConfigError(
                f"{where}: model_info.{key} is not a per-model setting: {NOT_PER_MODEL[key]}"
            )
        if key not in ours and foreign is not None and key not in foreign:
            raise ConfigError(
                f"{where}: model_info.{key} is not a setting of local models; allowed: "
                f"{', '.join(ours)} (and LiteLLM's own model_info keys)"
            )
    values = {k: v for k, v in info.items() if k in ours}
    try:
        return LocalModelSettings(**values, model=checkpoint)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {problem_line(exc, values)}") from None


def problem_line(exc: ValidationError, given: Mapping[str, Any] | None = None) -> str:
    """The first problem: which setting (model_info's or the environment's), what is allowed."""
    error = exc.errors()[0]
    key = str(error["loc"][0]) if error["loc"] else "?"
    name = f"model_info.{key}" if key in (given or {}) else f"LOCAL_LLM_{key.upper()}"
    return f"{name}: {error['msg']} (got {error.get('input')!r})"
