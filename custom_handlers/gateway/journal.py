"""The last requests the gateway took, kept in a file where they outlive a crash of its process.

``z-explorer-gateway`` runs the proxy as a child process and names a journal file in
``Z_EXPLORER_GATEWAY_JOURNAL``; ``RequestJournal`` (an ASGI middleware, mounted by ``routes``) then
writes one fixed-size slot per request into that file through ``mmap``: when it started, its method,
path and model, and its status once answered. Writes to a shared mapping reach the file even if the
process dies the next instant, so when the proxy dies the supervisor can say which requests it was
serving. It costs two small memory copies per request; nothing is written without the variable.
"""

from __future__ import annotations

import mmap
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

JOURNAL_VAR = "Z_EXPLORER_GATEWAY_JOURNAL"
SLOTS = 16
SLOT_BYTES = 200
IN_FLIGHT = "-"
UNKNOWN_MODEL = "?"
NOT_JOURNALED = ("/health/liveliness", "/health/readiness")
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,80})"')
_PEEK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Entry:
    number: int
    started: float  # seconds since the epoch
    status: str  # an HTTP status, or IN_FLIGHT
    method: str
    path: str
    model: str

    def describe(self, now: float) -> str:
        model = f" ({self.model})" if self.model != UNKNOWN_MODEL else ""
        what = f"{self.method} {self.path}{model}"
        if self.status == IN_FLIGHT:
            return f"{what}: no answer yet, {now - self.started:.1f} s in"
        return f"{what}: {self.status}"


class Journal:
    """A ring of ``SLOTS`` request entries in a memory-mapped file (the process's only writer)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SLOTS * SLOT_BYTES)
            self._map = mmap.mmap(fd, SLOTS * SLOT_BYTES)
        finally:
            os.close(fd)
        self._next = 0
        self._open: dict[int, Entry] = {}

    def begin(self, method: str, path: str) -> int:
        number, self._next = self._next, self._next + 1
        entry = Entry(number, time.time(), IN_FLIGHT, method, path, UNKNOWN_MODEL)
        self._open[number] = entry
        self._write(entry)
        return number

    def note_model(self, number: int, model: str) -> None:
        if (entry := self._open.get(number)) is not None:
            self._open[number] = entry = replace(entry, model=model)
            self._write(entry)

    def end(self, number: int, status: int | None) -> None:
        if (entry := self._open.pop(number, None)) is not None:
            answer = f"HTTP {status}" if status is not None else "closed before an answer"
            self._write(replace(entry, status=answer))

    def _write(self, entry: Entry) -> None:
        route, model = (text.replace(" ", "%20") for text in (entry.path, entry.model))
        line = f"{entry.number} {entry.started:.3f} {entry.method} {route} {model} {entry.status}"
        data = line.encode("utf-8", "replace")[: SLOT_BYTES - 1].ljust(SLOT_BYTES - 1) + b"\n"
        offset = (entry.number % SLOTS) * SLOT_BYTES
        self._map[offset : offset + SLOT_BYTES] = data


def read(path: Path) -> list[Entry]:
    """The entries in a journal file, oldest first; unreadable slots are skipped."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    entries = []
    for slot in raw.split(b"\n"):
        parts = slot.decode("utf-8", "replace").split(" ", 5)
        if len(parts) < 6:
            continue
        number, started, method, route, model, status = parts
        try:
            entries.append(Entry(int(number), float(started), status.strip(), method, route, model))
        except ValueError:
            continue
    return sorted(entries, key=lambda e: e.number)


class RequestJournal:
    """ASGI middleware: each HTTP request gets a journal entry, answered or not."""

    def __init__(self, app: ASGIApp, journal: Journal) -> None:
        self.app = app
        self.journal = journal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in NOT_JOURNALED:
            await self.app(scope, receive, send)
            return
        journal = self.journal
        number = journal.begin(scope["method"], scope["path"])
        status: int | None = None
        peeked = False

        async def receive_and_peek() -> Message:
            nonlocal peeked
            message = await receive()
            if not peeked and message["type"] == "http.request":
                peeked = True
                if found := _MODEL.search(message.get("body", b"")[:_PEEK_BYTES]):
                    journal.note_model(number, found.group(1).decode("utf-8", "replace"))
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_and_peek, send_and_note)
        finally:
            journal.end(number, status)
