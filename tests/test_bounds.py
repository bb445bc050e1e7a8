"""Every number a request passes is bounded where it reaches the sampler or the engine (issue 20):
tiny temperatures and top_p decode greedily, a huge top_k is no limit, and a loop of the engine
thread that keeps failing is logged once and backed off, never retried in a spin."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.request import SamplingParams
from custom_handlers.inference.sampling import row_sampling, sample
from custom_handlers.inference.settings import LocalModelSettings

FOX = [{"role": "user", "content": "a fox in a misty forest"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    handler = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))
    yield handler
    handler.engine.release().done.wait(10)


def answer(local: LocalLLM, **params) -> tuple:
    """What a request got: text, finish reason, tokens, each token's bytes (its id, spelled)."""
    params = {"max_tokens": 24, "logprobs": True, **params}
    r = asyncio.run(local.acompletion("x", FOX, optional_params=params))
    choice = r.choices[0]
    tokens = [tuple(t.bytes) for t in choice.logprobs.content]
    return choice.message.content, choice.finish_reason, r.usage.completion_tokens, tokens


@pytest.fixture(scope="module")
def greedy(local) -> tuple:
    return answer(local, **GREEDY)


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 1e-30, 5e-6])
@pytest.mark.parametrize("seed", [None, 7])
def test_a_temperature_too_small_to_differ_from_zero_decodes_greedily(
    local, greedy, temperature, seed
):
    # Before: 1e-45 sampled at random (the logits divided by it were inf, the draw NaN) and 1e-300
    # (0 in float32) answered "" after one token.
    assert answer(local, temperature=temperature, seed=seed) == greedy


def test_sampling_differs_from_greedy_on_this_prompt(local, greedy):
    """The test above would prove nothing if sampling gave the greedy answer anyway."""
    assert answer(local, temperature=1.0, top_p=1.0, seed=7) != greedy


@pytest.mark.parametrize("top_p", [1e-300, 5e-324])
def test_a_tiny_top_p_keeps_only_the_best_token(local, greedy, top_p):
    assert answer(local, temperature=1.0, top_p=top_p, seed=3) == greedy


def test_a_top_k_past_the_vocabulary_is_no_limit(local):
    # Before: 2**64 raised "Overflow when unpacking long long" in the sampler: a 500.
    beyond = answer(local, temperature=1.0, top_p=1.0, top_k=2**64, seed=5)
    vocabulary = answer(local, temperature=1.0, top_p=1.0, top_k=10**6, seed=5)
    assert beyond == vocabulary


def test_the_checkpoints_own_tiny_temperature_and_negative_top_k_are_safe():
    """Defaults come from a checkpoint's generation_config: 1e-9 is greedy there too, and a top_k
    of -1 means no top-k (it masked every token before)."""
    import torch

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    tiny = row_sampling(SamplingParams(), {"temperature": 1e-9, "top_p": 1.0, "top_k": 0}, "cpu", 0)
    assert tiny.greedy
    rows = [
        row_sampling(
            SamplingParams(seed=s, top_p=1e-300),
            {"temperature": 1.0, "top_p": 1.0, "top_k": -1},
            "cpu",
            0,
        )
        for s in range(8)
    ]
    assert all(r.top_k == 0 and not r.greedy for r in rows)
    assert sample(logits.expand(8, -1).clone(), rows) == [1] * 8


# ---- the engine thread's loop -------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


def wait_for(condition, seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@pytest.fixture
def engine_log():
    records = _Records()
    logger = logging.getLogger("custom_handlers.engine")
    logger.addHandler(records)
    yield records
    logger.removeHandler(records)


def test_a_failing_idle_wait_is_logged_once_backed_off_and_the_engine_still_serves(
    tiny_model_dir, engine_log
):
    """The idle wait fails as keep_alive 1e10 made it fail (OverflowError from the queue's timed
    wait, only while the queue is empty): one log line, growing pauses between tries, and a request
    that arrives meanwhile is served."""
    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))
    local.engine.keep_alive = 3600
    jobs = local.engine.scheduler.jobs
    real_get, failed_at = jobs.get, []

    def get(block=True, timeout=None):
        if block and timeout is not None and not jobs.qsize():
            failed_at.append(time.monotonic())
            raise OverflowError("timestamp out of range for platform time_t")
        return real_get(block, timeout)

    jobs.get = get  # before the thread starts: its first wait has no timeout (nothing loaded)
    try:
        first = asyncio.run(local.acompletion("x", FOX, optional_params={"max_tokens": 2}))
        assert first.usage.completion_tokens >= 1
        assert wait_for(lambda: len(failed_at) >= 6)  # the idle wait fails from now on
        errors = engine_log.errors()
        assert len(errors) == 1, errors
        assert "failed with no request running" in errors[0]
        (record,) = [r for r in engine_log.records if r.levelno >= logging.ERROR]
        assert record.exc_info[0] is OverflowError  # with its traceback, once
        # Backed off, not a spin: the 5th failure in a row waits 10 ms * 2**3 before the 6th try.
        assert failed_at[5] - failed_at[4] >= 0.07
        served = asyncio.run(local.acompletion("x", FOX, optional_params={"max_tokens": 2}))
        assert served.usage.completion_tokens >= 1
        assert local.engine._thread.is_alive()
        del jobs.get  # the fault goes away: the next loop that completes says so, once
        asyncio.run(local.acompletion("x", FOX, optional_params={"max_tokens": 2}))
        assert wait_for(lambda: any("works again" in r.getMessage() for r in engine_log.records))
    finally:
        jobs.__dict__.pop("get", None)
        local.engine.release().done.wait(10)
