"""The client's settings: environment variables, then ``./.env``, then defaults.

Where a value comes from, highest first:

1. keyword arguments to ``load_settings(...)`` (the CLI's ``--model``);
2. the process environment;
3. ``.env`` in the current working directory;
4. the defaults below.

A name beats its fallback wherever each one is set: ``LITELLM_PROXY_API_KEY`` beats
``LITELLM_MASTER_KEY`` and ``LLM_MODEL`` beats the deprecated ``LLM_REPO``, even when the fallback
is in the environment and the preferred name only in ``.env``.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from client._errors import ConfigurationError

DEFAULT_MODEL = "qwen3-4b"
DEFAULT_TIMEOUT = 300.0
# The old app's LLM_MODE values that loaded a model in-process. Recognised, explained, not fatal.
OLD_LOCAL_MODES = ("hf_download", "hf_local", "z_image", "gguf")
KNOWN_MODES = ("litellm", *OLD_LOCAL_MODES)


class Settings(BaseSettings):
    """Where the gateway is, which key and model to use, where the variable library lives."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=True
    )

    api_base: str = Field(
        "http://localhost:4000",
        validation_alias="LITELLM_PROXY_API_BASE",
        description="URL of the gateway (the LiteLLM proxy), with or without a trailing /v1.",
    )
    proxy_api_key: SecretStr | None = Field(
        None,
        validation_alias="LITELLM_PROXY_API_KEY",
        description="The gateway key the client sends as its API key.",
    )
    master_key: SecretStr | None = Field(
        None,
        validation_alias="LITELLM_MASTER_KEY",
        description="The gateway's own key; used when LITELLM_PROXY_API_KEY is unset.",
    )
    model: str | None = Field(
        None,
        validation_alias="LLM_MODEL",
        description=f"A model_name from proxy_config.yaml; {DEFAULT_MODEL} when unset.",
    )
    repo: str | None = Field(
        None,
        validation_alias="LLM_REPO",
        description="Deprecated: the old app's model setting; used when LLM_MODEL is unset.",
    )
    mode: str | None = Field(
        None,
        validation_alias="LLM_MODE",
        description="Deprecated: the old app's LLM mode. 'litellm' is accepted; the old local "
        "modes are explained and ignored (the gateway serves the local model now).",
    )
    library_dir: Path = Field(
        Path("library"),
        validation_alias="LOCAL_LIBRARY_DIR",
        description="Folder of prompt variables: NAME.md or NAME.txt, one value per line.",
    )
    # Kept as given and checked by problems(), so a bad value is reported with the others.
    timeout: float | str = Field(
        DEFAULT_TIMEOUT,
        validation_alias="LLM_TIMEOUT",
        description="Seconds to wait for one answer (the first local request loads the model).",
    )

    @property
    def api_key(self) -> str | None:
        """The key to send: LITELLM_PROXY_API_KEY, else LITELLM_MASTER_KEY."""
        for secret in (self.proxy_api_key, self.master_key):
            if secret is not None and secret.get_secret_value().strip():
                return secret.get_secret_value().strip()
        return None

    @property
    def key_source(self) -> str | None:
        if self.proxy_api_key is not None and self.proxy_api_key.get_secret_value().strip():
            return "LITELLM_PROXY_API_KEY"
        return "LITELLM_MASTER_KEY" if self.api_key else None

    @property
    def model_name(self) -> str:
        """The model to ask for: LLM_MODEL, else a usable LLM_REPO, else the default."""
        if self.model:
            return self.model.strip()
        if self.repo and not _is_hub_repo(self.repo):
            return self.repo.strip()
        return DEFAULT_MODEL

    @property
    def model_source(self) -> str:
        if self.model:
            return "LLM_MODEL"
        if self.repo and not _is_hub_repo(self.repo):
            return "LLM_REPO"
        return "default"

    @property
    def timeout_seconds(self) -> float:
        """LLM_TIMEOUT as a number (the default when it is not a positive number)."""
        seconds = _positive_number(self.timeout)
        return DEFAULT_TIMEOUT if seconds is None else seconds

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's base URL: the gateway's URL ending in /v1."""
        url = self.api_base.strip().rstrip("/")
        return url if url.endswith("/v1") else f"{url}/v1"

    @property
    def gateway_url(self) -> str:
        """The gateway's URL without /v1 (for /health/liveliness and messages)."""
        url = self.api_base.strip().rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def notices(self) -> list[str]:
        """Deprecations and explanations worth showing the user; none of them is fatal."""
        found = []
        if self.repo and not self.model:
            found.append(_repo_notice(self.repo))
        mode = (self.mode or "").strip().lower()
        if mode in OLD_LOCAL_MODES:
            found.append(
                f"LLM_MODE={mode} is from the old app, which loaded the model itself; it is "
                "ignored. The gateway serves the local model now: set LOCAL_LLM_MODEL for the "
                f"gateway (see proxy_config.yaml) and pick a model here with LLM_MODEL "
                f"(now {self.model_name}). Remove LLM_MODE to silence this."
            )
        return found

    def problems(self) -> list[str]:
        """Everything that would stop the client from working, one sentence each."""
        found = []
        parts = urlsplit(self.api_base.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            found.append(
                f"LITELLM_PROXY_API_BASE={self.api_base!r} is not an http(s) URL; set it to the "
                "gateway's address, e.g. http://localhost:4000."
            )
        if self.api_key is None:
            found.append(
                "No gateway key: set LITELLM_PROXY_API_KEY (or LITELLM_MASTER_KEY) to the "
                "gateway's LITELLM_MASTER_KEY, in the environment or in ./.env. "
                "`uv run z-explorer-gateway` creates one and saves it in the project's .env."
            )
        if not self.model_name or any(c.isspace() for c in self.model_name):
            found.append(
                f"LLM_MODEL={self.model_name!r} is not a model name; use a model_name from "
                f"proxy_config.yaml such as {DEFAULT_MODEL}."
            )
        mode = (self.mode or "").strip().lower()
        if mode and mode not in KNOWN_MODES:
            found.append(
                f"LLM_MODE={self.mode!r} is unknown; remove it (the client always uses the "
                "gateway) and choose the model with LLM_MODEL."
            )
        if _positive_number(self.timeout) is None:
            found.append(f"LLM_TIMEOUT={self.timeout!r} is not a number of seconds above 0.")
        if self.library_dir.exists() and not self.library_dir.is_dir():
            found.append(f"LOCAL_LIBRARY_DIR={str(self.library_dir)!r} is a file, not a folder.")
        return found

    def validate(self) -> None:  # type: ignore[override]
        """Raise ``ConfigurationError`` listing every problem at once; return if there is none."""
        found = self.problems()
        if found:
            raise ConfigurationError(found)


def load_settings(*, warn: bool = True, **overrides: Any) -> Settings:
    """Read the settings (environment, then ./.env, then defaults) and apply ``overrides``.

    ``overrides`` take field names (``model="gpt-4o-mini"``); ``None`` values are ignored. A value
    that cannot be parsed (``LLM_TIMEOUT=soon``) raises ``ConfigurationError`` naming the
    variable, together with every other such value. With ``warn``, each notice (deprecated
    ``LLM_REPO``, an old ``LLM_MODE``) is issued as a ``FutureWarning``, which Python shows.
    """
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigurationError([_describe(error) for error in exc.errors()]) from None
    update = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(update) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if update:
        settings = settings.model_copy(update=update)
    if warn:
        for notice in settings.notices():
            warnings.warn(notice, FutureWarning, stacklevel=2)
    return settings


def _describe(error: dict) -> str:
    name = ".".join(str(part) for part in error.get("loc", ())) or "settings"
    return f"{name}={error.get('input')!r}: {error.get('msg', 'invalid value')}."


def _positive_number(value: float | str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if 0 < number < float("inf") else None


def _is_hub_repo(value: str) -> bool:
    """A Hugging Face repo id (``owner/name``): what the old app's LLM_REPO held."""
    return "/" in value.strip()


def _repo_notice(repo: str) -> str:
    if _is_hub_repo(repo):
        return (
            f"LLM_REPO is deprecated and {repo!r} is a Hugging Face checkpoint, which the old app "
            f"loaded itself. The gateway loads local models now: set LOCAL_LLM_MODEL={repo} for "
            f"the gateway. This client uses the gateway's {DEFAULT_MODEL}; set LLM_MODEL to "
            "choose another model and remove LLM_REPO."
        )
    return f"LLM_REPO is deprecated: rename it to LLM_MODEL (LLM_MODEL={repo})."


def write_env_file(
    path: Path,
    values: dict[str, str | None],
    *,
    notes: dict[str, str] | None = None,
    header: str | None = None,
) -> Path:
    """Set ``values`` in a .env file; every other line, comments included, is kept as it is.

    A name's existing line is replaced (every such line, so a later duplicate cannot win); a
    ``None`` value removes the name's lines. A name not in the file is appended, after its comment
    from ``notes`` if there is one. A new file starts with the comment ``header``. The file is
    rewritten atomically and left owner-only (it may hold a key).
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    if not path.is_file() and header:
        lines = [f"# {line}".rstrip() for line in header.splitlines()]
    pending = dict(values)
    kept: list[str] = []
    for line in lines:
        match = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        name = match.group(1) if match else None
        if name not in values:
            kept.append(line)
        elif values[name] is not None and name in pending:
            kept.append(_env_line(name, pending.pop(name)))
    for name, value in pending.items():
        if value is None:
            continue
        if notes and name in notes:
            kept += ["", *(f"# {line}".rstrip() for line in notes[name].splitlines())]
        kept.append(_env_line(name, value))
    folder = path.resolve().parent
    fd, tmp = tempfile.mkstemp(prefix=".env.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(kept) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _env_line(name: str, value: str) -> str:
    if re.fullmatch(r"[\w@%+=:,./~-]*", value):
        return f"{name}={value}"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{name}="{escaped}"'
