"""The running rows' KV pool: allocated as rows need it, written in place, within its budget."""

from __future__ import annotations

import asyncio

import pytest

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings
from tests.pace import Gate, wait_for
from tests.test_batching import ENDLESS, _messages

LONG = {"max_tokens": 200, "temperature": 1.0, "response_format": ENDLESS}


def handler(model_dir, **settings) -> LocalLLM:
    return LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(model_dir), **settings)))


def test_decoding_writes_in_place_and_the_pool_is_freed_with_its_last_row(tiny_model_dir):
    # One token a step: a lone constrained row would otherwise check its grammar's forced tokens
    # several a pass (grammar fast-forward, tests/test_grammar_forward.py).
    local = handler(tiny_model_dir, draft_tokens=0)
    engine = local.engine

    def look():  # before each forward pass: the pool's tensor and row 0's tokens in it
        batch = engine.runner.batch
        return (batch.keys[0].data_ptr(), batch.lengths[0]) if batch.keys else None

    gate = Gate(local.holder.get().model, look=look)
    try:
        answer = asyncio.run(local.acompletion("x", _messages(1), optional_params=LONG))
    finally:
        gate.remove()
    assert answer.usage.completion_tokens == 200
    seen = [s for s in gate.seen if s is not None]  # the prefill comes before the pool
    assert [length for _, length in seen] == list(range(seen[0][1], seen[0][1] + 199))
    assert len({address for address, _ in seen}) == 1  # every step wrote into the same tensor

    # An idle model holds no KV: the finished row leaves at the engine's next loop, which may come
    # after the answer is back (seen once in a full run).
    def pool():
        return local.state()["models"][0]["kv_cache"]

    assert wait_for(lambda: pool()["bytes"] == 0 and pool()["slots"] == 0), pool()


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
    # Room for one row of 256 columns, not two; one token a step (passes are counted below).
    local = handler(tiny_model_dir, kv_cache_mb=0.2, draft_tokens=0)
    engine = local.engine
    budget = engine.kv_budget(local.holder.get())
    assert budget.bytes_for(1, 256) <= budget.budget_bytes < budget.bytes_for(2, 256)
    # The first request is held at its first decoding step until the second waits in the queue:
    # the second then comes while the first runs, on any machine, however fast.
    gate = Gate(local.holder.get().model).close()

    async def scenario():
        first = asyncio.create_task(local.acompletion("x", _messages(1), optional_params=LONG))
        assert await asyncio.to_thread(gate.held)
        second = asyncio.create_task(local.acompletion("x", _messages(2), optional_params=LONG))
        assert await asyncio.to_thread(wait_for, lambda: engine.queued == 1)
        alone = engine.running == 1 and engine.queued == 1
        gate.open()
        return alone, await first, await second

    try:
        alone, first, second = asyncio.run(scenario())
    finally:
        gate.remove()
    assert alone
    assert first.usage.completion_tokens == second.usage.completion_tokens == 200
    # It waited for the pool, not the batch: never decoded next to the first, its prompt
    # prefilled only once the first's 199 decoding steps were done.
    prefills = [i for i, (_, columns) in enumerate(gate.passes) if columns > 1]
    assert prefills == [0, 200], gate.passes[:3]
    assert all(rows == 1 for rows, _ in gate.passes)
