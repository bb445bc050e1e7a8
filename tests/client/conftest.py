"""Fixtures for the client's tests: isolation from the developer's settings, a fake gateway at the
HTTP layer for unit tests, and the CLI run in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from client import Client, load_settings

UNIT_URL = "http://gateway.test"
UNIT_KEY = "sk-unit-test-key"
# What the client reads (LLM_* includes LLM_TIMEOUT and the old LLM_REPO / LLM_MODE).
CLIENT_PREFIXES = ("LITELLM_PROXY_", "LITELLM_MASTER_KEY", "LLM_", "LOCAL_LIBRARY_DIR")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch) -> Path:
    """Every test runs in an empty folder (no developer .env) with its own variable library."""
    for name in list(os.environ):
        if name.startswith(CLIENT_PREFIXES) or name.endswith("_API_KEY"):
            monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LOCAL_LIBRARY_DIR", str(work / "library"))
    return work


@pytest.fixture
def library_dir(_isolated) -> Path:
    return _isolated / "library"


# ---- unit tests: a fake gateway behind the OpenAI SDK's HTTP transport --------------------------


class FakeGateway:
    """Canned HTTP answers, in order, for the OpenAI SDK; records every request it gets.

    ``reply("text")`` queues a chat completion, ``error(status, message)`` an OpenAI-shaped error
    body, ``fail(exc)`` an httpx exception (timeout, refused connection), ``answer(path, body)``
    any JSON. ``GET /v1/models`` answers ``models`` unless something is queued for it with
    ``path="/v1/models"``.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[str, object]] = []
        self.requests: list[dict] = []
        self.models = ["gpt-4o-mini", "qwen3-4b"]

    def reply(self, text: str, finish_reason: str = "stop", path: str = "/v1/chat/completions"):
        body = {
            "id": "chatcmpl-unit",
            "object": "chat.completion",
            "created": 0,
            "model": "unit",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish_reason,
                    "message": {"role": "assistant", "content": text},
                }
            ],
        }
        self.queue.append((path, httpx.Response(200, json=body)))

    def error(self, status: int, message: str, *, type: str = "error", headers=None, path=None):
        body = {"error": {"message": message, "type": type, "param": None, "code": str(status)}}
        response = httpx.Response(status, json=body, headers=headers or {})
        self.queue.append((path or "/v1/chat/completions", response))

    def fail(self, exc: Exception, path: str = "/v1/chat/completions"):
        self.queue.append((path, exc))

    def answer(self, path: str, body, status: int = 200):
        self.queue.append((path, httpx.Response(status, json=body)))

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append(
            {
                "method": request.method,
                "url": str(request.url),
                "path": request.url.path,
                "body": body,
                "headers": request.headers,
                "timeout": request.extensions.get("timeout"),
            }
        )
        for i, (path, answer) in enumerate(self.queue):
            if path == request.url.path:
                del self.queue[i]
                if isinstance(answer, Exception):
                    raise answer
                return answer
        if request.url.path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "x"} for m in self.models
            ]
            return httpx.Response(200, json={"object": "list", "data": data})
        raise AssertionError(f"unexpected request {request.method} {request.url}")

    @property
    def chats(self) -> list[dict]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/chat/completions"]


@pytest.fixture
def fake() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def unit_env(monkeypatch):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", UNIT_URL)
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", UNIT_KEY)


@pytest.fixture
def unit_client(fake, unit_env):
    """A ``Client`` whose HTTP goes to ``fake``."""
    client = Client(
        load_settings(), http_client=httpx.Client(transport=httpx.MockTransport(fake.handle))
    )
    yield client
    client.close()


# ---- integration: the real gateway, the CLI in-process ------------------------------------------


@pytest.fixture
def on_gateway(gateway, monkeypatch):
    """The client's settings point at the session's real gateway."""
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", gateway.base_url)
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", gateway.key)
    return gateway


@pytest.fixture
def cli():
    """Run ``z-explorer ARGS`` in-process; stdout and stderr are kept apart."""
    from client.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return run


def assert_one_line_error(result, *needles: str) -> str:
    """The command failed with status 1 and exactly one ``error:`` line, naming each needle."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
