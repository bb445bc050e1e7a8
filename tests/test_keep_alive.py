"""keep_alive: the idle model is unloaded and its memory returned; the next request reloads it."""

from __future__ import annotations

import asyncio
import time

import pytest

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.request import parse_chat_request
from custom_handlers.inference.settings import LocalModelSettings

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
    time.sleep(0.3)
    assert local.holder.loaded is not None  # the server's keep_alive holds it
    ask(local, keep_alive=0)
    assert wait_for(lambda: local.holder.loaded is None, 5)


def test_keep_alive_minus_one_never_unloads(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=0)
    ask(local, keep_alive=-1)
    time.sleep(0.5)
    assert local.holder.loaded is not None


def test_the_model_stays_while_requests_run(tiny_model_dir):
    local = handler(tiny_model_dir, keep_alive=0)

    async def overlapping():
        slow = asyncio.create_task(
            local.acompletion("x", FOX, optional_params={"max_tokens": 200, "temperature": 0})
        )
        await asyncio.sleep(0.05)
        quick = await local.acompletion("x", FOX, optional_params={"max_tokens": 1})
        return quick, await slow

    quick, slow = asyncio.run(overlapping())
    assert quick.usage.completion_tokens == 1 and slow.usage.completion_tokens >= 1


@pytest.mark.parametrize("value", [-2, "5m", True])
def test_bad_keep_alive_is_refused(value):
    with pytest.raises(InvalidRequestError, match="keep_alive"):
        parse_chat_request(FOX, {"keep_alive": value})


@pytest.mark.integration
def test_keep_alive_through_the_gateway(gateway, client):
    client.chat.completions.create(
        model="qwen3-4b", messages=FOX, max_tokens=2, extra_body={"keep_alive": 0}
    )
    assert wait_for(lambda: "Unloaded the local model" in gateway.log())
    again = client.chat.completions.create(model="qwen3-4b", messages=FOX, max_tokens=2)
    assert again.usage.completion_tokens >= 1
