"""``z-explorer setup``'s local models: the ``zlocal/...`` entry of ``proxy_config.yaml`` that
loads what the user picked, found again if the file has one, else made.

An entry is known by what the gateway loads for it (``Loads``): its checkpoint and the folders of
its weights and tokenizer, with the ``LOCAL_LLM_*`` defaults applied as the gateway applies them
(``custom_handlers.inference.catalog``: the environment, else ``./.env``; a bare name such as the
shipped ``zlocal/qwen3-4b`` is ``LOCAL_LLM_MODEL``). So re-running setup finds the entry it wrote,
and the shipped entry counts as the default checkpoint's as long as ``LOCAL_LLM_MODEL`` says so.

An entry setup writes names its checkpoint (a repo id, or a folder as an absolute path) and the
subfolders it needs, so it does not depend on ``LOCAL_LLM_MODEL`` or on the subfolder variables an
earlier setup wrote into ``./.env``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from client._gateway_config import Entry, GatewayConfig
from client._providers import SetupError
from client._setup_checks import looks_like_path
from custom_handlers.inference.catalog import PREFIX, checkpoint_of, is_local
from custom_handlers.inference.settings import DEFAULT_MODEL

# As the shipped entry has them (see its comments): no same-model retries, no health-check loads.
LOCAL_PARAMS = {"num_retries": 0}
LOCAL_INFO = {"disable_background_health_check": True}
# What an earlier setup wrote into ./.env for the local model; still every local entry's defaults.
SETUP_VARS = ("LOCAL_LLM_MODEL", "LOCAL_LLM_SUBFOLDER", "LOCAL_LLM_TOKENIZER_SUBFOLDER")
_NOT_IN_ALIAS = re.compile(r"[^a-z0-9._-]+")


@dataclass(frozen=True)
class Loads:
    """What the gateway loads for a local entry."""

    checkpoint: str  # a repo id, or an absolute folder
    subfolder: str = ""  # of the weights ("" : the top level)
    tokenizer_subfolder: str = ""


@dataclass(frozen=True)
class Defaults:
    """The ``LOCAL_LLM_*`` values an entry's ``model_info`` does not override."""

    model: str = DEFAULT_MODEL
    subfolder: str = ""
    tokenizer_subfolder: str | None = None  # None: the same as subfolder

    @classmethod
    def read(cls, env_file: Mapping[str, str]) -> Defaults:
        def value(name: str) -> str | None:
            return os.environ.get(name, env_file.get(name))

        return cls(
            value("LOCAL_LLM_MODEL") or DEFAULT_MODEL,
            value("LOCAL_LLM_SUBFOLDER") or "",
            value("LOCAL_LLM_TOKENIZER_SUBFOLDER"),
        )


def loads(entry: Entry, defaults: Defaults) -> Loads:
    """What the gateway loads for ``entry`` (a ``zlocal/...`` one) with these defaults."""
    checkpoint = checkpoint_of(entry.model[len(PREFIX) :], defaults.model)
    if looks_like_path(checkpoint):
        checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
    subfolder = _folder(entry.info.get("subfolder", defaults.subfolder))
    tokenizer = entry.info.get("tokenizer_subfolder", defaults.tokenizer_subfolder)
    return Loads(checkpoint, subfolder, subfolder if tokenizer is None else _folder(tokenizer))


def find_or_make(
    config: GatewayConfig,
    want: Loads,
    *,
    alias: str | None,
    names: Iterable[str],
    prefer: str | None,
    env_file: Mapping[str, str],
) -> tuple[str, Entry | None]:
    """The name ``LLM_MODEL`` gets for ``want``, and the entry to add (None: the file has one).

    ``alias``: the name the user gave; an entry of that name must load ``want``. Else the entry
    named ``prefer`` (``LLM_MODEL`` now) or the first that loads ``want``; else a new entry named
    after the first free one of ``names``, or the last of them made unique.
    """
    defaults = Defaults.read(env_file)
    entries = config.entries()
    if alias is not None:
        same = next((e for e in entries if e.name == alias), None)
        if same is None:
            return alias, _entry(alias, want, defaults)
        if is_local(same.model) and loads(same, defaults) == want:
            return alias, None
        raise SetupError(
            f"{config.path} already has a model named {alias!r} (it calls {same.model}): choose "
            f"another name for {PREFIX}{want.checkpoint} (--alias)."
        )
    found = [e.name for e in entries if is_local(e.model) and loads(e, defaults) == want]
    if found:
        return (prefer if prefer in found else found[0]), None
    name = _free_name(list(names), {e.name for e in entries})
    return name, _entry(name, want, defaults)


def alias_of(checkpoint: str) -> str:
    """A ``model_name`` made from a checkpoint: its last path component, lower-cased."""
    last = checkpoint.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    return _NOT_IN_ALIAS.sub("-", last).strip("-._") or "local-model"


def kept_vars_note(entry: Entry, env_file: Mapping[str, str], where: str) -> str | None:
    """What the local settings an earlier setup left in ``./.env`` (``where``) mean for
    ``entry``: setup leaves them, as other local entries (the shipped one) may rely on them."""
    kept = [name for name in SETUP_VARS if name in env_file]
    if not kept:
        return None
    without = {k: v for k, v in env_file.items() if k not in SETUP_VARS}
    depends = loads(entry, Defaults.read(env_file)) != loads(entry, Defaults.read(without))
    what = "loads what these lines say" if depends else "does not depend on these lines"
    return (
        f"{where}: kept {', '.join(kept)} (the defaults of local entries that do not set their "
        f"own): {entry.name} {what}"
    )


def _entry(name: str, want: Loads, defaults: Defaults) -> Entry:
    """An entry that loads ``want`` whatever ``LOCAL_LLM_MODEL`` says; an empty subfolder is
    written only when ``LOCAL_LLM_SUBFOLDER`` (or the tokenizer's) would otherwise apply."""
    folders = {"subfolder": want.subfolder, "tokenizer_subfolder": want.tokenizer_subfolder}
    info = {k: v for k, v in folders.items() if v}
    if loads(Entry(name, PREFIX + want.checkpoint, info=info), defaults) != want:
        info = folders
    return Entry(name, PREFIX + want.checkpoint, dict(LOCAL_PARAMS), {**info, **LOCAL_INFO})


def _free_name(names: list[str], taken: set[str]) -> str:
    for name in names:
        if name not in taken:
            return name
    number = 2
    while f"{names[-1]}-{number}" in taken:
        number += 1
    return f"{names[-1]}-{number}"


def _folder(value: object) -> str:
    return str(value or "").strip().strip("/")
