"""A local model's checkpoint into the Hugging Face cache: exactly the files the loader reads.

``download(settings, progress)`` fetches, for a repo id, the config, weights and tokenizer of the
model's ``subfolder`` and ``tokenizer_subfolder`` and nothing else: from Z-Image's repo only
``text_encoder/`` and ``tokenizer/`` (not the gigabytes of image model beside them); from a plain
repo its config, safetensors (with their index), tokenizer and chat template files, never the
other weight formats (``*.bin`` only where there are no safetensors; ``*.gguf``, ``*.onnx``,
``original/``, ... never). A local directory needs nothing. ``is_cached(settings)`` says, without
the network, whether a load would find everything on disk.

The files land where transformers looks (``HF_HUB_CACHE``, ``HF_HOME/hub`` by default), so the
loader's ``from_pretrained`` finds them, offline too. Each file is fetched into
``blobs/<etag>.incomplete`` and only then renamed: an interrupted download (Ctrl-C, a dropped
connection, a killed process) resumes from there with an HTTP range request on the next run.
(huggingface_hub's own ``hf_hub_download`` deletes its partial file when interrupted, so it is
used here only to link a finished file into its snapshot.)

Errors, each one clear line in ``.message``::

    DownloadError                   anything else: the Hub's own error, an unexpected answer
     ├── RepoNotFoundError          no such repo (or a private one without HF_TOKEN)
     ├── GatedRepoError             the repo asks its users to accept terms: accept, set HF_TOKEN
     ├── HubUnreachableError        no network, HF_HUB_OFFLINE, a proxy in the way, the Hub
     │                              down or rate limiting (5xx, 429)
     ├── DiskFullError              not enough room in the cache
     └── NotLoadableError           the repo or folder lacks a config, weights or tokenizer there

Inference layer: imports huggingface_hub (a dependency of transformers), never LiteLLM.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from custom_handlers.inference.settings import LocalModelSettings

__all__ = [
    "DiskFullError",
    "DownloadError",
    "DownloadResult",
    "GatedRepoError",
    "HubUnreachableError",
    "LogProgress",
    "NotLoadableError",
    "Plan",
    "PlannedFile",
    "Progress",
    "RepoNotFoundError",
    "cached_folder",
    "download",
    "files_needed",
    "is_cached",
    "size_text",
]

# Files the loader reads beside the weights, in the model's folder and in the tokenizer's.
MODEL_FILES = frozenset({"config.json", "generation_config.json"})
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "config.json",  # AutoTokenizer reads it when tokenizer_config.json names no class
    }
)
# A tokenizer needs one of these (tokenizer_config.json alone is not one).
VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
CHAT_TEMPLATES_DIR = "additional_chat_templates"
# (single file, index of shards, shards' suffix): what transformers loads, safetensors first.
WEIGHTS = (
    ("model.safetensors", "model.safetensors.index.json", ".safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", ".bin"),
)
COMMIT = re.compile(r"^[0-9a-f]{40}$")
FOLDER_HINT = (
    ". Check the entry's model_info: subfolder (the folder with config.json and the weights; "
    "Z-Image: text_encoder) and tokenizer_subfolder (Z-Image: tokenizer)."
)


class DownloadError(Exception):
    """A checkpoint could not be downloaded; ``message`` is one line that says what to do."""

    def __init__(self, message: str, *, checkpoint: str | None = None):
        super().__init__(message)
        self.message = message
        self.checkpoint = checkpoint


class RepoNotFoundError(DownloadError):
    pass


class GatedRepoError(DownloadError):
    pass


class HubUnreachableError(DownloadError):
    pass


class DiskFullError(DownloadError):
    pass


class NotLoadableError(DownloadError):
    pass


@dataclass(frozen=True)
class PlannedFile:
    name: str  # path in the repo or directory, "/"-separated
    size: int | None
    present: bool  # already complete in the cache


@dataclass(frozen=True)
class Plan:
    """What one download will do: the files needed, which are there, where they go."""

    checkpoint: str
    folder: Path  # the snapshot folder in the cache (or the local directory)
    files: tuple[PlannedFile, ...]
    commit: str | None = None  # the repo's commit (None for a local directory)
    absent: tuple[str, ...] = ()  # files the loader looks for that the repo does not have

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def present_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if f.present)

    @property
    def missing(self) -> tuple[PlannedFile, ...]:
        return tuple(f for f in self.files if not f.present)


@dataclass(frozen=True)
class DownloadResult:
    checkpoint: str
    folder: Path  # where the loader finds the files: the snapshot folder, or the local directory
    files: tuple[str, ...]
    total_bytes: int  # of every needed file
    fetched_files: int = 0  # files that had to be fetched this time
    fetched_bytes: int = 0  # bytes received this time (a resumed file counts what was left)
    local: bool = False  # a local directory: nothing to download
    hub_checked: bool = True  # False: the Hub was unreachable and the complete cached copy is used

    @property
    def already_present(self) -> bool:
        return self.fetched_files == 0


class Progress:
    """What a download reports while it runs. Every method does nothing here: override those
    you show. One download calls them from one thread, in this order: ``planned`` once (not for a
    local directory), then per missing file ``file_started``, ``advanced`` (any number of times,
    a chunk's bytes each, negative if a server ignored a range request), ``file_finished``; and
    ``finished`` once at the end (not after an error)."""

    def planned(self, plan: Plan) -> None:
        pass

    def file_started(self, name: str, size: int | None, resumed_at: int) -> None:
        pass

    def advanced(self, nbytes: int) -> None:
        pass

    def file_finished(self, name: str) -> None:
        pass

    def waiting(self, message: str) -> None:
        """Something holds the download up (another process fetching the same file)."""

    def finished(self, result: DownloadResult) -> None:
        pass


class LogProgress(Progress):
    """Plain lines for a log or a pipe: the plan, one line per file started and finished, and
    the overall progress every ``every_fraction`` of the bytes or ``every_s`` seconds, whichever
    comes first (never a line per chunk). ``sink`` is a logger (lines at INFO) or a function
    taking a line."""

    def __init__(
        self,
        sink: logging.Logger | Callable[[str], None],
        *,
        every_s: float = 5.0,
        every_fraction: float = 0.1,
    ):
        self._write = sink.info if isinstance(sink, logging.Logger) else sink
        self._every_s = every_s
        self._every_fraction = every_fraction
        self._plan: Plan | None = None

    def planned(self, plan: Plan) -> None:
        self._plan = plan
        self._done = plan.present_bytes
        self._fetched = 0
        self._started = self._last_line = time.monotonic()
        self._next_fraction = self._every_fraction
        if not plan.missing:
            return
        already = f" ({size_text(plan.present_bytes)} already there)" if plan.present_bytes else ""
        self._write(
            f"Downloading {plan.checkpoint}: {len(plan.missing)} of {len(plan.files)} files, "
            f"{size_text(plan.total_bytes - plan.present_bytes)}{already}, into {plan.folder}"
        )

    def file_started(self, name: str, size: int | None, resumed_at: int) -> None:
        self._done += resumed_at
        resumed = f", resuming at {size_text(resumed_at)}" if resumed_at else ""
        known = size_text(size) if size is not None else "size unknown"
        self._write(f"  {name} ({known}{resumed})")

    def advanced(self, nbytes: int) -> None:
        self._done += nbytes
        self._fetched += nbytes
        plan, now = self._plan, time.monotonic()
        total = plan.total_bytes if plan else 0
        fraction = self._done / total if total else 0.0
        if fraction < self._next_fraction and now - self._last_line < self._every_s:
            return
        while self._next_fraction <= fraction:
            self._next_fraction += self._every_fraction
        self._last_line = now
        rate = self._fetched / max(now - self._started, 1e-6)
        self._write(
            f"  {plan.checkpoint if plan else ''}: {int(fraction * 100)}% "
            f"({size_text(self._done)} of {size_text(total)}), {size_text(rate)}/s"
        )

    def file_finished(self, name: str) -> None:
        self._write(f"  {name}: done")

    def waiting(self, message: str) -> None:
        self._write(f"  {message}")

    def finished(self, result: DownloadResult) -> None:
        if result.fetched_files:
            seconds = time.monotonic() - self._started
            self._write(
                f"Downloaded {result.checkpoint}: {len(result.files)} files, "
                f"{size_text(result.total_bytes)}, in {seconds:.1f} s, into {result.folder}"
            )


def size_text(count: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (``2.4 GiB``)."""
    value, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


# ---- which files ---------------------------------------------------------------------------------


def files_needed(repo_files: Iterable[str], settings: LocalModelSettings) -> list[str]:
    """The files of ``repo_files`` (a repo's or a directory's, "/"-separated) the loader reads.

    The model folder's config, generation config and weights (``model.safetensors``, or its index
    and shards; ``pytorch_model*.bin`` only without safetensors), the tokenizer folder's tokenizer
    and chat template files, and with ``trust_remote_code`` the two folders' ``*.py``. Nothing in
    a deeper folder (``original/``, ``onnx/``), nothing of another format. The model folder's
    ``config.json`` comes last, so a cache that has it got everything before it.
    """
    names = set(repo_files)
    model_dir, tokenizer_dir = settings.model_folder, settings.tokenizer_folder
    in_model = _in_folder(names, model_dir)
    chosen = {_join(model_dir, n) for n in in_model if n in MODEL_FILES}
    chosen |= {_join(model_dir, n) for n in _weights(in_model)}
    in_tokenizer = _in_folder(names, tokenizer_dir, nested=True)
    chosen |= {_join(tokenizer_dir, n) for n in in_tokenizer if _is_tokenizer_file(n)}
    if settings.trust_remote_code:
        for folder in {model_dir, tokenizer_dir}:
            chosen |= {_join(folder, n) for n in _in_folder(names, folder) if n.endswith(".py")}
    config = _join(model_dir, "config.json")
    return sorted(chosen, key=lambda name: (name == config, name))


def _in_folder(names: set[str], folder: str, *, nested: bool = False) -> list[str]:
    """Names directly in ``folder`` (and in its chat-templates folder if ``nested``), relative."""
    prefix = f"{folder}/" if folder else ""
    inside = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    templates = f"{CHAT_TEMPLATES_DIR}/"
    return [n for n in inside if "/" not in n or (nested and n.startswith(templates))]


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _weights(in_folder: list[str]) -> list[str]:
    flat = set(in_folder)
    for single, index, suffix in WEIGHTS:
        if single in flat:
            return [single]
        if index in flat:
            stem = single.split(".")[0] + "-"  # model-00001-of-00002.safetensors
            return [index, *sorted(n for n in flat if n.startswith(stem) and n.endswith(suffix))]
    return []


def _is_tokenizer_file(name: str) -> bool:
    if name.startswith(f"{CHAT_TEMPLATES_DIR}/"):
        return name.endswith(".jinja")
    return name in TOKENIZER_FILES or name.endswith(".tiktoken")


def _what_is_missing(names: Iterable[str], settings: LocalModelSettings) -> list[str]:
    """What the loader needs and ``names`` lack: empty if a load can work from them."""
    names = set(names)
    model_dir, tokenizer_dir = settings.model_folder, settings.tokenizer_folder
    missing = []
    if _join(model_dir, "config.json") not in names:
        missing.append(_join(model_dir, "config.json"))
    if not _weights(_in_folder(names, model_dir)):
        missing.append(f"weights ({_join(model_dir, 'model.safetensors')} or its shards)")
    if not any(_join(tokenizer_dir, v) in names for v in VOCABULARIES):
        missing.append(f"a tokenizer ({_join(tokenizer_dir, 'tokenizer.json')})")
    return missing


# ---- where they are ------------------------------------------------------------------------------


def _local_directory(settings: LocalModelSettings) -> Path | None:
    """The checkpoint's directory if it is one; None for a repo id (the loader's test)."""
    source = settings.model.strip()
    path = Path(source).expanduser()
    if path.exists():
        return path
    if settings.checkpoint_is_a_path:
        raise DownloadError(
            f"{source} does not exist: a local model must be a model folder (with config.json), "
            "a Hugging Face model is a repo id (org/name).",
            checkpoint=source,
        )
    return None


def _cache_root(cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser()


def _storage(cache: Path, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_folder(
    settings: LocalModelSettings, *, revision: str = "main", cache_dir: str | Path | None = None
) -> Path | None:
    """The folder a load would read, if everything it needs is on disk; else None. No network.

    A local directory is its own folder. For a repo id: the cache's snapshot of ``revision``,
    if it holds the model folder's config and every weight shard (by the index) and a tokenizer.
    """
    settings = getattr(settings, "settings", settings)  # a catalog LocalEntry too
    try:
        local = _local_directory(settings)
    except DownloadError:
        return None
    if local is not None:
        return local
    storage = _storage(_cache_root(cache_dir), settings.model.strip())
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = storage / "snapshots" / commit
    if not COMMIT.match(commit) or not snapshot.is_dir():
        return None
    names = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    if _what_is_missing(names, settings) or _missing_shards(snapshot, names, settings):
        return None
    return snapshot


def is_cached(
    settings: LocalModelSettings, *, revision: str = "main", cache_dir: str | Path | None = None
) -> bool:
    """Whether a load would find every file it needs on disk (no download, no network)."""
    return cached_folder(settings, revision=revision, cache_dir=cache_dir) is not None


def _missing_shards(snapshot: Path, names: set[str], settings: LocalModelSettings) -> list[str]:
    folder = settings.model_folder
    for single, index, _ in WEIGHTS:
        if _join(folder, single) in names:
            return []
        if _join(folder, index) in names:
            try:
                shards = json.loads((snapshot / _join(folder, index)).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                return [_join(folder, index)]
            return sorted({_join(folder, s) for s in shards.values()} - names)
    return []


# ---- download ------------------------------------------------------------------------------------


def download(
    settings: LocalModelSettings,
    progress: Progress | None = None,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> DownloadResult:
    """Fetch what the loader needs of ``settings.model`` into the Hugging Face cache.

    ``settings``: a local model's settings (or its catalog ``LocalEntry``). A local directory is
    reported as it is (``local``). For a repo id, the Hub is asked for ``revision``'s files and
    the missing ones are fetched, resuming partial ones; a complete copy costs one request. If the
    Hub cannot be reached but the cache has a complete copy, that is the result
    (``hub_checked=False``). ``endpoint``, ``cache_dir``, ``token``: huggingface_hub's
    (``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_TOKEN`` or the saved login) when None.
    Raises ``DownloadError`` (one of its subclasses); KeyboardInterrupt leaves a resumable state.
    """
    settings = getattr(settings, "settings", settings)
    progress = progress or Progress()
    local = _local_directory(settings)
    if local is not None:
        result = _local_result(local, settings)
        progress.finished(result)
        return result
    repo_id, cache = settings.model.strip(), _cache_root(cache_dir)
    hub = _Hub(repo_id, endpoint, token)
    try:
        plan = hub.plan(settings, revision, cache)
    except HubUnreachableError:
        folder = cached_folder(settings, revision=revision, cache_dir=cache)
        if folder is None:
            raise
        result = _cached_result(repo_id, folder, settings)
        progress.finished(result)
        return result
    progress.planned(plan)
    _check_free_space(plan, cache)
    fetched = 0
    for planned in plan.missing:
        fetched += hub.fetch(planned, plan.commit, cache, progress)
    _write_ref(_storage(cache, repo_id), revision, plan.commit)
    _record_absent(_storage(cache, repo_id), plan.commit, plan.absent)
    result = DownloadResult(
        checkpoint=repo_id,
        folder=plan.folder,
        files=tuple(f.name for f in plan.files),
        total_bytes=plan.total_bytes,
        fetched_files=len(plan.missing),
        fetched_bytes=fetched,
    )
    progress.finished(result)
    return result


def _local_result(folder: Path, settings: LocalModelSettings) -> DownloadResult:
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    files = files_needed(names, settings)
    if missing := _what_is_missing(names, settings):
        raise NotLoadableError(
            f"{folder} cannot be loaded: it has no {', no '.join(missing)}{FOLDER_HINT}",
            checkpoint=str(folder),
        )
    total = sum((folder / name).stat().st_size for name in files)
    return DownloadResult(str(folder), folder, tuple(files), total, local=True)


def _cached_result(repo_id: str, folder: Path, settings: LocalModelSettings) -> DownloadResult:
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    files = files_needed(names, settings)
    total = sum((folder / name).stat().st_size for name in files)
    return DownloadResult(repo_id, folder, tuple(files), total, hub_checked=False)


def _check_free_space(plan: Plan, cache: Path) -> None:
    partial = _storage(cache, plan.checkpoint) / "blobs"
    kept = sum(p.stat().st_size for p in partial.glob("*.incomplete")) if partial.is_dir() else 0
    needed = sum(f.size or 0 for f in plan.missing) - kept
    existing = next((p for p in (cache, *cache.parents) if p.exists()), None)
    if needed <= 0 or existing is None:
        return
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DiskFullError(
            f"Not enough disk space to download {plan.checkpoint}: it needs "
            f"{size_text(needed)} and {existing} has {size_text(free)} free. Free some space, "
            "or set HF_HOME (or HF_HUB_CACHE) to a disk with room, for the gateway too.",
            checkpoint=plan.checkpoint,
        )


def _probed(settings: LocalModelSettings) -> set[str]:
    """The files a load looks for, present or not, in the model's and the tokenizer's folders."""
    weights = {name for single, index, _ in WEIGHTS for name in (single, index)}
    return {_join(settings.model_folder, n) for n in MODEL_FILES | TOKENIZER_FILES | weights} | {
        _join(settings.tokenizer_folder, n) for n in TOKENIZER_FILES
    }


def _record_absent(storage: Path, commit: str | None, names: Iterable[str]) -> None:
    """Note in the cache that the repo lacks these files, as huggingface_hub does when the Hub
    answers 404 for one (``.no_exist/<commit>/<path>``): an offline load then knows they are not
    missing downloads. (Without it, loading Z-Image's tokenizer offline fails on the
    ``tokenizer/config.json`` the repo never had.)"""
    for name in names:
        marker = storage / ".no_exist" / str(commit) / name
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()


def _write_ref(storage: Path, revision: str, commit: str | None) -> None:
    """Record that ``revision`` is ``commit``, as huggingface_hub does: offline loads find it."""
    if commit is None or revision == commit:
        return
    ref = storage / "refs" / revision
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    temporary.write_text(commit)
    os.replace(temporary, ref)


class _Hub:
    """One repo on the Hub; every foreign error is translated here (``_translated``)."""

    def __init__(self, repo_id: str, endpoint: str | None, token: str | bool | None):
        from huggingface_hub import constants

        self.repo_id = repo_id
        self.endpoint = endpoint
        self.token = token
        self.where = (endpoint or constants.ENDPOINT).rstrip("/")

    def plan(self, settings: LocalModelSettings, revision: str, cache: Path) -> Plan:
        from huggingface_hub import HfApi

        with self._translated():
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
                self.repo_id, revision=revision, files_metadata=True
            )
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        if missing := _what_is_missing(sizes, settings):
            raise NotLoadableError(
                f"{self.repo_id} cannot be loaded: the repo has no {', no '.join(missing)}"
                f"{FOLDER_HINT}",
                checkpoint=self.repo_id,
            )
        snapshot = _storage(cache, self.repo_id) / "snapshots" / info.sha
        files = tuple(
            PlannedFile(name, sizes[name], (snapshot / name).is_file())
            for name in files_needed(sizes, settings)
        )
        absent = tuple(sorted(_probed(settings) - set(sizes)))
        return Plan(self.repo_id, snapshot, files, info.sha, absent)

    def fetch(self, planned: PlannedFile, commit: str, cache: Path, progress: Progress) -> int:
        """Fetch one file into the cache and link it into the snapshot; the bytes received."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

        storage = _storage(cache, self.repo_id)
        with self._translated():
            url = hf_hub_url(self.repo_id, planned.name, revision=commit, endpoint=self.endpoint)
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
            if not meta.etag or not meta.commit_hash:
                raise DownloadError(
                    f"{self.where} answered for {self.repo_id}/{planned.name} without an ETag or "
                    "X-Repo-Commit header: it does not look like a Hugging Face Hub (HF_ENDPOINT).",
                    checkpoint=self.repo_id,
                )
            blob = storage / "blobs" / meta.etag
            received = 0
            if blob.is_file():  # the same file in another revision, or fetched meanwhile
                progress.file_started(planned.name, meta.size, meta.size or 0)
            else:
                lock = cache / ".locks" / storage.name / f"{meta.etag}.lock"
                with _locked(lock, progress, planned.name):
                    if not blob.is_file():
                        received = self._fetch_blob(meta, url, blob, planned.name, progress)
            # The blob is in place: huggingface_hub links it into the snapshot, as it would.
            hf_hub_download(
                self.repo_id,
                planned.name,
                revision=commit,
                cache_dir=cache,
                endpoint=self.endpoint,
                token=self.token,
                tqdm_class=functools.partial(_Chunks, Progress()),
            )
        progress.file_finished(planned.name)
        return received

    def _fetch_blob(self, meta, url: str, blob: Path, name: str, progress: Progress) -> int:
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        partial = blob.with_name(f"{blob.name}.incomplete")
        partial.parent.mkdir(parents=True, exist_ok=True)
        done = partial.stat().st_size if partial.is_file() else 0
        if meta.size is not None and done > meta.size:
            done = 0  # not a prefix of this file: start again
        progress.file_started(name, meta.size, done)
        headers = build_hf_headers(token=self.token)
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a signed CDN address: the token stays home
        with open(partial, "r+b" if partial.is_file() else "wb") as out:
            out.seek(done)
            out.truncate()
            http_get(
                meta.location,
                out,
                resume_size=done,
                headers=headers,
                expected_size=meta.size,
                displayed_filename=name,
                tqdm_class=functools.partial(_Chunks, progress),
            )
        os.replace(partial, blob)
        return (meta.size or blob.stat().st_size) - done

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """huggingface_hub's, httpx's and the file system's errors as ``DownloadError``s."""
        try:
            yield
        except DownloadError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc

    def _error(self, exc: Exception) -> DownloadError:
        import httpx
        from huggingface_hub import errors

        repo, where = self.repo_id, self.where
        if isinstance(exc, errors.GatedRepoError):
            return GatedRepoError(
                f"{repo} is a gated model: accept its terms at {where}/{repo} while logged in, "
                "then set HF_TOKEN to a token of that account (or run `hf auth login`).",
                checkpoint=repo,
            )
        if isinstance(exc, errors.RepositoryNotFoundError):
            return RepoNotFoundError(
                f"{repo} was not found on the Hugging Face Hub ({where}): check the repo id "
                "after zlocal/ in proxy_config.yaml; if the repo is private, set HF_TOKEN to a "
                "token that can read it.",
                checkpoint=repo,
            )
        if isinstance(exc, errors.RevisionNotFoundError):
            return DownloadError(f"{repo} has no such revision on {where}.", checkpoint=repo)
        if isinstance(exc, errors.OfflineModeIsEnabled):
            return HubUnreachableError(
                f"Cannot download {repo}: HF_HUB_OFFLINE is set (offline mode). Unset it to "
                "download, or copy the model into the Hugging Face cache.",
                checkpoint=repo,
            )
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return DiskFullError(
                f"The disk filled up while downloading {repo} ({exc.filename or 'the cache'}): "
                "free some space (or set HF_HOME to a disk with room) and run it again; it "
                "resumes where it stopped.",
                checkpoint=repo,
            )
        if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            message = f"The Hugging Face Hub ({where}) answered {status} for {repo}"
            if status >= 500 or status == 429:  # the Hub is down or busy: as good as unreachable
                return HubUnreachableError(
                    f"{message}; try again later: {_first_line(exc)}", checkpoint=repo
                )
            return DownloadError(f"{message}: {_first_line(exc)}", checkpoint=repo)
        unreachable = (httpx.TransportError, errors.LocalEntryNotFoundError, ConnectionError)
        if isinstance(exc, unreachable):
            return HubUnreachableError(
                f"Cannot reach the Hugging Face Hub at {where} to download {repo} "
                f"({_first_line(exc)}): check the network connection (and HTTPS_PROXY if you "
                "need one), then run it again; it resumes where it stopped.",
                checkpoint=repo,
            )
        return DownloadError(
            f"Downloading {repo} from {where} failed: {type(exc).__name__}: {_first_line(exc)}",
            checkpoint=repo,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


@contextmanager
def _locked(path: Path, progress: Progress, name: str) -> Iterator[None]:
    """The lock huggingface_hub takes on a blob: one writer per partial file, across processes."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        progress.waiting(f"{name}: another process is downloading it; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _Chunks:
    """What huggingface_hub's download loop takes for a tqdm bar: its chunks go to ``progress``."""

    def __init__(self, progress: Progress, **_bar_options):
        self._progress = progress

    def __enter__(self) -> _Chunks:
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def update(self, n: float | None = 1) -> None:
        self._progress.advanced(int(n or 0))

    def close(self) -> None:
        pass
