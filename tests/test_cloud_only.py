"""A gateway whose local model cannot load: cloud models work, torch is never imported for them."""

from __future__ import annotations

import httpx
import pytest

from tests.servers import Gateway

pytestmark = pytest.mark.integration

MISSING = "/nonexistent/models/qwen3-4b"


@pytest.fixture(scope="module")
def broken_local_gateway(fake_openai, tmp_path_factory):
    gw = Gateway(
        env=fake_openai.gateway_env(MISSING, GATEWAY_MAX_REQUEST_MB="1"),
        workdir=tmp_path_factory.mktemp("cloud-only"),
    ).start()
    yield gw
    gw.stop()


def chat(gw: Gateway, model: str) -> httpx.Response:
    return gw.chat(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )


def test_cloud_use_health_checks_and_local_state_never_import_torch(broken_local_gateway):
    gw = broken_local_gateway
    auth = {"Authorization": f"Bearer {gw.key}"}
    assert chat(gw, "gpt-4o-mini").json()["choices"][0]["message"]["content"] == "echo: hi"
    health = httpx.get(f"{gw.base_url}/health", headers=auth, timeout=120)
    assert health.status_code == 200
    local = [m for m in health.json()["models"] if m["model"] == "qwen3-4b"]
    assert [m["status"] for m in local] == ["not checked"] and "zlocal" not in health.text
    (state,) = httpx.get(f"{gw.base_url}/local/state", headers=auth).json()["models"]
    assert state["loaded"] is False and state["memory"]["model_bytes"] is None
    released = httpx.post(f"{gw.base_url}/local/release", headers=auth, timeout=30).json()
    assert released["released"] == []  # nothing was loaded: nothing to wait for
    maps = gw.mapped_libraries()
    assert "libtorch" not in maps and "/torch/" not in maps
    assert "libpython" in maps or "python" in maps  # the check reads a live process's maps


def test_unloadable_local_model_gets_503_naming_the_setting_and_cloud_keeps_working(
    broken_local_gateway,
):
    gw = broken_local_gateway
    r = chat(gw, "qwen3-4b")
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    # The path stays in the gateway's log: no answer carries one (docs/security.md).
    assert "model 'qwen3-4b' (LOCAL_LLM_MODEL='[path]') does not exist" in message
    assert MISSING in gw.log()
    assert message.startswith("The local model cannot be loaded")  # as written, not re-wrapped
    assert "Traceback" not in message
    assert "Retried" not in message  # no pointless same-model retries before the answer
    assert chat(gw, "gpt-4o-mini").status_code == 200
    assert chat(gw, "qwen3-4b").status_code == 503  # asked again: the same clear answer


def test_the_body_limit_is_a_setting(broken_local_gateway):
    gw = broken_local_gateway  # started with GATEWAY_MAX_REQUEST_MB=1
    over = "x" * (1024 * 1024 + 1)
    r = gw.chat({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": over}]})
    assert r.status_code == 413
    assert "at most 1 MiB (GATEWAY_MAX_REQUEST_MB)" in r.json()["error"]["message"]
    under = "x" * (1024 * 1024 - 200)
    r = gw.chat({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": under}]})
    assert r.status_code == 200, r.text


def test_a_failed_load_shows_in_the_state(broken_local_gateway):
    gw = broken_local_gateway
    chat(gw, "qwen3-4b")
    (state,) = httpx.get(
        f"{gw.base_url}/local/state", headers={"Authorization": f"Bearer {gw.key}"}
    ).json()["models"]
    assert state["loaded"] is False
    assert f"(LOCAL_LLM_MODEL='{MISSING}') does not exist" in state["last_error"]
