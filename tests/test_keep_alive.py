"""keep_alive: the idle model is unloaded and its memory returned; the next request reloads it."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from custom_handlers.inference import engine as engine_module
from custom_handlers.inference.catalog import ConfigError, local_entries
from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.request import parse_chat_request
from custom_handlers.inference.settings import LocalModelSettings
from tests.pace import Gate

FOX = [{"role": "user", "content": "a fox"}]


def handler(model_dir, **settings) -> LocalLLM:
    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(model_dir))))
    for name, value in settings.items():
        setattr(local.engine, name, value)
    return local


def ask(local: LocalLLM, **params):
    params.setdefault("max_tokens", 3)
    return asyncio.run(local.acompletion("x", FOX, optional_params=params))


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_the_idle_model_is_unloaded_after_keep_alive_and_reloaded_on_demand(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=0.5)
    ask(local)
    first = local.holder.loaded
    assert first is not None
    assert wait_for(lambda: local.holder.loaded is None)
    assert ask(local).choices[0].finish_reason in ("stop", "length")  # loads it again
    assert local.holder.loaded is not None and local.holder.loaded is not first


def test_keep_alive_zero_in_a_request_unloads_right_after_it(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=3600)
    ask(local)
    # The server's keep_alive holds it: its unload is an hour away (set before the answer came).
    assert local.holder.loaded is not None
    assert local.engine.state()["unload_in_seconds"] > 3000
    ask(local, keep_alive=0)
    assert wait_for(lambda: local.holder.loaded is None, 5)


def test_keep_alive_minus_one_never_unloads(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=0)
    ask(local, keep_alive=-1)
    # No unload pending (set before the answer came), rather than "still loaded a while later".
    assert local.holder.loaded is not None
    assert local.engine.state()["unload_in_seconds"] is None


def test_the_model_stays_while_requests_run(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=0)
    gate = Gate(
        local.holder.get().model
    ).close()  # the slow one is held until the quick one has arrived

    async def overlapping():
        slow = asyncio.create_task(
            local.acompletion("x", FOX, optional_params={"max_tokens": 200, "temperature": 0})
        )
        assert await asyncio.to_thread(gate.held)
        quick = asyncio.create_task(local.acompletion("x", FOX, optional_params={"max_tokens": 1}))
        assert await asyncio.to_thread(wait_for, lambda: local.engine.queued == 1)
        gate.open()
        return await quick, await slow

    try:
        quick, slow = asyncio.run(overlapping())
    finally:
        gate.remove()
    assert quick.usage.completion_tokens == 1 and slow.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    "value",
    [-2, -0.5, 604801, 9.3e9, 1e10, float("inf"), float("-inf"), 10**400, "5m", "300", True],
)
def test_bad_keep_alive_is_refused_naming_the_range(value):
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(FOX, {"keep_alive": value})
    assert info.value.param == "keep_alive" and info.value.status_code == 400
    assert "'keep_alive' must be -1 (never unload), or 0 to 604800 seconds" in info.value.message


def test_ollamas_duration_strings_are_refused_saying_what_to_send():
    with pytest.raises(InvalidRequestError, match=r"send seconds as a number, e\.g\. 300"):
        parse_chat_request(FOX, {"keep_alive": "5m"})


def test_a_raw_extra_bodys_keep_alive_is_checked_and_used():
    """LiteLLM leaves a raw body's extra_body nested: its keep_alive was ignored, even 1e10."""
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(FOX, {"extra_body": {"keep_alive": 1e10}})
    assert info.value.param == "extra_body.keep_alive"
    assert parse_chat_request(FOX, {"extra_body": {"keep_alive": 0}}).keep_alive == 0
    both = {"keep_alive": 5, "extra_body": {"keep_alive": 5}}  # LiteLLM passes both at times
    assert parse_chat_request(FOX, both).keep_alive == 5


@pytest.mark.parametrize("value", [-1, 0, 0.5, 300, 604800, 604800.0])
def test_keep_alive_in_its_range_is_accepted(value):
    assert parse_chat_request(FOX, {"keep_alive": value}).keep_alive == value


@pytest.mark.parametrize("value", ["1e10", "inf", "-2", "604801", "nan"])
def test_the_setting_has_the_same_range(monkeypatch, value):
    monkeypatch.setenv("LOCAL_LLM_KEEP_ALIVE", value)
    with pytest.raises(ValidationError, match=r"keep_alive must be -1 \(never unload\), or 0 to"):
        LocalModelSettings()


@pytest.mark.parametrize("value", ["-1", "0", "604800"])
def test_the_setting_takes_its_range(monkeypatch, value):
    monkeypatch.setenv("LOCAL_LLM_KEEP_ALIVE", value)
    assert LocalModelSettings().keep_alive == float(value)


def test_a_model_infos_keep_alive_past_the_range_stops_the_gateway_naming_it():
    config = {
        "model_list": [
            {
                "model_name": "qwen3-4b",
                "litellm_params": {"model": "zlocal/qwen3-4b"},
                "model_info": {"keep_alive": 1e10},
            }
        ]
    }
    with pytest.raises(ConfigError) as info:
        local_entries(config)
    assert "model 'qwen3-4b': model_info.keep_alive" in str(info.value)
    assert "0 to 604800 seconds" in str(info.value)


def test_a_keep_alive_past_the_idle_waits_limit_is_waited_in_parts(tiny_model_dir, monkeypatch):
    """Set on the engine directly (the settings refuse it): the idle wait is cut into waits of at
    most _LONGEST_WAIT_S (here 0.05 s), and a wait that ends early unloads nothing."""
    monkeypatch.setattr(engine_module, "_LONGEST_WAIT_S", 0.05)
    local = handler(tiny_model_dir, keep_alive=1e12)
    engine = local.engine
    real_get, waits = engine.scheduler.jobs.get, []

    def get(block=True, timeout=None):
        if block and timeout is not None:
            waits.append(timeout)
        return real_get(block, timeout)

    engine.scheduler.jobs.get = get
    try:
        ask(local)
        assert wait_for(lambda: len(waits) >= 3)
        assert max(waits) <= 0.05
        assert local.holder.loaded is not None  # 1e12 s are not over
        assert engine.state()["unload_in_seconds"] > 1e11
        assert ask(local).choices[0].finish_reason in ("stop", "length")
    finally:
        del engine.scheduler.jobs.get
        engine.release().done.wait(10)


@pytest.mark.integration
def test_keep_alive_through_the_gateway(gateway, client):
    client.chat.completions.create(
        model="qwen3-4b", messages=FOX, max_tokens=2, extra_body={"keep_alive": 0}
    )
    assert wait_for(lambda: "Unloaded the local model" in gateway.log())
    again = client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2)
    assert again.usage.completion_tokens >= 1


@pytest.mark.integration
def test_keep_alive_past_the_range_gets_400_through_the_gateway(gateway, client):
    """Issue 20: keep_alive 1e10 was accepted, then the engine's idle wait raised OverflowError on
    every loop (641,825 log lines in 6 s) until another request came."""
    from tests.test_local_state import get_state  # it imports this module

    overflows = gateway.log().count("OverflowError")
    for body in ({"keep_alive": 1e10}, {"extra_body": {"keep_alive": 1e10}}):
        r = gateway.chat({"model": "qwen3-4b", "messages": FOX, "max_tokens": 2, **body})
        assert r.status_code == 400, r.text[:500]
        error = r.json()["error"]
        assert error["param"] == next(iter(body)).replace("extra_body", "extra_body.keep_alive")
        assert "keep_alive' must be -1 (never unload), or 0 to 604800 seconds" in error["message"]
    # The longest keep_alive accepted is served, and the engine then waits idle without a fault.
    longest = client.chat.completions.create(
        model="qwen3-4b", messages=FOX, max_tokens=2, extra_body={"keep_alive": 604800}
    )
    assert longest.usage.completion_tokens >= 1
    assert wait_for(lambda: (get_state(gateway)["unload_in_seconds"] or 0) > 600000)
    again = client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2)
    assert again.usage.completion_tokens >= 1  # and back to the gateway's own keep_alive
    assert gateway.log().count("OverflowError") == overflows
