"""Continuous batching: requests decoded together each get exactly what they asked for."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from custom_handlers.inference.errors import OverloadedError
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings
from tests.pace import DEADLINE_S, Gate, paced_checkpoint, wait_for
from tests.servers import Gateway

LOCAL = "qwen3-4b"
# A JSON array that cannot be finished: end-of-turn is never allowed, so a request with it runs its
# whole budget (the random model would otherwise end it at a random token).
ENDLESS = {
    "type": "json_schema",
    "json_schema": {
        "name": "endless",
        "schema": {"type": "array", "items": {"type": "string"}, "minItems": 100000},
    },
}


def _messages(i: int) -> list[dict]:
    # Prompts of different lengths, so rows are padded differently in the batch.
    return [{"role": "user", "content": "a fox " * (1 + 3 * i) + f"number {i}"}]


def _requests(stop_a: str, stop_b: str) -> list[dict]:
    return [
        {"messages": _messages(0), "temperature": 0, "max_tokens": 16},
        {"messages": _messages(1), "temperature": 0, "max_tokens": 16},
        {"messages": _messages(2), "temperature": 1.0, "seed": 21, "max_tokens": 16},
        {"messages": _messages(3), "temperature": 0.7, "top_p": 0.9, "seed": 5, "max_tokens": 16},
        {"messages": _messages(4), "temperature": 1.0, "seed": 8, "max_tokens": 40, "stop": stop_a},
        {
            "messages": _messages(5),
            "temperature": 1.0,
            "seed": 9,
            "max_tokens": 40,
            "stop": [stop_b, "zz-never"],
        },
        {"messages": _messages(6), "temperature": 1.0, "seed": 3, "max_tokens": 3},
        {"messages": _messages(7), "temperature": 0, "max_tokens": 7},
    ]


def _outcome(response) -> tuple:
    choice = response.choices[0]
    return choice.message.content, choice.finish_reason, response.usage.completion_tokens


def _piece(text: str) -> str:
    for start in range(3, len(text) - 2):
        if text[start : start + 2].strip() and "\ufffd" not in text[start : start + 2]:
            return text[start : start + 2]
    pytest.fail(f"no stop candidate in {text!r}")


@pytest.mark.integration
def test_each_request_in_a_mixed_batch_gets_what_it_gets_alone(client, aclient):
    def alone(body):
        return client.chat.completions.create(model=LOCAL, **body)

    full_a = alone({**_requests("x", "y")[4], "stop": None}).choices[0].message.content
    full_b = alone({**_requests("x", "y")[5], "stop": None}).choices[0].message.content
    bodies = _requests(_piece(full_a), _piece(full_b))
    expected = [_outcome(alone(body)) for body in bodies]

    async def together():
        return await asyncio.gather(
            *(aclient.chat.completions.create(model=LOCAL, **body) for body in bodies)
        )

    got = [_outcome(r) for r in asyncio.run(together())]
    assert got == expected
    assert got[4][1] == got[5][1] == "stop"  # the stop strings ended those two
    assert got[6][1:] == ("length", 3) and got[7][1:] == ("length", 7)


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    return LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))


def test_requests_arriving_together_share_the_batch(handler):
    # The first one to arrive is held at its first decoding step until all six are in: they
    # arrive together on any machine, however fast it decodes.
    gate = Gate(handler.holder.get().model).close()
    engine = handler.engine

    async def burst():
        asked = asyncio.gather(
            *(
                handler.acompletion(
                    "x", _messages(i), optional_params={"max_tokens": 20, "temperature": 0}
                )
                for i in range(6)
            )
        )
        assert await asyncio.to_thread(gate.held)
        assert await asyncio.to_thread(wait_for, lambda: engine.running + engine.queued == 6)
        gate.open()
        return await asked

    try:
        answers = asyncio.run(burst())
    finally:
        gate.remove()
    assert len(answers) == 6
    assert handler.engine.peak_rows == 6  # decoded together, not one after another


def test_a_cancelled_request_leaves_the_batch_at_once(handler, cancelled_generations):
    # One token a row a step, so that the passes count the tokens (the JSON row would otherwise
    # check its grammar's forced tokens in passes of several).
    handler.engine.draft_tokens = 0
    gate = Gate(handler.holder.get().model).close()

    def made() -> int:  # the second row's tokens: its first, then one per 2-row step done
        done = gate.passes[:-1]  # the last pass is the one held at the gate: not done yet
        return 1 + sum(1 for shape in done if shape == (2, 1))

    async def scenario():
        keeps = asyncio.create_task(
            handler.acompletion(
                "x", _messages(1), optional_params={"max_tokens": 300, "temperature": 0}
            )
        )
        assert await asyncio.to_thread(gate.held)  # keeps: prefilled, held at its first step
        leaves = handler.astreaming(
            "x", _messages(2), optional_params={"max_tokens": 1500, "response_format": ENDLESS}
        )
        first = asyncio.ensure_future(leaves.__anext__())
        # One step at a time until the leaving stream has its first chunk; the engine then stands
        # still, so what it made before the client left is known exactly.
        while not first.done():
            waits = gate.waits
            gate.let(1)
            assert await asyncio.to_thread(gate.held, after=waits)
        await first
        before = made()
        await leaves.aclose()  # the client went away
        gate.open()
        assert await asyncio.to_thread(wait_for, lambda: handler.engine.running <= 1)
        return before, await keeps

    try:
        before, kept = asyncio.run(scenario())
    finally:
        gate.remove()
    assert kept.choices[0].finish_reason in ("stop", "length")
    # It left with the step under way when it was cancelled, at most: never one more.
    assert len(cancelled_generations) == 1
    assert before <= cancelled_generations[0] <= before + 1, (before, cancelled_generations)


def test_a_full_queue_refuses_with_retry_after(tiny_model_dir):
    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))
    local.engine.max_rows, local.engine.max_queue = 1, 1
    long = {"max_tokens": 1500, "temperature": 1.0, "response_format": ENDLESS}
    gate = Gate(local.holder.get().model).close()  # the running one stays running

    async def scenario():
        running = local.astreaming("x", _messages(0), optional_params=long)
        await running.__anext__()  # in the batch, which is now full
        waiting = asyncio.create_task(local.acompletion("x", _messages(1), optional_params=long))
        assert await asyncio.to_thread(wait_for, lambda: local.engine.queued == 1)
        with pytest.raises(OverloadedError) as info:
            await local.acompletion("x", _messages(2), optional_params=long)
        await running.aclose()
        waiting.cancel()
        return info.value

    try:
        error = asyncio.run(scenario())
    finally:
        gate.remove()
    assert error.status_code == 503 and error.retry_after >= 1
    assert "LOCAL_LLM_MAX_QUEUE=1" in error.message


@pytest.mark.integration
def test_the_gateway_answers_overload_with_503_and_retry_after(tiny_model_dir, tmp_path):
    paced, hold = paced_checkpoint(tiny_model_dir, tmp_path / "paced")
    gw = Gateway(
        env={
            "LOCAL_LLM_MODEL": str(paced),
            "LOCAL_LLM_TRUST_REMOTE_CODE": "true",
            "LOCAL_LLM_MAX_BATCH_SIZE": "1",
            "LOCAL_LLM_MAX_QUEUE": "1",
        },
        workdir=tmp_path,
    ).start()
    body = {
        "model": LOCAL,
        "messages": _messages(0),
        "max_tokens": 1900,
        "stream": True,
        "response_format": ENDLESS,
    }

    async def requests(http: httpx.AsyncClient) -> dict:
        return (await http.get("/local/state")).json()["models"][0]["requests"]

    async def until(http: httpx.AsyncClient, expected: dict) -> dict:
        deadline = time.monotonic() + DEADLINE_S
        while (seen := await requests(http)) != expected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return seen

    async def scenario(http: httpx.AsyncClient):
        await http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 1})
        hold.decoding()  # the first request stays running until released, however fast
        async with http.stream("POST", "/v1/chat/completions", json=body) as first:
            lines = first.aiter_lines()  # kept: a dropped iterator closes the response
            await anext(lines)  # running: the batch (1 row) is full
            queued = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            waiting = await until(http, {"running": 1, "queued": 1})
            refused = await http.post("/v1/chat/completions", json={**body, "stream": False})
        queued.cancel()
        hold.release()
        drained = await until(http, {"running": 0, "queued": 0})
        after = await http.post(
            "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}
        )
        return waiting, refused, drained, after

    async def run():
        async with httpx.AsyncClient(
            base_url=gw.base_url, timeout=120, headers={"Authorization": f"Bearer {gw.key}"}
        ) as http:
            return await scenario(http)

    try:
        waiting, refused, drained, after = asyncio.run(run())
    finally:
        hold.release()
        gw.stop()
    assert waiting == {"running": 1, "queued": 1}
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert "busy" in refused.json()["error"]["message"]
    assert drained == {"running": 0, "queued": 0}  # both left when their clients did
    assert after.status_code == 200  # served again once the queue drained


def test_waiting_text_of_a_choice_is_sent_as_one_chunk():
    from custom_handlers.inference.jobs import Delta, Done, Finish, coalesce

    events = [
        Delta(0, "a"),
        Delta(0, "b"),
        Delta(1, "x"),
        Delta(0, "c"),
        Finish(0, "stop", 3),
        Delta(0, "d"),
        Done(),
    ]
    assert coalesce(events) == [
        Delta(0, "ab"),
        Delta(1, "x"),
        Delta(0, "c"),
        Finish(0, "stop", 3),
        Delta(0, "d"),
        Done(),
    ]
