"""Callers that hang up, and bodies too large to read: the gateway stops work and keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.test_local_state import ENDLESS, get_state

pytestmark = pytest.mark.integration

FOX = [{"role": "user", "content": "a fox"}]


def test_hanging_up_on_a_non_streaming_request_stops_its_generation(gateway, client, gateway_hold):
    before = len(gateway.cancelled_counts())
    client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=1)  # loaded
    body = {
        "model": "qwen3-4b",
        "messages": FOX,
        "max_tokens": 1900,
        "temperature": 1.0,
        "response_format": ENDLESS,  # runs until max_tokens unless stopped
    }
    gateway_hold.decoding()  # held after its first token: still running when the caller leaves

    async def hang_up():  # the caller gives up once its request runs, and hangs up
        async with httpx.AsyncClient(timeout=120) as http:
            asked = asyncio.create_task(
                http.post(
                    f"{gateway.base_url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {gateway.key}"},
                )
            )
            running = {"running": 1, "queued": 0}
            assert await asyncio.to_thread(gateway.wait_for_requests, running) == running
            asked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asked

    asyncio.run(hang_up())
    # Cancelled (no longer counted as running) while the model stood still; then let go.
    assert gateway.wait_for_requests({"running": 0, "queued": 0}) == {"running": 0, "queued": 0}
    gateway_hold.release()
    assert gateway.wait_for_cancellation(before) <= 2  # its first token, and the step held
    assert get_state(gateway)["requests"] == {"running": 0, "queued": 0}  # the batch is empty
    answer = client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2)
    assert answer.usage.completion_tokens >= 1


def test_a_body_over_the_limit_gets_413_before_it_is_read(gateway, client):
    payload = b'{"model": "qwen3-4b", "messages": [{"role": "user", "content": "'
    huge = payload + b"a" * (40 * 1024 * 1024) + b'"}]}'  # default limit: 32 MiB
    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    # Refused from its Content-Length, before the body is read; the timeout is the deadline.
    url = f"{gateway.base_url}/v1/chat/completions"
    r = httpx.post(url, content=huge, headers=headers, timeout=120)
    assert r.status_code == 413, r.text[:500]
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
