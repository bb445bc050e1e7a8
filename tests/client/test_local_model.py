"""``local_state``, ``local_model_state`` and ``release_gpu`` over a fake gateway at the HTTP layer:
the routes called, the JSON read, the errors mapped, and the words ``doctor`` and ``release-gpu``
print (the two commands run against the same fake, served on loopback).

The JSON follows the gateway's contract for ``GET /local/state`` and ``POST /local/release``;
``test_local_model_e2e.py`` checks the same calls against the real gateway.
"""

from __future__ import annotations

import asyncio
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from client import (
    AsyncClient,
    Client,
    GatewayAuthError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    LocalModelState,
    LocalState,
    ModelNotFoundError,
    ReleaseResult,
    RequestError,
    ResponseError,
    diagnose,
    load_settings,
)
from client._local import describe_models, describe_release, describe_state, size, state_of

from .conftest import UNIT_KEY, UNIT_URL

GIB = 1024**3
SOURCE = "unsloth/Qwen3-4B-Instruct-2507-bnb-4bit"
SMALL_SOURCE = "Qwen/Qwen3-1.7B"
# The device's figures: every model's entry reports the same ones.
DEVICE = {
    "device_allocated_bytes": int(2.6 * GIB),
    "device_reserved_bytes": 3 * GIB,
    "device_free_bytes": 72 * GIB,
    "device_total_bytes": int(79.6 * GIB),
}
DEVICE_EMPTY = {
    "device_allocated_bytes": 0,
    "device_reserved_bytes": 0,
    "device_free_bytes": 75 * GIB,
    "device_total_bytes": int(79.6 * GIB),
}
NO_DEVICE = dict.fromkeys(DEVICE)
GPU_MODEL = {
    "model": "qwen3-4b",
    "source": SOURCE,
    "loaded": True,
    "loading": False,
    "device": "cuda:0",
    "dtype": "bfloat16",
    "quantization": "bnb-4bit",
    "context_length": 32768,
    "load_seconds": 24.6,
    "memory": {"model_bytes": int(2.4 * GIB), **DEVICE},
    "requests": {"running": 0, "queued": 0},
    "idle_seconds": 12.3,
    "keep_alive_seconds": 300.0,
    "unload_in_seconds": 287.7,
    "prefix_cache": {"entries": 0, "bytes": 0},
    "last_error": None,
    "preload": False,
    "a_key_added_later": {"anything": 1},
}
UNLOADED_MODEL = {
    **GPU_MODEL,
    "loaded": False,
    "dtype": None,
    "quantization": None,
    "memory": {"model_bytes": None, **DEVICE_EMPTY},
    "idle_seconds": 0.0,
    "unload_in_seconds": None,
}
SMALL_UNLOADED = {**UNLOADED_MODEL, "model": "qwen3-1.7b", "source": SMALL_SOURCE}
CPU_MODEL = {
    **GPU_MODEL,
    "device": "cpu",
    "dtype": "float32",
    "quantization": None,
    "memory": {"model_bytes": 38 * 1024, **NO_DEVICE},
    "requests": {"running": 1, "queued": 2},
    "idle_seconds": None,
    "unload_in_seconds": None,
}
GATEWAY_401 = "Invalid API key: it does not match the gateway's LITELLM_MASTER_KEY."
UNKNOWN_404 = {
    "error": {
        "message": "No local model named 'nope'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
}


def local(*models: dict, max_loaded: int = 1, gateway: dict | None = None) -> dict:
    """A ``/local/state`` answer with these model entries."""
    return {
        "models": list(models),
        "max_loaded_models": max_loaded,
        "gateway": gateway or {"supervised": False, "restarts": 0, "last_restart": None},
    }


GPU_STATE = local(GPU_MODEL, SMALL_UNLOADED)
UNLOADED = local(UNLOADED_MODEL, SMALL_UNLOADED)
CPU_STATE = local(CPU_MODEL)


def released(*names: str, waited: float = 1.5, state: dict = UNLOADED) -> dict:
    return {"released": list(names), "waited_seconds": waited, "state": state}


# ---- what is sent and read -----------------------------------------------------------------------


def test_state_is_read_from_get_local_state_beside_v1(unit_client, fake):
    fake.answer("/local/state", GPU_STATE)
    state = unit_client.local_state()
    [request] = fake.requests
    assert (request["method"], request["url"]) == ("GET", f"{UNIT_URL}/local/state")
    assert request["headers"]["authorization"] == f"Bearer {UNIT_KEY}"
    assert state.max_loaded_models == 1 and state.gateway_restarts == 0
    assert state.names == ("qwen3-4b", "qwen3-1.7b") and state.loaded == ("qwen3-4b",)
    assert state.models[0] == LocalModelState(
        model="qwen3-4b",
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
        preload=False,
    )
    assert state.models[1].model == "qwen3-1.7b" and state.models[1].source == SMALL_SOURCE


def test_models_are_found_by_name():
    state = state_of(local(GPU_MODEL, SMALL_UNLOADED, max_loaded=2))
    assert state.max_loaded_models == 2
    assert state.get("qwen3-1.7b") is state["qwen3-1.7b"] is state.models[1]
    assert state.get("gpt-4o-mini") is None
    with pytest.raises(KeyError, match="no local model 'nope'; the local models: qwen3-4b, qwen3"):
        state["nope"]


def test_a_gateway_with_cloud_models_only_has_an_empty_list(unit_client, fake):
    fake.answer("/local/state", local())
    state = unit_client.local_state()
    assert state == LocalState(models=(), max_loaded_models=1)
    assert state.names == () and state.loaded == () and state.get("qwen3-4b") is None


def test_state_on_cpu_has_no_device_memory(unit_client, fake):
    fake.answer("/local/state", CPU_STATE)
    [state] = unit_client.local_state().models
    assert (state.device, state.model_bytes, state.device_free_bytes) == ("cpu", 38 * 1024, None)
    assert (state.running_requests, state.queued_requests, state.idle_seconds) == (1, 2, None)


def test_one_models_state_by_name_else_the_clients_model_else_the_only_one(fake, unit_env):
    def http():
        return httpx.Client(transport=httpx.MockTransport(fake.handle))

    for _ in range(3):
        fake.answer("/local/state", GPU_STATE)
    fake.answer("/local/state", CPU_STATE)
    with Client(model="qwen3-1.7b", http_client=http()) as client:
        assert client.local_model_state("qwen3-4b").source == SOURCE
        assert client.local_model_state().source == SMALL_SOURCE  # the client's model
        with pytest.raises(ModelNotFoundError) as caught:
            client.local_model_state("gpt-4o-mini")
        assert caught.value.available == ["qwen3-4b", "qwen3-1.7b"]
    with Client(model="gpt-4o-mini", http_client=http()) as client:
        assert client.local_model_state().model == "qwen3-4b"  # the only local model


def test_a_gateway_url_ending_in_v1_still_reaches_local_routes(fake, monkeypatch, unit_env):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", f"{UNIT_URL}/v1/")
    fake.answer("/local/state", GPU_STATE)
    http = httpx.Client(transport=httpx.MockTransport(fake.handle))
    with Client(load_settings(), http_client=http) as client:
        client.local_state()
    assert fake.requests[0]["url"] == f"{UNIT_URL}/local/state"


def test_release_posts_and_waits_as_long_as_asked(unit_client, fake):
    fake.answer("/local/release", released("qwen3-4b"))
    result = unit_client.release_gpu(timeout=42)
    [request] = fake.requests
    assert (request["method"], request["url"], request["body"]) == (
        "POST",
        f"{UNIT_URL}/local/release",
        {},  # every local model
    )
    assert request["headers"]["authorization"] == f"Bearer {UNIT_KEY}"
    assert request["timeout"]["read"] == 42
    assert result == ReleaseResult(("qwen3-4b",), 1.5, state_of(UNLOADED))
    assert result.state.loaded == () and result.state.models[0].device_free_bytes == 75 * GIB


def test_release_of_one_model_names_it(unit_client, fake):
    fake.answer("/local/release", released("qwen3-1.7b", waited=0.0))
    result = unit_client.release_gpu("qwen3-1.7b")
    assert fake.requests[0]["body"] == {"model": "qwen3-1.7b"}
    assert result.released == ("qwen3-1.7b",)


def test_release_of_models_that_were_not_loaded(unit_client, fake):
    fake.answer("/local/release", released(waited=0))
    result = unit_client.release_gpu()
    assert result.released == () and not result.released
    assert fake.requests[0]["timeout"]["read"] == 600  # a release may wait for long generations


def test_an_unknown_model_is_named_with_the_local_models(unit_client, fake):
    fake.answer("/local/release", UNKNOWN_404, status=404)
    fake.answer("/local/state", GPU_STATE)
    with pytest.raises(ModelNotFoundError) as caught:
        unit_client.release_gpu("nope")
    assert str(caught.value) == (
        f"The gateway at {UNIT_URL} has no local model 'nope'. Its local models: qwen3-4b, "
        "qwen3-1.7b; name one of them, or none for every one."
    )
    assert caught.value.available == ["qwen3-4b", "qwen3-1.7b"] and caught.value.model == "nope"
    assert [r["path"] for r in fake.requests] == ["/local/release", "/local/state"]


def test_an_unknown_model_when_the_list_cannot_be_read(unit_client, fake):
    # FastAPI's HTTPException puts the error under "detail"; the list fails: the error still says
    fake.answer("/local/release", {"detail": UNKNOWN_404}, status=404)
    fake.answer("/local/state", "Internal Server Error", status=500)
    with pytest.raises(ModelNotFoundError, match=r"no local model 'nope'\. `z-explorer doctor`"):
        unit_client.release_gpu("nope")


def test_an_unknown_model_on_a_gateway_with_no_local_models(unit_client, fake):
    fake.answer("/local/release", UNKNOWN_404, status=404)
    fake.answer("/local/state", local())
    with pytest.raises(ModelNotFoundError, match=r"It has no local model \(no zlocal/ entry"):
        unit_client.release_gpu("qwen3-4b")


def test_the_timeout_is_no_longer_the_first_argument(unit_client, fake):
    with pytest.raises(TypeError, match=r"got 30. Pass the timeout by name: release_gpu\(timeout"):
        unit_client.release_gpu(30)  # type: ignore[arg-type]
    assert fake.requests == []


def test_missing_and_ill_typed_values_are_read_as_unknown():
    entry = {"model": "m", "loaded": False, "source": "x", "memory": None, "load_seconds": "soon"}
    state = state_of({"models": [entry], "max_loaded_models": "two", "gateway": []})
    assert state == LocalState(
        models=(LocalModelState(model="m", loaded=False, loading=False, source="x"),)
    )
    assert state.models[0].load_seconds is None and state.models[0].keep_alive_seconds == -1.0


@pytest.mark.parametrize(
    "body",
    [
        ["not", "a", "dict"],
        {"status": "ok"},
        "<html>hi</html>",
        {"models": [{"loaded": True, "source": "x"}]},  # no name
        {"models": [{"model": "m", "loaded": "yes"}]},
        {"models": "qwen3-4b"},
    ],
)
def test_an_unreadable_answer_is_a_response_error(unit_client, fake, body):
    fake.answer("/local/state", body)
    with pytest.raises(ResponseError, match="/local/state answered something this client cannot"):
        unit_client.local_state()


def test_an_older_gateways_answer_says_to_restart_it(unit_client, fake):
    fake.answer("/local/state", {k: v for k, v in GPU_MODEL.items() if k != "model"})
    with pytest.raises(ResponseError, match="as gateways older than this client do") as caught:
        unit_client.local_state()
    assert "uv run z-explorer-gateway" in str(caught.value)
    fake.answer("/local/release", {"released": True, "waited_seconds": 0, "state": {}})
    with pytest.raises(ResponseError, match=r"/local/release answered for one local model"):
        unit_client.release_gpu()


# ---- errors --------------------------------------------------------------------------------------


def test_a_gateway_without_the_routes_says_so(unit_client, fake):
    fake.answer("/local/release", {"detail": "Not Found"}, status=404)
    with pytest.raises(RequestError) as caught:
        unit_client.release_gpu("qwen3-4b")  # a name, but not the gateway's "no such model"
    assert caught.value.status_code == 404
    message = str(caught.value)
    assert "has no local-model routes (/local/release answered 404)" in message
    assert "proxy_config.yaml" in message and "uv run z-explorer-gateway" in message
    assert [r["path"] for r in fake.requests] == ["/local/release"]


def test_a_refused_key_is_the_usual_auth_error(unit_client, fake):
    fake.error(401, GATEWAY_401, type="authentication_error", path="/local/state")
    with pytest.raises(GatewayAuthError, match="refused the key from LITELLM_PROXY_API_KEY"):
        unit_client.local_state()


def test_an_unreachable_gateway_is_the_usual_error(unit_client, fake):
    fake.fail(httpx.ConnectError("Connection refused"), path="/local/release")
    with pytest.raises(GatewayUnreachableError, match="uv run z-explorer-gateway"):
        unit_client.release_gpu()


def test_a_release_that_takes_too_long_says_how_to_wait_longer(unit_client, fake):
    fake.fail(httpx.ReadTimeout("timed out"), path="/local/release")
    with pytest.raises(GatewayTimeoutError) as caught:
        unit_client.release_gpu(timeout=5)
    assert "did not release the local models within 5 s" in str(caught.value)
    assert "--timeout" in str(caught.value) and "LLM_TIMEOUT" not in str(caught.value)
    fake.fail(httpx.ReadTimeout("timed out"), path="/local/release")
    with pytest.raises(GatewayTimeoutError, match="release the local model 'qwen3-4b' within 5 s"):
        unit_client.release_gpu("qwen3-4b", timeout=5)


def test_another_error_keeps_its_status_and_message(unit_client, fake):
    fake.error(500, "CUDA error: an illegal memory access", path="/local/release")
    with pytest.raises(RequestError, match=r"/local/release answered HTTP 500: CUDA error") as c:
        unit_client.release_gpu()
    assert c.value.status_code == 500
    fake.answer("/local/state", "Internal Server Error", status=500)
    with pytest.raises(RequestError) as c:
        unit_client.local_state()
    assert str(c.value) == f"{UNIT_URL}/local/state answered HTTP 500 (see the gateway's log)."


def test_a_timeout_must_be_positive(unit_client, fake):
    with pytest.raises(ValueError, match="timeout"):
        unit_client.release_gpu(timeout=0)
    assert fake.requests == []


def test_async_client_does_the_same(fake, unit_env):
    fake.answer("/local/state", GPU_STATE)
    fake.answer("/local/state", GPU_STATE)
    fake.answer("/local/release", released("qwen3-4b", waited=0.2))
    fake.answer("/local/release", UNKNOWN_404, status=404)
    fake.answer("/local/state", UNLOADED)
    fake.answer("/local/state", {"detail": "Not Found"}, status=404)

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
        async with AsyncClient(http_client=http) as client:
            state = await client.local_state()
            small = await client.local_model_state("qwen3-1.7b")
            result = await client.release_gpu("qwen3-4b", timeout=30)
            with pytest.raises(ModelNotFoundError) as caught:
                await client.release_gpu("nope")
            with pytest.raises(RequestError, match="no local-model routes"):
                await client.local_state()
        return state, small, result, caught.value

    state, small, result, unknown = asyncio.run(main())
    assert state == state_of(GPU_STATE) and small.source == SMALL_SOURCE
    assert result.released == ("qwen3-4b",) and result.waited_seconds == 0.2
    assert fake.requests[2]["timeout"]["read"] == 30
    assert fake.requests[2]["body"] == {"model": "qwen3-4b"}
    assert unknown.available == ["qwen3-4b", "qwen3-1.7b"]


# ---- the words -----------------------------------------------------------------------------------


def model_of(entry: dict) -> LocalModelState:
    return state_of(local(entry)).models[0]


def test_describe_a_loaded_model_on_the_gpu():
    assert describe_state(model_of(GPU_MODEL)) == (
        f"{SOURCE} loaded on cuda:0, bfloat16, bnb-4bit, 2.4 GiB of weights, 3.0 GiB reserved on "
        "the device; 0 running, 0 queued; idle 12 s, unloads in 288 s"
    )


def test_describe_a_busy_model_on_the_cpu():
    assert describe_state(model_of({**CPU_MODEL, "quantization": "none"})) == (
        f"{SOURCE} loaded on cpu, float32, 38.0 KiB of weights; 1 running, 2 queued"
    )


def test_describe_a_model_kept_loaded():
    kept = {**CPU_MODEL, "requests": {"running": 0, "queued": 0}, "idle_seconds": 4000.0}
    kept["keep_alive_seconds"] = -1
    assert describe_state(model_of(kept)).endswith("; idle 4000 s, kept loaded (keep_alive -1)")


def test_describe_a_model_that_is_not_loaded_or_loading():
    assert describe_state(model_of(UNLOADED_MODEL)) == (
        f"{SOURCE} not loaded (loads on the next request, ~25 s)"
    )
    never = {**UNLOADED_MODEL, "load_seconds": None, "last_error": "CUDA out of memory"}
    assert describe_state(model_of(never)) == (
        f"{SOURCE} not loaded (loads on the next request); the last load failed: CUDA out of memory"
    )
    loading = {**UNLOADED_MODEL, "loading": True, "requests": {"running": 0, "queued": 3}}
    assert describe_state(model_of(loading)) == f"{SOURCE} loading now; 0 running, 3 queued"


def test_describe_the_models_as_a_whole():
    assert describe_models(state_of(GPU_STATE)) == (
        "1 of 2 loaded (qwen3-4b); at most 1 at once (LOCAL_LLM_MAX_LOADED_MODELS)"
    )
    assert describe_models(state_of(local(UNLOADED_MODEL, max_loaded=3))) == (
        "0 of 1 loaded; at most 3 at once (LOCAL_LLM_MAX_LOADED_MODELS)"
    )
    assert describe_models(state_of(local())) == (
        "none in proxy_config.yaml (no zlocal/ entry): the gateway serves other models only"
    )


def test_describe_a_release_of_one_model():
    result = ReleaseResult(("qwen3-4b",), 1.5, state_of(UNLOADED))
    assert describe_release(state_of(GPU_STATE), result) == (
        f"Released qwen3-4b ({SOURCE}) after waiting 1.5 s: 3.0 GiB returned to cuda:0; cuda:0 "
        "has 75.0 GiB free of 79.6 GiB."
    )
    on_cpu = ReleaseResult(("qwen3-4b",), 0.0, state_of(local({**CPU_MODEL, "loaded": False})))
    assert describe_release(state_of(CPU_STATE), on_cpu) == (
        f"Released qwen3-4b ({SOURCE}) after waiting 0.0 s: 38.0 KiB of weights freed."
    )
    unknown_before = describe_release(None, result)
    assert unknown_before == (
        f"Released qwen3-4b ({SOURCE}) after waiting 1.5 s; cuda:0 has 75.0 GiB free of 79.6 GiB."
    )


def test_describe_a_release_of_several_models():
    device = {**DEVICE, "device_reserved_bytes": 7 * GIB, "device_free_bytes": 68 * GIB}
    big = {**GPU_MODEL, "memory": {"model_bytes": int(2.4 * GIB), **device}}
    small = {**big, "model": "qwen3-1.7b", "source": SMALL_SOURCE}
    small["memory"] = {"model_bytes": int(3.4 * GIB), **device}
    result = ReleaseResult(("qwen3-4b", "qwen3-1.7b"), 2.0, state_of(UNLOADED))
    assert describe_release(state_of(local(big, small, max_loaded=2)), result) == (
        f"Released qwen3-4b ({SOURCE}): 2.4 GiB of weights.\n"
        f"Released qwen3-1.7b ({SMALL_SOURCE}): 3.4 GiB of weights.\n"
        "Released 2 local models after waiting 2.0 s: 7.0 GiB returned to cuda:0; cuda:0 has "
        "75.0 GiB free of 79.6 GiB."
    )


def test_describe_a_release_that_had_nothing_to_free():
    nothing = ReleaseResult((), 0.0, state_of(UNLOADED))
    assert describe_release(state_of(UNLOADED), nothing) == (
        "No local model was loaded: nothing to release; cuda:0 has 75.0 GiB free of 79.6 GiB."
    )
    assert describe_release(state_of(UNLOADED), nothing, "qwen3-1.7b") == (
        f"qwen3-1.7b ({SMALL_SOURCE}) was not loaded: nothing to release; cuda:0 has 75.0 GiB "
        "free of 79.6 GiB."
    )
    cloud_only = ReleaseResult((), 0.0, state_of(local()))
    assert describe_release(None, cloud_only) == (
        "The gateway has no local model (no zlocal/ entry in its proxy_config.yaml): nothing to "
        "release."
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


def test_doctor_reports_each_local_model_after_the_other_checks(fake, unit_env):
    checks = doctor_checks(fake, (GPU_STATE, 200))
    assert [c.name for c in checks] == [
        "settings",
        "gateway",
        "key",
        "model",
        "answer",
        "local models",
        "local model qwen3-4b",
        "local model qwen3-1.7b",
    ]
    assert all(c.ok is True for c in checks)
    assert checks[-3].detail == describe_models(state_of(GPU_STATE))
    assert checks[-2].detail == describe_state(state_of(GPU_STATE).models[0])
    assert checks[-1].detail.startswith(f"{SMALL_SOURCE} not loaded")
    # Reading the state is a GET; the doctor never asks for a release.
    assert [r["path"] for r in fake.requests][-1] == "/local/state"
    assert "/local/release" not in [r["path"] for r in fake.requests]


def test_doctor_with_no_local_model(fake, unit_env):
    checks = doctor_checks(fake, (local(), 200))
    assert checks[-1].name == "local models" and checks[-1].ok is True
    assert checks[-1].detail.startswith("none in proxy_config.yaml")


def test_doctor_warns_about_a_gateway_without_the_routes(fake, unit_env):
    checks = doctor_checks(fake, ({"detail": "Not Found"}, 404))
    assert checks[-1].name == "local models" and checks[-1].ok is None
    assert "no local-model routes" in checks[-1].detail
    assert all(c.ok for c in checks[:-1])


def test_doctor_warns_about_a_failed_load(fake, unit_env):
    failed = {**SMALL_UNLOADED, "last_error": "model 'qwen3-1.7b' ('Qwen/Qwen3-1.7B') is gated"}
    checks = doctor_checks(fake, (local(GPU_MODEL, failed), 200))
    assert [c.ok for c in checks[-3:]] == [True, True, None]
    assert "the last load failed: model 'qwen3-1.7b'" in checks[-1].detail


def test_doctor_warns_that_the_gateway_was_restarted_after_dying(fake, unit_env):
    death = {
        "exit": "SIGSEGV (exit status -11)",
        "at": "2026-12-01T02:00:00+0000",
        "uptime_seconds": 3600.4,
        "last_requests": ["POST /v1/chat/completions (qwen3-4b): no answer yet, 0.1 s in"],
    }
    gateway = {"supervised": True, "restarts": 2, "last_restart": death}
    checks = doctor_checks(fake, (local(GPU_MODEL, gateway=gateway), 200))
    assert [c.name for c in checks][-2:] == ["local model qwen3-4b", "gateway restarts"]
    assert checks[-1].ok is None
    assert checks[-1].detail == (
        "The gateway process died and z-explorer-gateway restarted it 2 times; the last time: "
        "SIGSEGV (exit status -11) at 2026-12-01T02:00:00+0000, 3600 s after it started; last "
        "requests: POST /v1/chat/completions (qwen3-4b): no answer yet, 0.1 s in. Please report "
        "it (docs/troubleshooting.md, 'The gateway died')."
    )


def test_doctor_says_nothing_of_restarts_when_there_were_none(fake, unit_env):
    gateway = {"supervised": True, "restarts": 0, "last_restart": None}
    checks = doctor_checks(fake, (local(GPU_MODEL, gateway=gateway), 200))
    assert checks[-1].name == "local model qwen3-4b"


def test_doctor_does_not_read_the_state_after_a_failure(fake, unit_env):
    fake.answer("/health/liveliness", "I'm alive!")
    fake.error(401, GATEWAY_401, path="/v1/models")
    http = httpx.Client(transport=httpx.MockTransport(fake.handle))
    checks = diagnose(load_settings(), http_client=http)
    assert checks[-1].name == "key" and checks[-1].ok is False
    assert "/local/state" not in [r["path"] for r in fake.requests]


def test_the_states_are_frozen_values():
    state = state_of(GPU_STATE)
    with pytest.raises(AttributeError):
        state.models[0].loaded = False  # type: ignore[misc]
    with pytest.raises(AttributeError):
        state.max_loaded_models = 2  # type: ignore[misc]


# ---- the commands, against the fake served on loopback -----------------------------------------


@pytest.fixture
def served(fake, monkeypatch):
    """``fake`` behind a real HTTP server on loopback: the CLI makes its own HTTP client."""

    class Relay(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            length = int(self.headers.get("content-length") or 0)
            request = httpx.Request(
                self.command,
                f"{UNIT_URL}{self.path}",
                headers=dict(self.headers),
                content=self.rfile.read(length),
            )
            response = fake.handle(request)
            self.send_response(response.status_code)
            self.send_header("content-type", response.headers["content-type"])
            self.send_header("content-length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_POST = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", UNIT_KEY)
    yield fake
    server.shutdown()
    server.server_close()


def test_cli_release_gpu_of_one_model(served, cli):
    served.answer("/local/state", GPU_STATE)
    served.answer("/local/release", released("qwen3-4b"))
    result = cli("release-gpu", "--model", "qwen3-4b", "--timeout", "60")
    assert result.exit_code == 0, result.stderr
    assert served.requests[-1]["body"] == {"model": "qwen3-4b"}
    assert result.stdout == (
        f"Released qwen3-4b ({SOURCE}) after waiting 1.5 s: 3.0 GiB returned to cuda:0; cuda:0 "
        "has 75.0 GiB free of 79.6 GiB.\n"
    )


def test_cli_release_gpu_of_every_model(served, cli):
    two = local(GPU_MODEL, {**GPU_MODEL, "model": "qwen3-1.7b", "source": SMALL_SOURCE})
    served.answer("/local/state", two)
    served.answer("/local/release", released("qwen3-4b", "qwen3-1.7b"))
    result = cli("release-gpu")
    assert result.exit_code == 0, result.stderr
    assert served.requests[-1]["body"] == {}
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        f"Released qwen3-4b ({SOURCE}): 2.4 GiB of weights.",
        f"Released qwen3-1.7b ({SMALL_SOURCE}): 2.4 GiB of weights.",
    ]
    assert lines[2].startswith("Released 2 local models after waiting 1.5 s: 3.0 GiB returned")


def test_cli_release_gpu_of_an_unknown_model(served, cli):
    served.answer("/local/state", GPU_STATE)
    served.answer("/local/release", UNKNOWN_404, status=404)
    served.answer("/local/state", GPU_STATE)
    result = cli("release-gpu", "-m", "nope")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        f"error: The gateway at {os.environ['LITELLM_PROXY_API_BASE']} has no local model 'nope'. "
        "Its local models: qwen3-4b, qwen3-1.7b; name one of them, or none for every one.\n"
    )


def test_cli_doctor_prints_a_line_per_local_model(served, cli):
    served.answer("/health/liveliness", "I'm alive!")
    served.reply("OK")
    served.answer("/local/state", local(GPU_MODEL, SMALL_UNLOADED, max_loaded=2))
    result = cli("doctor", "--model", "qwen3-4b")
    assert result.exit_code == 0, result.stdout
    assert result.stdout.splitlines()[-3:] == [
        "✓ local models: 1 of 2 loaded (qwen3-4b); at most 2 at once (LOCAL_LLM_MAX_LOADED_MODELS)",
        f"✓ local model qwen3-4b: {describe_state(model_of(GPU_MODEL))}",
        f"✓ local model qwen3-1.7b: {SMALL_SOURCE} not loaded (loads on the next request, ~25 s)",
    ]
