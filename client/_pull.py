"""``z-explorer pull``: download the local models' checkpoints before the gateway needs them.

The local models are the ``zlocal/...`` entries of ``proxy_config.yaml``, with their settings as
the gateway reads them (``custom_handlers.inference.catalog``; the ``LOCAL_LLM_*`` defaults and
``HF_TOKEN`` from the environment, else ``./.env``). Each one's files go where the gateway's
loader looks for them, the Hugging Face cache (``custom_handlers.inference.download``), so its
first request loads at once instead of downloading gigabytes first.

Progress goes to stderr: a bar on a terminal, plain lines otherwise. What each model got goes to
stdout, one line per model. Exit status: 0 done, 1 a download failed (the others still ran),
2 an unknown model name, 130 interrupted (what came is kept: run it again to resume).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from client._errors import ClientError
from client._gateway_config import GatewayConfig, config_path
from custom_handlers.inference.catalog import ConfigError, LocalEntry, local_entries, read_config
from custom_handlers.inference.download import (
    DownloadError,
    DownloadResult,
    LogProgress,
    Plan,
    Progress,
    download,
    size_text,
)

ENV_FILE = ".env"
ENV_FILE_VARS = ("LOCAL_LLM_", "HF_TOKEN")  # what pull takes from ./.env, as the gateway would
INTERRUPTED = 130
UNKNOWN_NAME = 2


class PullError(ClientError):
    """The models to pull cannot be read from proxy_config.yaml."""


def pull(names: list[str], out: Console, err: Console) -> int:
    """Pull the local models named (all without names); returns the exit status."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry notes would break the one-line errors
    config = GatewayConfig(config_path())
    with _env_file_defaults():
        entries = _local_entries(config)
        wanted = _choose(names, entries, config.models(), err)
        return UNKNOWN_NAME if wanted is None else _pull_each(wanted, out, err)


def _pull_each(wanted: list[LocalEntry], out: Console, err: Console) -> int:
    failed = 0
    for entry in wanted:
        try:
            with _progress(err) as progress:
                result = download(entry.settings, progress)
        except DownloadError as exc:
            _error(err, f"{entry.name}: {exc.message}")
            failed += 1
            continue
        except KeyboardInterrupt:
            _error(
                err,
                f"interrupted while downloading {entry.name}: what was downloaded is kept; run "
                "z-explorer pull again to resume.",
            )
            return INTERRUPTED
        out.print(Text(describe(entry, result)))
    return 1 if failed else 0


def describe(entry: LocalEntry, result: DownloadResult) -> str:
    """One line: the model, its checkpoint, files and size, and where they are."""
    if result.local:
        return (
            f"{entry.name}: {result.folder} is a local folder ({len(result.files)} files, "
            f"{size_text(result.total_bytes)}): already present, nothing to download."
        )
    folders = sorted({name.rsplit("/", 1)[0] + "/" for name in result.files if "/" in name})
    within = f" ({', '.join(folders)})" if folders else ""
    what = f"{entry.name}: {result.checkpoint}{within}: {len(result.files)} files, "
    what += size_text(result.total_bytes)
    if result.already_present:
        unchecked = "" if result.hub_checked else " (the Hub was not reached to look for updates)"
        return f"{what}: already present in {result.folder}{unchecked}"
    return f"{what}: downloaded {size_text(result.fetched_bytes)} to {result.folder}"


def _local_entries(config: GatewayConfig) -> list[LocalEntry]:
    """The local entries with their settings (``LOCAL_LLM_*`` as the defaults)."""
    try:
        return local_entries(read_config(config.path), source=str(config.path))
    except ConfigError as exc:
        raise PullError(str(exc)) from None


@contextmanager
def _env_file_defaults() -> Iterator[None]:
    """``./.env``'s ``LOCAL_LLM_*`` and ``HF_TOKEN`` where the environment has none, as the
    gateway sees them (LiteLLM loads ``./.env`` when it starts), for this block only."""
    from dotenv import dotenv_values

    found = dotenv_values(ENV_FILE) if os.path.isfile(ENV_FILE) else {}
    extra = {
        k: v
        for k, v in found.items()
        if k.startswith(ENV_FILE_VARS) and v is not None and k not in os.environ
    }
    os.environ.update(extra)
    try:
        yield
    finally:
        for name in extra:
            os.environ.pop(name, None)


def _choose(
    names: list[str], entries: list[LocalEntry], models: dict[str, str], err: Console
) -> list[LocalEntry] | None:
    """The entries named (every one without names); None after saying a name is unknown."""
    by_name = {entry.name: entry for entry in entries}
    local = ", ".join(by_name) or "none"
    unknown = [name for name in names if name not in models]
    if unknown:
        _error(
            err,
            f"{config_path()} has no model named {', '.join(map(repr, unknown))}; its local "
            f"models: {local}.",
        )
        return None
    for name in names:
        if name not in by_name:
            _note(err, f"{name} is not a local model ({models[name]}): it needs no download.")
    if not names and not entries:
        _note(err, f"{config_path()} declares no local model (zlocal/...): nothing to download.")
    return [by_name[name] for name in dict.fromkeys(names or by_name) if name in by_name]


@contextmanager
def _progress(err: Console) -> Iterator[Progress]:
    if not err.is_terminal:
        yield LogProgress(lambda line: err.print(Text(line)), every_s=5.0)
        return
    bar = BarProgress(err)
    try:
        yield bar
    finally:
        bar.close()


class BarProgress(Progress):
    """A rich progress bar on a terminal: one row per model while its files come."""

    def __init__(self, console: Console):
        self._console = console
        self._bar: RichProgress | None = None
        self._task = None

    def planned(self, plan: Plan) -> None:
        if not plan.missing:
            return
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[file]}", style="dim"),
            console=self._console,
        )
        self._bar.start()
        self._task = self._bar.add_task(
            plan.checkpoint, total=plan.total_bytes, completed=plan.present_bytes, file=""
        )

    def file_started(self, name: str, size: int | None, resumed_at: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, file=name, advance=resumed_at)

    def advanced(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes)

    def waiting(self, message: str) -> None:
        self._console.print(Text(message, style="yellow"))

    def finished(self, result: DownloadResult) -> None:
        if self._bar is not None:
            self._bar.update(self._task, file="")
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _note(err: Console, message: str) -> None:
    err.print(Text(message, style="dim"))


def _error(err: Console, message: str) -> None:
    err.print(Text.assemble(("error: ", "bold red"), " ".join(message.split())))
