"""The variable library: one file per variable in ``LOCAL_LIBRARY_DIR``, as Z-Explorer keeps it.

``library/cat_breed.md`` (or ``.txt``) is ``__cat_breed__``; ``library/styles/light.md`` is
``__styles/light__``. Each non-empty line is a value, except lines starting with ``#``, which are
the variable's description. Writes are atomic, and never replace a file that is already there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from client._errors import LibraryError, VariableExistsError

SUFFIXES = (".md", ".txt")  # when both exist, .md wins
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*(?:/[A-Za-z0-9][A-Za-z0-9_\-]*)*$")


@dataclass(frozen=True)
class Variable:
    """A variable read from (or just saved to) the library."""

    name: str
    path: Path
    description: str
    values: list[str]


def check_name(name: str) -> str:
    """``name`` without surrounding ``__``; raises ``LibraryError`` if it cannot be a file name."""
    bare = name.strip()
    if bare.startswith("__") and bare.endswith("__") and len(bare) > 4:
        bare = bare[2:-2]
    if not _NAME.match(bare):
        raise LibraryError(
            f"{name!r} is not a variable name: use letters, digits, '_' and '-', with '/' "
            "between folder names, like cat_breed or styles/lighting."
        )
    return bare


class Library:
    """The variables under one folder (``LOCAL_LIBRARY_DIR``)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def path_for(self, name: str, suffix: str = ".md") -> Path:
        return self.root.joinpath(*check_name(name).split("/")).with_suffix(suffix)

    def find(self, name: str) -> Path | None:
        """The file holding ``name``, if there is one."""
        for suffix in SUFFIXES:
            path = self.path_for(name, suffix)
            if path.is_file():
                return path
        return None

    def get(self, name: str) -> Variable | None:
        """The variable ``name``, or None when it has no file."""
        path = self.find(name)
        return None if path is None else read_variable(check_name(name), path)

    def names(self) -> list[str]:
        """Every variable in the library, as ``folder/name``, sorted."""
        if not self.root.is_dir():
            return []
        found = set()
        for path in self.root.rglob("*"):
            if path.suffix in SUFFIXES and path.is_file():
                found.add(path.relative_to(self.root).with_suffix("").as_posix())
        return sorted(n for n in found if _NAME.match(n))

    def save(self, name: str, values: list[str], description: str = "") -> Variable:
        """Write a new variable file atomically; ``VariableExistsError`` if one is there."""
        bare = check_name(name)
        existing = self.find(bare)
        if existing is not None:
            raise VariableExistsError(bare, existing)
        path = self.path_for(bare)
        lines = [f"# {line}" for line in description.splitlines() if line.strip()]
        lines += [v for v in values if v.strip()]
        try:
            write_new_file(path, "\n".join(lines) + "\n")
        except FileExistsError:
            raise VariableExistsError(bare, path) from None
        except OSError as exc:
            raise LibraryError(f"Cannot save __{bare}__ to {path}: {exc.strerror or exc}") from exc
        return Variable(bare, path, description, [v for v in values if v.strip()])


def read_variable(name: str, path: Path) -> Variable:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LibraryError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the app's files predate UTF-8 everywhere
    description, values = [], []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            description.append(line.lstrip("#").strip())
        elif line:
            values.append(line)
    return Variable(name, path, "\n".join(description), values)


def write_new_file(path: Path, text: str) -> None:
    """Create ``path`` with ``text`` atomically; ``FileExistsError`` if it already exists.

    The text goes to a temporary file in the same folder first. ``os.link`` then gives it its
    name only if that name is free, so a reader never sees half a file and a file that appeared
    meanwhile is never replaced. Where hard links are not supported, ``os.replace`` does the
    atomic rename after a last existence check.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a library file is ordinary
        _publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _publish(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from exc
        os.replace(tmp, path)
