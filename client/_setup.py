"""``z-explorer setup``'s model: a ``Choice`` (what the user picked), a ``Plan`` (the exact changes
to ``./.env`` and ``proxy_config.yaml``), and ``apply`` (the only step that writes).

Every model is a ``proxy_config.yaml`` entry and ``LLM_MODEL`` names it: a cloud model's entry, or
a local one's (``zlocal/<repo id or folder>``, ``_local_entries``); an entry that is already there
is used, not written again.

The wizard (``_wizard.py``) and the command-line options both end in a ``Choice``. ``make_plan``
compares it with what the files already say, so re-running setup changes only what the user
changed, and nothing is written until ``apply``: a cancelled wizard leaves every file as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from client._config import write_env_file
from client._gateway_config import Entry, GatewayConfig
from client._local_entries import (
    Defaults,
    Loads,
    alias_of,
    find_or_make,
    kept_vars_note,
    loads,
)
from client._providers import (
    PROVIDERS,
    SetupError,
    check_alias,
    check_other_model,
    default_alias,
    key_url,
    key_vars_for,
    provider,
)
from client._setup_checks import check_local_folder, ollama_status, z_image_cache_note
from custom_handlers.inference.catalog import is_local
from custom_handlers.inference.settings import DEFAULT_MODEL as DEFAULT_LOCAL_SOURCE

ENV_FILE = Path(".env")
LOCAL_ALIAS = "qwen3-4b"  # the shipped entry of the default checkpoint
# bitsandbytes (the default checkpoint's 4-bit format) is installed on Linux only.
MAC_LOCAL_SOURCE = "Qwen/Qwen3-4B-Instruct-2507"
Z_IMAGE_SOURCE = "Tongyi-MAI/Z-Image-Turbo"
Z_IMAGE_ALIAS = "z-image-text-encoder"
Z_IMAGE_FOLDERS = {"subfolder": "text_encoder", "tokenizer_subfolder": "tokenizer"}
MASTER_KEY = "LITELLM_MASTER_KEY"
# What only the client reads; any other change needs the gateway restarted.
CLIENT_VARS = frozenset(
    {"LLM_MODEL", "LITELLM_PROXY_API_BASE", "LITELLM_PROXY_API_KEY", "LOCAL_LIBRARY_DIR"}
)
ENV_HEADER = (
    "Z-Explorer settings, read by the gateway and by the z-explorer command.\n"
    "Written by `z-explorer setup`; keep it private. Every variable: env.example."
)
NOTES = {
    MASTER_KEY: "The gateway's key (made by z-explorer setup). Clients send it as their API key.",
    "LLM_MODEL": "The model z-explorer uses: a model_name from proxy_config.yaml.",
}

KINDS = ("local", "cloud", "z-image")


@dataclass(frozen=True)
class Choice:
    """What the user picked. ``kind`` is local, cloud, z-image, or client (client settings only)."""

    kind: str
    local_source: str | None = None  # local, z-image: repo id or folder (None: the default)
    litellm_model: str | None = None
    alias: str | None = None  # cloud: the model_name; local, z-image: one the user gave
    keys_to_store: dict[str, str] = field(default_factory=dict)
    client: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    env_path: Path
    env_before: dict[str, str]
    env_changes: dict[str, str | None]
    config: GatewayConfig | None
    new_model: Entry | None = None
    notes: list[str] = field(default_factory=list)  # shown with the changes, changing nothing

    @property
    def empty(self) -> bool:
        return not self.env_changes and self.new_model is None

    @property
    def gateway_side(self) -> bool:
        """Whether a running gateway must be restarted to see these changes."""
        return self.new_model is not None or any(k not in CLIENT_VARS for k in self.env_changes)

    def summary(self) -> list[str]:
        lines = []
        if self.new_model:
            lines.append(f"{self.config.path}: add model {_described(self.new_model)}")
        for name, value in self.env_changes.items():
            if value is None:
                lines.append(f"{self.env_path}: remove {name}")
                continue
            was = self.env_before.get(name)
            before = f" (was {_shown(name, was)})" if was is not None else ""
            lines.append(f"{self.env_path}: {name}={_shown(name, value)}{before}")
        return lines + self.notes

    def shadowed(self) -> list[str]:
        """Names this plan writes that the process environment sets otherwise (and so wins)."""
        return [
            name
            for name, value in self.env_changes.items()
            if value is not None and name in os.environ and os.environ[name] != value
        ]


def read_env(path: Path = ENV_FILE) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def effective(name: str, env_file: dict[str, str]) -> str | None:
    """A variable as the programs will see it: the environment, else ./.env."""
    return os.environ.get(name) or env_file.get(name) or None


def default_local_source() -> str:
    return MAC_LOCAL_SOURCE if sys.platform == "darwin" else DEFAULT_LOCAL_SOURCE


def has_nvidia_gpu() -> bool:
    """A cheap hint without importing torch: the NVIDIA driver's tool is installed."""
    return shutil.which("nvidia-smi") is not None


def make_plan(choice: Choice, config: GatewayConfig | None, env_path: Path = ENV_FILE) -> Plan:
    before = read_env(env_path)
    wanted: dict[str, str | None] = dict(choice.client)
    new_model, notes = None, []
    if choice.kind in ("local", "z-image"):
        wanted["LLM_MODEL"], new_model, notes = _local_entry(choice, config, before, env_path)
    elif choice.kind == "cloud":
        new_model = _cloud_entry(choice, config)
        wanted["LLM_MODEL"] = choice.alias
        wanted.update(choice.keys_to_store)
    if choice.kind != "client" and not effective(MASTER_KEY, before):
        wanted[MASTER_KEY] = "sk-" + secrets.token_urlsafe(32)
    changes = {
        name: value
        for name, value in wanted.items()
        if before.get(name) != value and not (value is None and name not in before)
    }
    return Plan(env_path, before, changes, config, new_model, notes)


def _local_entry(
    choice: Choice, config: GatewayConfig | None, env_file: dict[str, str], env_path: Path
) -> tuple[str, Entry | None, list[str]]:
    """The entry of the local model picked (``LLM_MODEL``), one to add if the file has none,
    and what the ``LOCAL_LLM_*`` lines of an earlier setup, left in ./.env, mean for it."""
    if config is None:
        raise SetupError("A local model needs the gateway's proxy_config.yaml.")
    if choice.kind == "z-image":
        want = Loads(choice.local_source or Z_IMAGE_SOURCE, **Z_IMAGE_FOLDERS)
        names = [Z_IMAGE_ALIAS]
    else:
        want = Loads(choice.local_source or default_local_source())
        names = [alias_of(want.checkpoint)]
        if want.checkpoint == default_local_source():
            names.insert(0, LOCAL_ALIAS)
    alias, new = find_or_make(
        config,
        want,
        alias=choice.alias,
        names=names,
        prefer=effective("LLM_MODEL", env_file),
        env_file=env_file,
    )
    entry = new or next(e for e in config.entries() if e.name == alias)
    note = kept_vars_note(entry, env_file, str(env_path))
    return alias, new, [note] if note else []


def _cloud_entry(choice: Choice, config: GatewayConfig | None) -> Entry | None:
    if config is None:
        raise SetupError("A cloud model needs the gateway's proxy_config.yaml.")
    existing = config.models().get(choice.alias)
    if existing is None:
        return Entry(choice.alias, choice.litellm_model)
    if existing != choice.litellm_model:
        raise SetupError(
            f"{config.path} already has a model named {choice.alias!r} (it calls {existing}): "
            f"choose another name for {choice.litellm_model} (--alias)."
        )
    return None


def apply(plan: Plan) -> None:
    """Write the plan: proxy_config.yaml first, then ./.env, each atomically; Ctrl-C waits."""
    with _no_interrupt():
        if plan.new_model and plan.config is not None:
            new = plan.new_model
            plan.config.add_model(new.name, new.model, params=new.params, model_info=new.info)
            plan.config.save()
        if plan.env_changes:
            notes = {k: v for k, v in NOTES.items() if k in plan.env_changes}
            write_env_file(plan.env_path, plan.env_changes, notes=notes, header=ENV_HEADER)
            os.chmod(plan.env_path, 0o600)


@contextmanager
def _no_interrupt():
    """Ctrl-C while the files are written takes effect after, never between the two files."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (tests): nothing to protect against
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def key_status(name: str, env_file: dict[str, str]) -> str | None:
    """Where a provider key is set: 'environment', '.env', or None."""
    if os.environ.get(name):
        return "environment"
    if env_file.get(name):
        return ".env"
    return None


def current_choice(config: GatewayConfig | None, env_file: dict[str, str]) -> Choice:
    """What the files (and the environment) say now, as a Choice: the wizard's defaults. A local
    entry gives the checkpoint it loads; one with subfolders is taken for Z-Image's."""
    model = effective("LLM_MODEL", env_file) or LOCAL_ALIAS
    entry = next((e for e in config.entries() if e.name == model), None) if config else None
    if entry is None and model == LOCAL_ALIAS:
        return Choice("local")
    if entry is not None and is_local(entry.model):
        loaded = loads(entry, Defaults.read(env_file))
        return Choice("z-image" if loaded.subfolder else "local", local_source=loaded.checkpoint)
    return Choice("cloud", litellm_model=entry.model if entry else None, alias=model)


def provider_of(litellm_model: str | None) -> str:
    prefix = (litellm_model or "").split("/", 1)[0]
    if prefix in ("ollama", "ollama_chat"):
        return "ollama"
    return prefix if prefix in PROVIDERS and prefix != "other" else "other"


def _described(entry: Entry) -> str:
    """``name (model, key: value, ...)``: the entry's settings as the YAML will say them."""
    settings = {**entry.params, **entry.info}
    said = [entry.model, *(f"{k}: {_yaml_scalar(v)}" for k, v in settings.items())]
    return f"{entry.name} ({', '.join(said)})"


def _yaml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


def _shown(name: str, value: str) -> str:
    """A value fit to print: secrets show only their first 3 and last 4 characters."""
    if not {"KEY", "TOKEN", "SECRET", "PASSWORD"} & set(name.split("_")):
        return value
    return f"{value[:3]}…{value[-4:]}" if len(value) >= 16 else "****"


def options_choice(
    *,
    local: bool,
    z_image: bool,
    provider_name: str | None,
    model: str | None,
    alias: str | None,
    local_model: str | None,
    save_key: bool,
    config: GatewayConfig,
    env_file: dict[str, str],
) -> Choice:
    """The Choice that setup's command-line options make (no questions asked)."""
    if save_key and not provider_name:
        raise SetupError("--save-key goes with --provider.")
    if alias and not (provider_name or local or z_image):
        raise SetupError("--alias goes with --provider, --local or --z-image.")
    if local_model and not (local or z_image):
        raise SetupError("--local-model goes with --local or --z-image.")
    if local or z_image:
        if model:
            raise SetupError(
                "--model names a cloud model: give the local checkpoint with --local-model."
            )
        folders = Z_IMAGE_FOLDERS if z_image else None
        source = check_local_folder(local_model, folders) if local_model else None
        name = check_alias(alias) if alias else None
        return Choice("z-image" if z_image else "local", local_source=source, alias=name)
    if provider_name:
        return _cloud_choice(provider(provider_name), model, alias, save_key, config, env_file)
    current = current_choice(config, env_file)  # --yes alone: keep what is there
    if current.kind == "cloud" and current.litellm_model is None:
        raise SetupError(
            f"LLM_MODEL={current.alias} is not a model in {config.path}: choose one with "
            "--local, --z-image or --provider."
        )
    return current


def _cloud_choice(prov, model, alias, save_key, config, env_file) -> Choice:
    if prov.name == "other" and not model:
        raise SetupError(
            "--provider other needs --model <provider>/<model>, e.g. gemini/gemini-2.5-flash."
        )
    model_id = model or prov.models[0].id
    if prov.name == "other":
        litellm_model = check_other_model(model_id)
    else:
        litellm_model = prov.litellm_model(model_id)
    name = check_alias(alias) if alias else None
    name = name or config.alias_for(litellm_model) or default_alias(prov, litellm_model)
    keys = {}
    for var in key_vars_for(prov, litellm_model) if save_key else ():
        if os.environ.get(var):
            keys[var] = os.environ[var]
        elif not env_file.get(var):
            raise SetupError(
                f"--save-key saves {var} from the environment, and it is not set there: "
                f"`export {var}=<your key>` (get one at {key_url(prov, litellm_model)}), then "
                "run setup again."
            )
    return Choice("cloud", litellm_model=litellm_model, alias=name, keys_to_store=keys)


def advice(choice: Choice, env_file: dict[str, str]) -> list[str]:
    """What to know after saving: for each key the chosen cloud model still lacks, where to get
    it and the export line; for Ollama, whether it answers; for a local model, a missing GPU or
    a Z-Image download."""
    if choice.kind == "z-image":
        return [z_image_cache_note(choice.local_source or Z_IMAGE_SOURCE)]
    if choice.kind == "local" and not has_nvidia_gpu():
        return ["No NVIDIA GPU found (nvidia-smi): the local model will run on the CPU, slowly."]
    if choice.kind != "cloud":
        return []
    prov = PROVIDERS[provider_of(choice.litellm_model)]
    if prov.name == "ollama":
        return [ollama_status(choice.litellm_model.split("/", 1)[1])]
    missing = [v for v in key_vars_for(prov, choice.litellm_model) if not key_status(v, env_file)]
    if not missing:
        return []
    url = key_url(prov, choice.litellm_model)
    if prov.name == "other":
        where = f"LiteLLM looks for {' or '.join(missing)} for {choice.litellm_model} (see {url})"
    else:
        where = f"{missing[0]} is not set. Get a key at {url}"
    return [
        f"{where}, then, in the shell where you start the gateway (nothing is saved to disk):",
        *(f"  export {var}=<your key>" for var in missing),
    ]
