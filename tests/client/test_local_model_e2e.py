"""``local_state``, ``release_gpu``, ``z-explorer release-gpu`` and doctor's local-model lines
against the real gateway and its tiny local model, qwen3-4b (``/local/state`` and
``/local/release``).

Each test starts from a known state by releasing the model first: the gateway is shared by the
session, and other tests load the model.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from client import AsyncClient, Client, GatewayTimeoutError, ModelNotFoundError, release_gpu

from .conftest import assert_one_line_error

pytestmark = pytest.mark.integration

LOCAL, CLOUD = "qwen3-4b", "gpt-4o-mini"
# A JSON array of 100000 integers cannot end: a request asking for it runs to its max_tokens.
ENDLESS = {
    "type": "json_schema",
    "json_schema": {
        "name": "numbers",
        "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 100000},
    },
}


def start_long_request(gateway, max_tokens: int) -> tuple[threading.Thread, list]:
    """A local generation of ``max_tokens`` tokens in a thread; its response lands in the list."""
    body = {
        "model": LOCAL,
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": max_tokens,
        "response_format": ENDLESS,
    }
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(gateway.chat(body)), daemon=True)
    thread.start()
    return thread, answers


def wait_until_running(client: Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.local_model_state(LOCAL).running_requests < 1:
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.05)


def local_line(stdout: str) -> str:
    """What doctor says of qwen3-4b, after its ``✓ local model qwen3-4b: ``."""
    prefix = f"✓ local model {LOCAL}: "
    [line] = [line for line in stdout.splitlines() if line.startswith(prefix)]
    return line.removeprefix(prefix)


def test_state_before_and_after_a_request(on_gateway, tiny_model_dir):
    with Client(model=LOCAL) as client:
        client.release_gpu()
        whole = client.local_state()
        before = whole[LOCAL]
        again = client.local_model_state()  # reading the state never loads the model
        client.generate_text("Say hi.", max_tokens=4)
        after = client.local_model_state()
    assert LOCAL in whole.names and whole.loaded == () and whole.max_loaded_models >= 1
    assert CLOUD not in whole.names
    assert (before.model, after.model) == (LOCAL, LOCAL)
    assert (before.loaded, before.loading, again.loaded) == (False, False, False)
    # A local folder is named, never its path (the gateway's answers carry none).
    assert before.source == after.source == f"{tiny_model_dir.name} (a local folder)"
    assert after.loaded and not after.loading
    assert after.device and after.dtype
    assert after.load_seconds is not None and after.load_seconds >= 0
    # Ints; not always 0 here: the gateway may count our request a moment after answering it.
    assert isinstance(after.running_requests, int) and isinstance(after.queued_requests, int)
    assert after.running_requests >= 0 and after.queued_requests >= 0
    assert after.last_error is None


def test_release_frees_the_model_and_a_second_release_has_nothing_to_free(on_gateway):
    with Client(model=LOCAL) as client:
        client.generate_text("Say hi.", max_tokens=4)
        first = client.release_gpu()
        second = client.release_gpu()
        state = client.local_model_state()
        client.generate_text("Say hi.", max_tokens=4)  # the next request loads it again
        reloaded = client.local_model_state()
        by_name = client.release_gpu(LOCAL)
        with pytest.raises(ModelNotFoundError) as unknown:
            client.release_gpu("no-such-model")
    assert first.released == (LOCAL,) and first.waited_seconds >= 0
    assert first.state.loaded == () and first.state[LOCAL].loaded is False
    assert second.released == () and second.state.loaded == ()
    assert state.loaded is False
    assert reloaded.loaded is True
    assert by_name.released == (LOCAL,) and by_name.state[LOCAL].loaded is False
    assert LOCAL in unknown.value.available and "'no-such-model'" in str(unknown.value)


def test_release_waits_for_the_running_request_or_times_out(on_gateway, gateway_hold):
    with Client(model=LOCAL) as client:
        client.generate_text("Say hi.", max_tokens=4)  # loaded: the timings below are generation's
        # The long request is held after its first token: it runs past the release's timeout on
        # any machine, however fast, and goes on when let go.
        gateway_hold.decoding()
        thread, answers = start_long_request(on_gateway, 300)
        wait_until_running(client)
        with pytest.raises(GatewayTimeoutError, match="did not release the local models within"):
            client.release_gpu(timeout=0.2)
        gateway_hold.release()
        thread.join(120)
        result = client.release_gpu()  # whatever the timed-out release left, then nothing loaded
    assert answers[0].status_code == 200
    assert answers[0].json()["choices"][0]["finish_reason"] == "length"  # not cut by the release
    assert answers[0].json()["usage"]["completion_tokens"] == 300
    assert result.released in ((), (LOCAL,))  # the timed-out release may have unloaded it already
    assert result.state[LOCAL].loaded is False


def test_async_client_and_the_module_level_release(on_gateway):
    async def twin():
        async with AsyncClient(model=LOCAL) as client:
            await client.generate_text("Say hi.", max_tokens=4)
            return await client.local_model_state(), await client.release_gpu(timeout=120)

    state, result = asyncio.run(twin())
    assert state.loaded and result.released == (LOCAL,) and not result.state.loaded
    assert release_gpu().released == ()
    assert release_gpu(LOCAL, timeout=60).released == ()


def test_doctor_shows_the_local_model_without_loading_it(on_gateway, cli, tiny_model_dir):
    with Client() as client:
        client.release_gpu()
    cloud = cli("doctor", "--model", CLOUD)
    assert cloud.exit_code == 0, cloud.stdout
    assert re.search(r"^✓ local models: 0 of \d+ loaded; at most \d+ at once", cloud.stdout, re.M)
    line = local_line(cloud.stdout)
    assert line.startswith(f"{tiny_model_dir.name} (a local folder) not loaded (loads on the next")
    with Client() as client:
        assert client.local_state().loaded == ()

    local = cli("doctor", "--model", LOCAL)  # its answer check loads the model
    assert local.exit_code == 0, local.stdout
    assert re.search(rf"^✓ local models: 1 of \d+ loaded \({LOCAL}\)", local.stdout, re.M)
    line = local_line(local.stdout)
    assert line.startswith(f"{tiny_model_dir.name} (a local folder) loaded on ")
    assert re.search(r"; \d+ running, \d+ queued", line), line


def test_cli_release_gpu(on_gateway, cli):
    with Client(model=LOCAL) as client:
        client.generate_text("Say hi.", max_tokens=4)
    first = cli("release-gpu")
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith(f"Released {LOCAL} (") and first.stdout.count("\n") == 1
    second = cli("release-gpu", "--timeout", "60")
    assert second.exit_code == 0, second.stderr
    assert second.stdout.startswith("No local model was loaded: nothing to release")
    third = cli("release-gpu", "--model", LOCAL)
    assert third.exit_code == 0, third.stderr
    assert third.stdout.startswith(f"{LOCAL} (") and "was not loaded" in third.stdout
    everything = first.stdout + first.stderr + second.stdout + second.stderr + third.stdout
    assert "\x1b[" not in everything
    assert_one_line_error(cli("release-gpu", "-m", "no-such-model"), "'no-such-model'", LOCAL)
