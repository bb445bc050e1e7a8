"""``local_model_state`` and ``release_gpu`` over a fake gateway at the HTTP layer: the routes
called, the JSON read, the errors mapped, and the words ``doctor`` and ``release-gpu`` print.

The JSON follows the gateway's contract for ``GET /local/state`` and ``POST /local/release``;
``test_local_model_e2e.py`` checks the same calls against the real gateway.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from client import (
    AsyncClient,
    Client,
    GatewayAuthError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    LocalModelState,
    ReleaseResult,
    RequestError,
    ResponseError,
    diagnose,
    load_settings,
)
from client._local import describe_release, describe_state, size, state_of

from .conftest import UNIT_KEY, UNIT_URL

GIB = 1024**3
SOURCE = "unsloth/Qwen3-4B-Instruct-2507-bnb-4bit"
GPU_STATE = {
    "loaded": True,
    "loading": False,
    "source": SOURCE,
    "device": "cuda:0",
    "dtype": "bfloat16",
    "quantization": "bnb-4bit",
    "context_length": 32768,
    "load_seconds": 24.6,
    "memory": {
        "model_bytes": int(2.4 * GIB),
        "device_allocated_bytes": int(2.6 * GIB),
        "device_reserved_bytes": 3 * GIB,
        "device_free_bytes": 72 * GIB,
        "device_total_bytes": int(79.6 * GIB),
    },
    "requests": {"running": 0, "queued": 0},
    "idle_seconds": 12.3,
    "keep_alive_seconds": 300.0,
    "unload_in_seconds": 287.7,
    "last_error": None,
    "a_key_added_later": {"anything": 1},
}
UNLOADED = {
    **GPU_STATE,
    "loaded": False,
    "dtype": None,
    "quantization": None,
    "memory": {
        "model_bytes": None,
        "device_allocated_bytes": 0,
        "device_reserved_bytes": 0,
        "device_free_bytes": 75 * GIB,
        "device_total_bytes": int(79.6 * GIB),
    },
    "idle_seconds": 0.0,
    "unload_in_seconds": None,
}
CPU_STATE = {
    **GPU_STATE,
    "device": "cpu",
    "dtype": "float32",
    "quantization": None,
    "memory": {
        "model_bytes": 38 * 1024,
        "device_allocated_bytes": None,
        "device_reserved_bytes": None,
        "device_free_bytes": None,
        "device_total_bytes": None,
    },
    "requests": {"running": 1, "queued": 2},
    "idle_seconds": None,
    "unload_in_seconds": None,
}
GATEWAY_401 = "Invalid API key: it does not match the gateway's LITELLM_MASTER_KEY."


# ---- what is sent and read -----------------------------------------------------------------------


def test_state_is_read_from_get_local_state_beside_v1(unit_client, fake):
    fake.answer("/local/state", GPU_STATE)
    state = unit_client.local_model_state()
    [request] = fake.requests
    assert (request["method"], request["url"]) == ("GET", f"{UNIT_URL}/local/state")
    assert request["headers"]["authorization"] == f"Bearer {UNIT_KEY}"
    assert state == LocalModelState(
        loaded=True,
        loading=False,
        source=SOURCE,
        device="cuda:0",
        dtype="bfloat16",
        quantization="bnb-4bit",
        context_length=32768,
        load_seconds=24.6,
        model_bytes=int(2.4 * GIB),
        device_allocated_bytes=int(2.6 * GIB),
        device_reserved_bytes=3 * GIB,
        device_free_bytes=72 * GIB,
        device_total_bytes=int(79.6 * GIB),
        running_requests=0,
        queued_requests=0,
        idle_seconds=12.3,
        keep_alive_seconds=300.0,
        unload_in_seconds=287.7,
        last_error=None,
    )


def test_state_on_cpu_has_no_device_memory(unit_client, fake):
    fake.answer("/local/state", CPU_STATE)
    state = unit_client.local_model_state()
    assert (state.device, state.model_bytes, state.device_free_bytes) == ("cpu", 38 * 1024, None)
    assert (state.running_requests, state.queued_requests, state.idle_seconds) == (1, 2, None)


def test_a_gateway_url_ending_in_v1_still_reaches_local_routes(fake, monkeypatch, unit_env):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", f"{UNIT_URL}/v1/")
    fake.answer("/local/state", GPU_STATE)
    http = httpx.Client(transport=httpx.MockTransport(fake.handle))
    with Client(load_settings(), http_client=http) as client:
        client.local_model_state()
    assert fake.requests[0]["url"] == f"{UNIT_URL}/local/state"


def test_release_posts_and_waits_as_long_as_asked(unit_client, fake):
    fake.answer("/local/release", {"released": True, "waited_seconds": 1.5, "state": UNLOADED})
    result = unit_client.release_gpu(timeout=42)
    [request] = fake.requests
    assert (request["method"], request["url"], request["body"]) == (
        "POST",
        f"{UNIT_URL}/local/release",
        {},
    )
    assert request["headers"]["authorization"] == f"Bearer {UNIT_KEY}"
    assert request["timeout"]["read"] == 42
    assert result == ReleaseResult(True, 1.5, state_of(UNLOADED))
    assert not result.state.loaded and result.state.device_free_bytes == 75 * GIB


def test_release_of_a_model_that_was_not_loaded(unit_client, fake):
    fake.answer("/local/release", {"released": False, "waited_seconds": 0, "state": UNLOADED})
    assert unit_client.release_gpu().released is False
    assert fake.requests[0]["timeout"]["read"] == 600  # a release may wait for long generations


def test_missing_and_ill_typed_values_are_read_as_unknown():
    state = state_of({"loaded": False, "source": "x", "memory": None, "load_seconds": "soon"})
    assert state == LocalModelState(loaded=False, loading=False, source="x")
    assert state.load_seconds is None and state.keep_alive_seconds == -1.0


@pytest.mark.parametrize("body", [["not", "a", "dict"], {"status": "ok"}, "<html>hi</html>"])
def test_an_unreadable_answer_is_a_response_error(unit_client, fake, body):
    fake.answer("/local/state", body)
    with pytest.raises(ResponseError, match="/local/state answered something this client cannot"):
        unit_client.local_model_state()


# ---- errors --------------------------------------------------------------------------------------


def test_a_gateway_without_the_routes_says_so(unit_client, fake):
    fake.answer("/local/release", {"detail": "Not Found"}, status=404)
    with pytest.raises(RequestError) as caught:
        unit_client.release_gpu()
    assert caught.value.status_code == 404
    message = str(caught.value)
    assert "has no local-model routes (/local/release answered 404)" in message
    assert "proxy_config.yaml" in message and "uv run z-explorer-gateway" in message


def test_a_refused_key_is_the_usual_auth_error(unit_client, fake):
    fake.error(401, GATEWAY_401, type="authentication_error", path="/local/state")
    with pytest.raises(GatewayAuthError, match="refused the key from LITELLM_PROXY_API_KEY"):
        unit_client.local_model_state()


def test_an_unreachable_gateway_is_the_usual_error(unit_client, fake):
    fake.fail(httpx.ConnectError("Connection refused"), path="/local/release")
    with pytest.raises(GatewayUnreachableError, match="uv run z-explorer-gateway"):
        unit_client.release_gpu()


def test_a_release_that_takes_too_long_says_how_to_wait_longer(unit_client, fake):
    fake.fail(httpx.ReadTimeout("timed out"), path="/local/release")
    with pytest.raises(GatewayTimeoutError) as caught:
        unit_client.release_gpu(timeout=5)
    assert "did not release the local model within 5 s" in str(caught.value)
    assert "--timeout" in str(caught.value) and "LLM_TIMEOUT" not in str(caught.value)


def test_another_error_keeps_its_status_and_message(unit_client, fake):
    fake.error(500, "CUDA error: an illegal memory access", path="/local/release")
    with pytest.raises(RequestError, match=r"/local/release answered HTTP 500: CUDA error") as c:
        unit_client.release_gpu()
    assert c.value.status_code == 500
    fake.answer("/local/state", "Internal Server Error", status=500)
    with pytest.raises(RequestError) as c:
        unit_client.local_model_state()
    assert str(c.value) == f"{UNIT_URL}/local/state answered HTTP 500 (see the gateway's log)."


def test_a_timeout_must_be_positive(unit_client, fake):
    with pytest.raises(ValueError, match="timeout"):
        unit_client.release_gpu(timeout=0)
    assert fake.requests == []


def test_async_client_does_the_same(fake, unit_env):
    fake.answer("/local/state", GPU_STATE)
    fake.answer("/local/release", {"released": True, "waited_seconds": 0.2, "state": UNLOADED})
    fake.answer("/local/state", {"detail": "Not Found"}, status=404)

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
        async with AsyncClient(http_client=http) as client:
            state = await client.local_model_state()
            result = await client.release_gpu(timeout=30)
            with pytest.raises(RequestError, match="no local-model routes"):
                await client.local_model_state()
        return state, result

    state, result = asyncio.run(main())
    assert state == state_of(GPU_STATE) and result.released and result.waited_seconds == 0.2
    assert fake.requests[1]["timeout"]["read"] == 30


# ---- the words -----------------------------------------------------------------------------------


def test_describe_a_loaded_model_on_the_gpu():
    assert describe_state(state_of(GPU_STATE)) == (
        f"{SOURCE} loaded on cuda:0, bfloat16, bnb-4bit, 2.4 GiB of weights, 3.0 GiB reserved on "
        "the device; 0 running, 0 queued; idle 12 s, unloads in 288 s"
    )


def test_describe_a_busy_model_on_the_cpu():
    assert describe_state(state_of({**CPU_STATE, "quantization": "none"})) == (
        f"{SOURCE} loaded on cpu, float32, 38.0 KiB of weights; 1 running, 2 queued"
    )


def test_describe_a_model_kept_loaded():
    kept = {**CPU_STATE, "requests": {"running": 0, "queued": 0}, "idle_seconds": 4000.0}
    kept["keep_alive_seconds"] = -1
    assert describe_state(state_of(kept)).endswith("; idle 4000 s, kept loaded (keep_alive -1)")


def test_describe_a_model_that_is_not_loaded_or_loading():
    assert describe_state(state_of(UNLOADED)) == (
        f"{SOURCE} not loaded (loads on the next request, ~25 s)"
    )
    never = {**UNLOADED, "load_seconds": None, "last_error": "CUDA out of memory"}
    assert describe_state(state_of(never)) == (
        f"{SOURCE} not loaded (loads on the next request); the last load failed: CUDA out of memory"
    )
    loading = {**UNLOADED, "loading": True, "requests": {"running": 0, "queued": 3}}
    assert describe_state(state_of(loading)) == f"{SOURCE} loading now; 0 running, 3 queued"


def test_describe_a_release():
    released = ReleaseResult(True, 1.5, state_of(UNLOADED))
    assert describe_release(state_of(GPU_STATE), released) == (
        f"Released the local model ({SOURCE}) after waiting 1.5 s: 3.0 GiB returned to cuda:0; "
        "cuda:0 has 75.0 GiB free of 79.6 GiB."
    )
    on_cpu = ReleaseResult(True, 0.0, state_of({**CPU_STATE, "loaded": False}))
    assert describe_release(state_of(CPU_STATE), on_cpu) == (
        f"Released the local model ({SOURCE}) after waiting 0.0 s: 38.0 KiB of weights freed."
    )
    nothing = ReleaseResult(False, 0.0, state_of(UNLOADED))
    assert describe_release(state_of(UNLOADED), nothing) == (
        f"The local model ({SOURCE}) was not loaded: nothing to release; cuda:0 has 75.0 GiB "
        "free of 79.6 GiB."
    )


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * GIB, "3.0 GiB"),
    ],
)
def test_sizes(count, text):
    assert size(count) == text


# ---- doctor --------------------------------------------------------------------------------------


def doctor_checks(fake, state_answer: tuple[object, int]):
    fake.answer("/health/liveliness", "I'm alive!")
    fake.reply("OK")
    body, status = state_answer
    fake.answer("/local/state", body, status)
    http = httpx.Client(transport=httpx.MockTransport(fake.handle))
    return diagnose(load_settings(), http_client=http)


def test_doctor_reports_the_local_model_after_the_other_checks(fake, unit_env):
    checks = doctor_checks(fake, (GPU_STATE, 200))
    assert [c.name for c in checks] == [
        "settings",
        "gateway",
        "key",
        "model",
        "answer",
        "local model",
    ]
    assert checks[-1].ok is True
    assert checks[-1].detail == describe_state(state_of(GPU_STATE))
    # Reading the state is a GET; the doctor never asks for a release.
    assert [r["path"] for r in fake.requests][-1] == "/local/state"
    assert "/local/release" not in [r["path"] for r in fake.requests]


def test_doctor_warns_about_a_gateway_without_the_routes(fake, unit_env):
    checks = doctor_checks(fake, ({"detail": "Not Found"}, 404))
    assert checks[-1].name == "local model" and checks[-1].ok is None
    assert "no local-model routes" in checks[-1].detail
    assert all(c.ok for c in checks[:-1])


def test_doctor_warns_about_a_failed_load(fake, unit_env):
    failed = {**UNLOADED, "last_error": "LOCAL_LLM_MODEL='x' does not exist"}
    checks = doctor_checks(fake, (failed, 200))
    assert checks[-1].ok is None and "the last load failed: LOCAL_LLM_MODEL=" in checks[-1].detail


def test_doctor_warns_that_the_gateway_was_restarted_after_dying(fake, unit_env):
    death = {
        "exit": "SIGSEGV (exit status -11)",
        "at": "2026-12-01T02:00:00+0000",
        "uptime_seconds": 3600.4,
        "last_requests": ["POST /v1/chat/completions (qwen3-4b): no answer yet, 0.1 s in"],
    }
    gateway = {"supervised": True, "restarts": 2, "last_restart": death}
    checks = doctor_checks(fake, ({**GPU_STATE, "gateway": gateway}, 200))
    assert [c.name for c in checks][-2:] == ["local model", "gateway restarts"]
    assert checks[-1].ok is None
    assert checks[-1].detail == (
        "The gateway process died and z-explorer-gateway restarted it 2 times; the last time: "
        "SIGSEGV (exit status -11) at 2026-12-01T02:00:00+0000, 3600 s after it started; last "
        "requests: POST /v1/chat/completions (qwen3-4b): no answer yet, 0.1 s in. Please report "
        "it (docs/troubleshooting.md, 'The gateway died')."
    )


def test_doctor_says_nothing_of_restarts_when_there_were_none(fake, unit_env):
    gateway = {"supervised": True, "restarts": 0, "last_restart": None}
    checks = doctor_checks(fake, ({**GPU_STATE, "gateway": gateway}, 200))
    assert checks[-1].name == "local model"


def test_doctor_does_not_read_the_state_after_a_failure(fake, unit_env):
    fake.answer("/health/liveliness", "I'm alive!")
    fake.error(401, GATEWAY_401, path="/v1/models")
    http = httpx.Client(transport=httpx.MockTransport(fake.handle))
    checks = diagnose(load_settings(), http_client=http)
    assert checks[-1].name == "key" and checks[-1].ok is False
    assert "/local/state" not in [r["path"] for r in fake.requests]


def test_the_state_is_a_frozen_value():
    state = state_of(GPU_STATE)
    with pytest.raises(AttributeError):
        state.loaded = False  # type: ignore[misc]
