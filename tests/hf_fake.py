"""A fake Hugging Face Hub on loopback: local folders served as model repos, for download tests.

It answers what huggingface_hub asks when it downloads (``HF_ENDPOINT`` pointed at it):

- ``GET /api/models/{repo_id}`` and ``.../revision/{revision}``: the repo's ``sha`` and
  ``siblings`` (with ``size``, ``blobId`` and ``lfs`` when asked with ``?blobs=true``);
- ``GET /api/models/{repo_id}/tree/{revision}[/{folder}]`` (``?recursive=true``): the listing
  transformers asks for (one page);
- ``HEAD`` / ``GET /{repo_id}/resolve/{revision}/{path}``: the file, with ``ETag`` (the sha256
  of a weight file, the git blob id of others, as the Hub does), ``X-Repo-Commit``,
  ``Content-Length`` and ``Accept-Ranges``; a ``Range: bytes=N-`` request gets ``206`` and the rest;
- ``404`` with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``, and for a
  repo added with ``gated=True`` ``401`` with ``X-Error-Code: GatedRepo`` on its files.

``down = True`` answers 503 to everything (an outage). It records every request
(``requests``) and the bytes of each file it sent (``served``), and can cut the next transfer of
a file short after N bytes (``cut``): closing the connection, or stalling until the test is done
with it (a download that hangs, to interrupt).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.servers import free_port

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".onnx", ".msgpack", ".h5")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?$")


@dataclass(frozen=True)
class RepoFile:
    path: Path
    size: int
    etag: str
    blob_id: str
    lfs: bool


@dataclass
class Repo:
    files: dict[str, RepoFile]
    sha: str
    gated: bool = False


@dataclass
class Cut:
    after: int
    stall: bool


class FakeHub:
    """The fake Hub; ``add(repo_id, folder)`` serves a folder as a repo (files read as added)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None, int]] = []  # method, path, Range, status
        self.served: Counter[str] = Counter()  # "repo_id/path" -> bytes of the file sent
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.down = False  # True: every request gets 503, as in an outage
        self._cuts: dict[str, Cut] = {}
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo_id: str, folder: Path, *, gated: bool = False) -> str:
        """Serve ``folder`` as ``repo_id``; returns its commit sha."""
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            name = path.relative_to(folder).as_posix()
            lfs = name.endswith(LFS_SUFFIXES)
            blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            etag = hashlib.sha256(data).hexdigest() if lfs else blob_id
            files[name] = RepoFile(path, len(data), etag, blob_id, lfs)
        listing = json.dumps({n: f.etag for n, f in files.items()}, sort_keys=True)
        sha = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        self.repos[repo_id] = Repo(files, sha, gated)
        return sha

    def cut(self, repo_id: str, path: str, after: int, *, stall: bool = False) -> None:
        """The next GET of this file sends ``after`` bytes of it, then closes the connection.
        ``stall``: every GET of it, until ``release()`` or ``stop()``, sends it up to byte
        ``after`` of the file, then holds the connection open, sending nothing more; a client
        that gives up the read and resumes (huggingface_hub does after 10 s) stalls there again,
        so what the test sees never depends on how soon it looks."""
        self._cuts[f"{repo_id}/{path}"] = Cut(after, stall)

    def release(self) -> None:
        """Let stalled transfers end (their connections close), forget the cuts not used, end an
        outage."""
        self._cuts.clear()
        self.down = False
        self._released.set()

    def reset(self) -> None:
        """Forget the requests and bytes counted so far."""
        with self._lock:
            self.requests.clear()
            self.served.clear()
            self.authorizations.clear()
        self._released.clear()

    def fetched(self, repo_id: str) -> list[str]:
        """The files of ``repo_id`` that were sent (some bytes of), in path order."""
        prefix = f"{repo_id}/"
        sent = [key for key, count in self.served.items() if count and key.startswith(prefix)]
        return sorted(key[len(prefix) :] for key in sent)

    def _record(self, method: str, path: str, range_: str | None, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, range_, status))

    def _count(self, key: str, nbytes: int) -> None:
        with self._lock:
            self.served[key] += nbytes

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer(body=True)

            def do_HEAD(self):
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                path, _, query = self.path.partition("?")
                hub.authorizations.append(self.headers.get("Authorization"))
                if hub.down:
                    hub._record(self.command, self.path, None, 503)
                    return self._send(503, b'{"error": "Service Unavailable"}')
                if match := API.match(path):
                    return self._info(match["repo"], match["revision"], "blobs=true" in query)
                if match := TREE.match(path):
                    recursive = "recursive=true" in query.lower()
                    return self._tree(match["repo"], match["revision"], match["path"], recursive)
                if match := RESOLVE.match(path):
                    return self._file(match["repo"], match["revision"], match["path"], body)
                self._error(404, "NotFound", "Not found")

            def _repo(self, repo_id: str, revision: str | None) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                elif revision not in (None, "main", repo.sha):
                    self._error(404, "RevisionNotFound", "Invalid rev id", repo.sha)
                    return None
                return repo

            def _info(self, repo_id: str, revision: str | None, blobs: bool) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                siblings = []
                for name, f in repo.files.items():
                    sibling = {"rfilename": name}
                    if blobs:
                        sibling.update(size=f.size, blobId=f.blob_id)
                        if f.lfs:
                            sibling["lfs"] = {"size": f.size, "sha256": f.etag, "pointerSize": 134}
                    siblings.append(sibling)
                info = {
                    "_id": repo.sha[:24],
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "tags": [],
                    "siblings": siblings,
                }
                self._send(200, json.dumps(info).encode(), "application/json")

            def _tree(self, repo_id: str, revision: str, folder: str | None, recursive: bool):
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                prefix = f"{folder.strip('/')}/" if folder and folder.strip("/") else ""
                entries = _tree(repo, prefix, recursive)
                if prefix and not entries:
                    return self._error(404, "EntryNotFound", "Entry not found", repo.sha)
                self._send(200, json.dumps(list(entries.values())).encode())

            def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                if repo.gated:
                    return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted")
                f = repo.files.get(name)
                if f is None:
                    return self._error(404, "EntryNotFound", "Entry not found", repo.sha)
                start = _range_start(self.headers.get("Range"))
                if start >= f.size and start:
                    return self._error(416, "RangeNotSatisfiable", "Range not satisfiable")
                status = 206 if start else 200
                hub._record(self.command, self.path, self.headers.get("Range"), status)
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(f.size - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{f.etag}"')
                self.send_header("X-Repo-Commit", repo.sha)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
                self.end_headers()
                if body:
                    self._body(f"{repo_id}/{name}", f.path, start)

            def _body(self, key: str, path: Path, start: int) -> None:
                cut = hub._cuts.get(key)
                if cut is not None and not cut.stall:
                    del hub._cuts[key]  # a cut that closes the connection: the next GET only
                limit = None if cut is None else cut.after
                if cut is not None and cut.stall:  # up to that byte of the file, wherever it starts
                    limit = max(0, cut.after - start)
                with open(path, "rb") as source:
                    source.seek(start)
                    while limit is None or limit > 0:
                        block = source.read(65536 if limit is None else min(65536, limit))
                        if not block:
                            break
                        self.wfile.write(block)
                        hub._count(key, len(block))
                        if limit is not None:
                            limit -= len(block)
                self.wfile.flush()
                if cut is not None:
                    if cut.stall:
                        hub._released.wait(timeout=120)
                    self.close_connection = True

            def _error(self, status: int, code: str, message: str, sha: str | None = None):
                hub._record(self.command, self.path, self.headers.get("Range"), status)
                headers = {"X-Error-Code": code, "X-Error-Message": message}
                if sha:
                    headers["X-Repo-Commit"] = sha
                self._send(status, json.dumps({"error": message}).encode(), headers=headers)

            def _send(self, status, data: bytes, content_type="application/json", headers=None):
                if status == 200:
                    hub._record(self.command, self.path, None, status)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler


def _tree(repo: Repo, prefix: str, recursive: bool) -> dict[str, dict]:
    """The files and folders under ``prefix``, as the Hub's tree listing has them."""
    entries: dict[str, dict] = {}
    for name, f in repo.files.items():
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        depths = range(1, len(parts)) if recursive else range(1, min(len(parts), 2))
        for depth in depths:  # the folders on the way
            path = prefix + "/".join(parts[:depth])
            entries[path] = {"type": "directory", "oid": repo.sha, "size": 0, "path": path}
        if len(parts) == 1 or recursive:
            entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.etag, "size": f.size, "pointerSize": 134}
            entries[name] = entry
    return entries


def _range_start(header: str | None) -> int:
    """Where a ``bytes=N-`` (or ``bytes=N-M``, served to the end) range starts; 0 for none."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
    return int(match[1]) if match else 0


def hub_environment(hub: FakeHub, home: Path) -> dict[str, str]:
    """The variables that point huggingface_hub (in a child process) at ``hub`` and a cache in
    ``home``, with no token, no xet and no telemetry: nothing reaches huggingface.co."""
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
