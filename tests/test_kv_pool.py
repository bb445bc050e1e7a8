"""The running rows' KV pool: allocated as rows need it, written in place, within its budget."""

from __future__ import annotations

import asyncio

import pytest

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings
from tests.test_batching import ENDLESS, _messages
from tests.test_keep_alive import wait_for

LONG = {"max_tokens": 200, "temperature": 1.0, "response_format": ENDLESS}


def handler(model_dir, **settings) -> LocalLLM:
    return LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(model_dir), **settings)))


def test_decoding_writes_in_place_and_the_pool_is_freed_with_its_last_row(tiny_model_dir):
    local = handler(tiny_model_dir)
    engine = local.engine

    async def scenario():
        running = asyncio.create_task(local.acompletion("x", _messages(1), optional_params=LONG))
        seen = []  # (tensor address, row 0's tokens in the pool) while it decodes
        while not running.done():
            batch = engine._batch
            lengths = batch.lengths  # one read: the engine thread replaces the list
            if batch.keys and lengths:
                seen.append((batch.keys[0].data_ptr(), lengths[0]))
            await asyncio.sleep(0.001)
        return seen, await running

    seen, answer = asyncio.run(scenario())
    assert answer.usage.completion_tokens == 200
    lengths = [length for _, length in seen]
    assert lengths[-1] - lengths[0] > 50  # many steps were seen
    assert len({address for address, _ in seen}) == 1  # ... all into the same tensor
    state = local.state()["models"][0]["kv_cache"]
    assert state["bytes"] == 0 and state["slots"] == 0  # an idle model holds no KV


def test_a_request_that_cannot_fit_alone_is_a_400_that_says_so(tiny_model_dir):
    local = handler(tiny_model_dir, kv_cache_mb=0.25)  # tiny model: 512 bytes a token
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(local.acompletion("x", _messages(1), optional_params={"max_tokens": 1000}))
    assert "LOCAL_LLM_KV_CACHE_MB" in info.value.message and info.value.param == "max_tokens"
    assert info.value.status_code == 400
    # Without max_tokens the answer gets what fits, instead of a refusal.
    answer = asyncio.run(local.acompletion("x", _messages(1), optional_params={"seed": 1}))
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_request_that_does_not_fit_next_to_the_running_ones_waits_then_is_served(
    tiny_model_dir,
):
    local = handler(tiny_model_dir, kv_cache_mb=0.2)  # room for one row of 256 columns, not two
    engine = local.engine
    budget = engine.kv_budget(local.holder.get())
    assert budget.bytes_for(1, 256) <= budget.budget_bytes < budget.bytes_for(2, 256)

    async def scenario():
        first = asyncio.create_task(local.acompletion("x", _messages(1), optional_params=LONG))
        assert await asyncio.to_thread(wait_for, lambda: engine.running == 1)
        second = asyncio.create_task(local.acompletion("x", _messages(2), optional_params=LONG))
        assert await asyncio.to_thread(wait_for, lambda: engine.queued == 1)
        await asyncio.sleep(0.2)
        alone = engine.running == 1 and engine.queued == 1  # it waits for the pool, not the batch
        return alone, await first, await second

    alone, first, second = asyncio.run(scenario())
    assert alone
    assert first.usage.completion_tokens == second.usage.completion_tokens == 200
