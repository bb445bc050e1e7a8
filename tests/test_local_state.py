"""The local model's state and its release: GET /local/state, POST /local/release."""

from __future__ import annotations

import asyncio
import sys
import time
import types

import httpx
import pytest

from tests.pace import Gate
from tests.test_keep_alive import FOX, handler, wait_for

# A JSON array of at least 100000 integers cannot end within any budget here: a request that asks
# for it runs until its max_tokens, however the random model samples.
ENDLESS = {
    "type": "json_schema",
    "json_schema": {
        "name": "numbers",
        "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 100000},
    },
}


def one(state: dict) -> dict:
    """The state of the one local model (a registry made without a configuration)."""
    assert len(state["models"]) == 1, state
    return state["models"][0]


def long_params(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 1.0, "response_format": ENDLESS}


# ---- in process ---------------------------------------------------------------------------------


def test_release_with_nothing_loaded_is_immediate_and_starts_nothing(tiny_model_dir):
    local = handler(tiny_model_dir)
    result = asyncio.run(local.release())
    assert result["released"] == []
    assert one(result["state"])["loaded"] is False
    assert local.engine._thread is None  # no engine thread, so torch was not needed


def test_state_while_busy_and_idle(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=60)
    gate = Gate(local.holder.get().model).close()  # the request runs until the state is read
    sent = time.monotonic()

    async def scenario():
        running = asyncio.create_task(local.acompletion("x", FOX, optional_params=long_params(400)))
        assert await asyncio.to_thread(gate.held)
        busy = one(local.state())
        gate.open()
        await running
        return busy, one(local.state())

    try:
        busy, idle = asyncio.run(scenario())
    finally:
        gate.remove()
    assert busy["loaded"] is True and busy["requests"] == {"running": 1, "queued": 0}
    assert busy["idle_seconds"] is None and busy["unload_in_seconds"] is None
    assert busy["device"] == "cpu" and busy["dtype"] == "float32"
    assert busy["quantization"] == "none" and busy["context_length"] > 0
    assert busy["memory"]["model_bytes"] > 0
    assert busy["memory"]["device_allocated_bytes"] is None  # CPU: no device figures
    assert idle["requests"] == {"running": 0, "queued": 0}
    # Idle since the request ended (no longer than since it was sent), unloaded keep_alive after.
    assert 0 <= idle["idle_seconds"] <= time.monotonic() - sent
    assert 0 < idle["unload_in_seconds"] <= 60
    assert 55 < idle["unload_in_seconds"] <= 60


def test_a_request_answered_is_no_longer_counted_as_running(tiny_model_dir):
    local = handler(tiny_model_dir)

    async def scenario():
        counts = []
        for _ in range(20):
            await local.acompletion("x", FOX, optional_params={"max_tokens": 2})
            counts.append(one(local.state())["requests"]["running"])
        return counts

    assert asyncio.run(scenario()) == [0] * 20


def test_state_while_torch_is_still_importing(tiny_model_dir, monkeypatch):
    """A first load imports torch on another thread: a half-imported module has no ``cuda``."""
    local = handler(tiny_model_dir)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    state = one(local.state())
    assert state["memory"]["device_allocated_bytes"] is None
    assert state["loaded"] is False


def test_release_waits_for_the_running_request_then_unloads(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=-1)

    gate = Gate(local.holder.get().model).close()  # the request runs until the release is asked

    async def scenario():
        running = asyncio.create_task(local.acompletion("x", FOX, optional_params=long_params(300)))
        assert await asyncio.to_thread(gate.held)
        release = asyncio.create_task(local.release())
        assert await asyncio.to_thread(wait_for, lambda: local.engine.releasing)
        gate.open()
        released = await release
        assert running.done()  # the release came back only after the request was answered
        return released, await running

    try:
        released, answer = asyncio.run(scenario())
    finally:
        gate.remove()
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 300  # served in full, not cut by the release
    assert released["released"] == ["local"]
    assert one(released["state"])["loaded"] is False
    assert local.holder.loaded is None


def test_a_request_sent_after_the_release_reloads_the_model(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=-1)

    gate = Gate(local.holder.get().model).close()  # the first runs until the release is asked

    async def scenario():
        first = asyncio.create_task(local.acompletion("x", FOX, optional_params=long_params(200)))
        assert await asyncio.to_thread(gate.held)
        before = local.holder.loaded
        release = asyncio.create_task(local.release())
        assert await asyncio.to_thread(wait_for, lambda: local.engine.releasing)
        gate.open()
        after = await local.acompletion("x", FOX, optional_params={"max_tokens": 2})
        return before, await first, await release, after

    try:
        before, first, released, after = asyncio.run(scenario())
    finally:
        gate.remove()
    assert released["released"] == ["local"]
    assert first.usage.completion_tokens == 200
    assert after.usage.completion_tokens >= 1
    assert local.holder.loaded is not None and local.holder.loaded is not before  # reloaded


# ---- through the gateway ------------------------------------------------------------------------


def get_state(gateway) -> dict:
    """qwen3-4b's state: the shipped configuration's one local model."""
    r = httpx.get(
        f"{gateway.base_url}/local/state", headers={"Authorization": f"Bearer {gateway.key}"}
    )
    assert r.status_code == 200, r.text
    state = one(r.json())
    assert state["model"] == "qwen3-4b"
    return state


def release(gateway) -> dict:
    r = httpx.post(
        f"{gateway.base_url}/local/release",
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.integration
@pytest.mark.parametrize("method,path", [("GET", "/local/state"), ("POST", "/local/release")])
@pytest.mark.parametrize("key", [None, "sk-wrong-key-555"], ids=["no key", "wrong key"])
def test_the_local_routes_need_the_key(gateway, method, path, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.request(method, gateway.base_url + path, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert "sk-wrong-key-555" not in r.text


@pytest.mark.integration
def test_state_and_release_through_the_gateway(gateway, client):
    client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2)
    state = get_state(gateway)
    assert state["loaded"] is True and state["device"] == "cpu"
    assert state["memory"]["model_bytes"] > 0
    assert state["requests"] == {"running": 0, "queued": 0}
    assert state["keep_alive_seconds"] == 300

    released = release(gateway)
    assert released["released"] == ["qwen3-4b"] and one(released["state"])["loaded"] is False
    unloaded = get_state(gateway)
    assert unloaded["loaded"] is False
    assert unloaded["load_seconds"] > 0  # the last load's time stays: what a reload may cost
    assert release(gateway)["released"] == []  # nothing left to release

    again = client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2)
    assert again.usage.completion_tokens >= 1  # reloaded on demand (within the client's timeout)
    assert get_state(gateway)["loaded"] is True
