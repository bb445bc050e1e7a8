"""The Responses API's stored answers, in a SQLite file of the gateway's own: no database server.

``POST /v1/responses`` with ``store`` true (OpenAI's default) keeps the answer here, for the models
whose Responses LiteLLM serves through chat completions (``responses_state``): the answer as it was
sent, and the items the model was given (those of earlier turns included). ``previous_response_id``,
``GET /v1/responses/{id}``, ``DELETE`` and ``input_items`` read it back.

- One file, ``general_settings.responses_store.path`` in ``proxy_config.yaml`` (default
  ``.gateway/responses.sqlite3``); a relative path is taken from the gateway's working directory,
  where ``z-explorer-gateway`` also keeps ``.env`` (the gateway key that guards these answers). The
  folder is created owner-only (0700) and the file is owner-only (0600), its WAL files too.
- Bounded: at most ``max_responses`` answers (the oldest go first) for at most ``max_age_days``
  (an older one is gone at once, whether or not it has been deleted from the file yet).
- Each row is self-contained: it holds every item the next turn needs, so deleting or evicting an
  earlier turn never breaks a later one. The cost: a conversation of N turns keeps N copies of its
  beginning (compressed with zlib, which JSON suits well).
- Safe under concurrency: one connection in WAL mode behind a lock; the proxy's event loop calls it
  through ``asyncio.to_thread`` (``astore``), so a slow disk never stalls other requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sqlite3
import stat
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("custom_handlers.response_store")

SETTING = "responses_store"  # the general_settings key of proxy_config.yaml
DEFAULT_PATH = ".gateway/responses.sqlite3"
DEFAULT_MAX_RESPONSES = 10_000
DEFAULT_MAX_AGE_DAYS = 30.0  # OpenAI keeps a stored response 30 days
_KEYS = ("path", "max_responses", "max_age_days")
_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class StoreSettings:
    path: Path = Path(DEFAULT_PATH)
    max_responses: int = DEFAULT_MAX_RESPONSES
    max_age_days: float = DEFAULT_MAX_AGE_DAYS

    @property
    def max_age_seconds(self) -> float:
        return self.max_age_days * 86_400.0


def settings_from(general_settings: Any) -> StoreSettings:
    """The store's settings from ``general_settings`` (``ValueError`` naming the key if wrong)."""
    where = f"general_settings.{SETTING}"
    section = (general_settings or {}).get(SETTING) if isinstance(general_settings, dict) else None
    if section is None:
        return StoreSettings()
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a mapping with {', '.join(_KEYS)}, got {section!r}")
    unknown = sorted(set(section) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is not a setting; the settings are {_KEYS}")
    path = section.get("path", DEFAULT_PATH)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{where}.path must be a file path, got {path!r}")
    count = section.get("max_responses", DEFAULT_MAX_RESPONSES)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(
            f"{where}.max_responses must be a whole number of 1 or more, got {count!r}"
        )
    age = section.get("max_age_days", DEFAULT_MAX_AGE_DAYS)
    if (
        isinstance(age, bool)
        or not isinstance(age, int | float)
        or not math.isfinite(age)
        or age <= 0
    ):
        raise ValueError(f"{where}.max_age_days must be a number above 0, got {age!r}")
    return StoreSettings(Path(os.path.expanduser(path)), count, float(age))


@dataclass(frozen=True)
class StoredResponse:
    """One stored answer: the response object as sent, and the items its model was given."""

    id: str
    model: str
    stored_at: float
    response: dict[str, Any]
    input_items: list[dict[str, Any]]


class StoreError(RuntimeError):
    """The store's file cannot be opened or used (its message names the file)."""


class ResponseStore:
    def __init__(self, settings: StoreSettings | None = None) -> None:
        self.settings = settings or StoreSettings()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    @property
    def path(self) -> Path:
        return self.settings.path

    # ---- the file ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the file now; ``StoreError`` with the reason if it cannot be used."""
        with self._lock:
            self._connection()

    def _connection(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        path = self.path.absolute()
        try:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True)
                os.chmod(path.parent, 0o700)  # whatever the umask was
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
            db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                db.close()
                raise StoreError(
                    f"{path} was written by another version of the gateway (schema {version}); "
                    "move it away or delete it to start an empty store"
                )
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, model TEXT NOT NULL, "
                "stored_at REAL NOT NULL, body BLOB NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS responses_stored_at ON responses (stored_at)")
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            for extra in ("-wal", "-shm"):  # SQLite gives them the file's mode; make sure
                side = path.with_name(path.name + extra)
                if side.exists() and stat.S_IMODE(side.stat().st_mode) & 0o077:
                    os.chmod(side, 0o600)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path} is not a usable SQLite file ({exc}); move it away or delete it to start "
                "an empty store"
            ) from None
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        self._db = db
        self._prune(db, time.time())
        return db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ---- the answers ------------------------------------------------------------------------

    def put(self, record: StoredResponse) -> None:
        body = zlib.compress(
            json.dumps(
                {"response": record.response, "input_items": record.input_items},
                separators=(",", ":"),
                default=str,
            ).encode()
        )
        with self._lock:
            db = self._connection()
            db.execute(
                "INSERT OR REPLACE INTO responses (id, model, stored_at, body) VALUES (?, ?, ?, ?)",
                (record.id, record.model, record.stored_at, body),
            )
            self._prune(db, record.stored_at)

    def get(self, response_id: str) -> StoredResponse | None:
        """The answer stored as ``response_id``; None if none is, or it is past ``max_age_days``."""
        oldest = time.time() - self.settings.max_age_seconds
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT id, model, stored_at, body FROM responses "
                    "WHERE id = ? AND stored_at >= ?",
                    (response_id, oldest),
                )
                .fetchone()
            )
        if row is None:
            return None
        body = json.loads(zlib.decompress(row[3]))
        return StoredResponse(row[0], row[1], row[2], body["response"], body["input_items"])

    def delete(self, response_id: str) -> bool:
        """Remove ``response_id``; whether a (live) answer was there."""
        oldest = time.time() - self.settings.max_age_seconds
        with self._lock:
            cursor = self._connection().execute(
                "DELETE FROM responses WHERE id = ? AND stored_at >= ?", (response_id, oldest)
            )
            return cursor.rowcount > 0

    def count(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        """Drop answers past ``max_age_days``, then the oldest past ``max_responses``."""
        db.execute(
            "DELETE FROM responses WHERE stored_at < ?", (now - self.settings.max_age_seconds,)
        )
        db.execute(
            "DELETE FROM responses WHERE rowid IN (SELECT rowid FROM responses "
            "ORDER BY stored_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
            (self.settings.max_responses,),
        )


# ---- the gateway's one store ----------------------------------------------------------------

_store = ResponseStore()


def configure(settings: StoreSettings) -> ResponseStore:
    """Use ``settings`` from now on (the proxy's start-up, ``routes.mount_on_proxy``)."""
    global _store
    if _store.settings != settings:
        _store.close()
        _store = ResponseStore(settings)
    return _store


def store() -> ResponseStore:
    return _store


async def astore(method: str, *args: Any) -> Any:
    """``store().<method>(*args)`` off the event loop."""
    return await asyncio.to_thread(getattr(store(), method), *args)


def settings_in(config: Mapping[str, Any]) -> StoreSettings:
    """The settings of a whole ``proxy_config.yaml`` mapping."""
    return settings_from(config.get("general_settings") or {})
