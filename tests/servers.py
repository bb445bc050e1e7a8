"""Real servers on loopback for the tests: the LiteLLM gateway and a fake OpenAI upstream."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "proxy_config.yaml"
MASTER_KEY = "sk-test-" + "0123456789abcdef" * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Gateway:
    """``litellm --config proxy_config.yaml`` started as a user would, on a free loopback port."""

    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    key: str = MASTER_KEY
    config: Path = CONFIG
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"gateway-{self.port}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 180.0) -> Gateway:
        litellm = Path(sys.executable).with_name("litellm")
        env = {**_clean_environ(), "LITELLM_MASTER_KEY": self.key, **self.env}
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(litellm),
                    "--config",
                    str(self.config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health/liveliness", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"gateway did not start within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def chat(self, body: dict) -> httpx.Response:
        """POST /v1/chat/completions with the gateway's key, as raw HTTP (status, headers, body)."""
        return httpx.post(
            f"{self.base_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=60,
        )

    def mapped_libraries(self) -> str:
        """The shared objects mapped into the gateway process (to see whether torch is loaded)."""
        return Path(f"/proc/{self.process.pid}/maps").read_text()


def _clean_environ() -> dict[str, str]:
    """This environment minus anything that would change what the gateway does."""
    prefixes = ("LITELLM_", "LOCAL_LLM_", "OPENAI_", "ANTHROPIC_", "OLLAMA_", "LLM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


class FakeOpenAI:
    """A small OpenAI-compatible chat server on loopback standing in for a cloud provider.

    It answers ``echo: <last user message>`` (streamed when asked) and records each request with
    its Authorization header, so tests can see what the gateway forwarded.

    A request with a ``json_schema`` ``response_format`` gets JSON that fits the schema (distinct
    strings ``fake value 1``, ``fake value 2``, ...; arrays of ``minItems`` items). For the
    client's error tests, a key in ``invalid_keys`` gets OpenAI's 401 "Incorrect API key", and a
    trigger word anywhere in the messages picks another answer:

    - ``[fake:429]``: 429 with ``Retry-After: <retry_after>``;
    - ``[fake:slow]``: waits ``slow_seconds`` before answering;
    - ``[fake:lines]``: ignores ``response_format`` and answers numbered plain lines instead.

    (A 401 makes LiteLLM pause the deployment for a few seconds: give a wrong key only to a
    gateway of your own, never to the shared one.)
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.invalid_keys: set[str] = set()
        self.retry_after = 7
        self.slow_seconds = 5.0
        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    {
                        "path": self.path,
                        "body": body,
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": "not found"}})
                trigger = _trigger(body)
                key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if key in fake.invalid_keys:
                    return self._send(401, _INVALID_KEY)
                if trigger == "429":
                    return self._send(429, _RATE_LIMITED, {"Retry-After": str(fake.retry_after)})
                if trigger == "slow":
                    time.sleep(fake.slow_seconds)
                text = _answer_text(body, trigger)
                if body.get("stream"):
                    return self._stream(body["model"], text)
                self._send(200, _completion(body["model"], text))

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, model: str, text: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                words = text.split(" ")
                for i, word in enumerate(words):
                    delta = {"content": word + (" " if i < len(words) - 1 else "")}
                    self._event(_chunk(model, delta, None))
                self._event(_chunk(model, {}, "stop"))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, payload: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
                self.wfile.flush()

        return Handler


_INVALID_KEY = {
    "error": {
        "message": "Incorrect API key provided: sk-fake-***. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
_RATE_LIMITED = {
    "error": {
        "message": "Rate limit reached for gpt-4o-mini on requests per min (RPM).",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


def _trigger(body: dict) -> str | None:
    text = json.dumps(body.get("messages", []))
    for word in ("429", "slow", "lines"):
        if f"[fake:{word}]" in text:
            return word
    return None


def _answer_text(body: dict, trigger: str | None) -> str:
    """The echo, or for a ``json_schema`` request JSON that fits it (numbered lines if told)."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") != "json_schema":
        return "echo: " + str(body["messages"][-1]["content"])
    counter = iter(range(1, 10_000))
    value = _fake_json(response_format["json_schema"].get("schema", {}), counter)
    if trigger == "lines":
        lines = (f"{i}. {v}" for i, v in enumerate(_strings_in(value), 1))
        return "Here are the values:\n" + "\n".join(lines)
    return json.dumps(value)


def _fake_json(schema: dict, counter):
    kind = schema.get("type")
    if kind == "object":
        return {k: _fake_json(v, counter) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        count = schema.get("minItems", schema.get("maxItems", 3))
        return [_fake_json(schema.get("items", {}), counter) for _ in range(count)]
    if kind in ("integer", "number"):
        return next(counter)
    if kind == "boolean":
        return True
    return f"fake value {next(counter)}"


def _strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in _strings_in(item)]


def _completion(model: str, text: str) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": len(text.split()),
            "total_tokens": 5 + len(text.split()),
        },
    }


def _chunk(model: str, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
