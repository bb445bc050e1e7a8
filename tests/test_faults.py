"""Callers that hang up, and bodies too large to read: the gateway stops work and keeps serving."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.test_local_state import ENDLESS, get_state

pytestmark = pytest.mark.integration

FOX = [{"role": "user", "content": "a fox"}]


def test_hanging_up_on_a_non_streaming_request_stops_its_generation(gateway, client):
    before = len(gateway.cancelled_counts())
    client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=1)  # loaded
    body = {
        "model": "qwen3-4b",
        "messages": FOX,
        "max_tokens": 1900,
        "temperature": 1.0,
        "response_format": ENDLESS,  # runs until max_tokens unless stopped
    }
    with pytest.raises(httpx.ReadTimeout):  # the caller gives up after 1.5 s and hangs up
        httpx.post(
            f"{gateway.base_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {gateway.key}"},
            timeout=1.5,
        )
    assert gateway.wait_for_cancellation(before, timeout=10) < 1900  # stopped before its budget
    assert get_state(gateway)["requests"] == {"running": 0, "queued": 0}  # the batch is empty
    answer = client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2)
    assert answer.usage.completion_tokens >= 1


def test_a_body_over_the_limit_gets_413_before_it_is_read(gateway, client):
    payload = b'{"model": "qwen3-4b", "messages": [{"role": "user", "content": "'
    huge = payload + b"a" * (40 * 1024 * 1024) + b'"}]}'  # default limit: 32 MiB
    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    started = time.monotonic()
    r = httpx.post(f"{gateway.base_url}/v1/chat/completions", content=huge, headers=headers)
    assert r.status_code == 413, r.text[:500]
    assert time.monotonic() - started < 10
    error = r.json()["error"]
    assert error["code"] == "request_too_large"
    assert "at most 32 MiB (GATEWAY_MAX_REQUEST_MB)" in error["message"]
    assert client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2).choices


def test_a_chunked_body_over_the_limit_gets_413(gateway, client):
    """No Content-Length: the gateway counts what arrives and stops reading at the limit."""

    def chunks():
        for _ in range(64):  # 64 MiB, more than the limit
            yield b"a" * (1024 * 1024)

    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    r = httpx.post(f"{gateway.base_url}/v1/chat/completions", content=chunks(), headers=headers)
    assert r.status_code == 413, r.text[:500]
    assert "went past" in r.json()["error"]["message"]
    assert client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2).choices


def test_a_chunked_body_under_the_limit_is_served(gateway):
    def chunks():
        yield b'{"model": "qwen3-4b", "messages": [{"role": "user",'
        yield b' "content": "a fox"}], "max_tokens": 2}'

    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    r = httpx.post(f"{gateway.base_url}/v1/chat/completions", content=chunks(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
