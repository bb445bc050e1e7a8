"""Decoding steps through the CUDA-graph path: bucketed, padded, checked, and eager on any failure.

On the CPU the graph path runs in its "static" mode: the same padded rows, bucketed widths and
static buffers as on CUDA, without capturing. A captured graph replays exactly those steps, so
what can go wrong in the shapes and buffers is checked here; only the capture itself needs CUDA
(the last test, skipped without it).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from custom_handlers.inference import decode
from custom_handlers.inference.provider import LocalLLM
from tests.pace import arriving_together, wait_for
from tests.test_batching import ENDLESS, _messages
from tests.test_kv_pool import handler as kv_pool_handler

# Rows of different prompt and answer lengths that join and leave at different steps, so the batch
# goes through several row buckets (16 for 9 rows down to 1 for the last) and, with the long
# answers, two widths (256 and 512 columns).
BODIES = [
    {"max_tokens": tokens, "temperature": 0, "response_format": ENDLESS}
    for tokens in (300, 5, 40, 12, 330, 3, 25, 60, 8)
]


def handler(model_dir, graph_mode: str | None = None, **settings) -> LocalLLM:
    local = kv_pool_handler(model_dir, **settings)
    local.engine.graph_mode = graph_mode
    return local


def answers(local: LocalLLM, bodies=BODIES, n: int = 1) -> list[tuple[str, str, int]]:
    """The bodies' answers, sent at once; they arrive together on any machine (tests/pace.py)."""

    async def together():
        return await asyncio.gather(
            *(
                local.acompletion("x", _messages(i), optional_params={**body, "n": n})
                for i, body in enumerate(bodies)
            )
        )

    return [
        (c.message.content, c.finish_reason, r.usage.completion_tokens)
        for r in arriving_together(local, len(bodies), lambda: asyncio.run(together()))
        for c in r.choices
    ]


def graphs_state(local: LocalLLM) -> dict:
    return local.state()["models"][0]["cuda_graphs"]


@pytest.fixture(scope="module")
def eager_answers(tiny_model_dir):
    return answers(handler(tiny_model_dir))


def test_the_graph_path_answers_token_for_token_as_eager_decoding(
    tiny_model_dir, eager_answers, caplog
):
    caplog.set_level(logging.INFO, logger="custom_handlers.engine")
    local = handler(tiny_model_dir, "static")
    got = answers(local)
    lines = [r.getMessage() for r in caplog.records if "CUDA graphs" in r.getMessage()]
    # At load, before the first prefill: every size of the reserved pool's shape (tiny model:
    # 16 slots of the whole 2,048-token context), none later (the shape never changed).
    assert len(lines) == 1 and "20 captured for 16 slots x 2048 columns" in lines[0]
    assert "each agreeing with an eager step" in lines[0]
    assert got == eager_answers
    assert [tokens for _, _, tokens in got] == [b["max_tokens"] for b in BODIES]
    state = graphs_state(local)
    assert state["enabled"] is True and state["off_reason"] is None
    assert state["capture_seconds"] > 0 and state["graphs"] == state["captured"] == 20
    assert state["eager_steps"] == 0  # every step was replayed
    assert state["memory_bytes"] > 0  # the static mode's figure: the graphs' logits buffers
    sizes = set(local.engine.runner.decoder._graphs)  # (slots, columns, rows, width)
    assert {rows for _, _, rows, _ in sizes} == {1, 2, 4, 8, 16}
    assert {width for _, _, _, width in sizes} == {256, 512, 1024, 2048}


def test_with_graphs_the_pool_is_kept_while_loaded_and_freed_with_the_model(tiny_model_dir):
    local = handler(tiny_model_dir, "static")
    answers(local, BODIES[:3])
    pool = local.state()["models"][0]["kv_cache"]
    assert pool["bytes"] > 0 and pool["slots"] >= 4  # idle, still allocated: graphs point into it
    address = local.engine.runner.batch.keys[0].data_ptr()
    again = answers(local, BODIES[1:3])  # fits the kept pool: same tensors, graphs reused
    assert local.engine.runner.batch.keys[0].data_ptr() == address
    assert again == answers(handler(tiny_model_dir), BODIES[1:3])
    captured = local.engine.runner.decoder.captured
    answers(local, BODIES[1:3])
    assert local.engine.runner.decoder.captured == captured  # nothing captured again
    assert asyncio.run(local.release())["released"]
    pool = local.state()["models"][0]["kv_cache"]
    assert pool["bytes"] == 0 and pool["slots"] == 0
    assert local.engine.runner.decoder is None  # the graphs went with the model


def test_n_choices_and_sampling_with_a_seed_are_the_same_through_graphs(tiny_model_dir):
    bodies = [{"max_tokens": 30, "temperature": 1.0, "seed": 7}, {"max_tokens": 20, "seed": 8}]
    assert answers(handler(tiny_model_dir, "static"), bodies, n=3) == answers(
        handler(tiny_model_dir), bodies, n=3
    )


@pytest.fixture
def engine_log(caplog):
    caplog.set_level(logging.WARNING, logger="custom_handlers.engine")
    return caplog


def test_a_graph_that_disagrees_with_eager_turns_graphs_off_with_one_line(
    tiny_model_dir, eager_answers, engine_log, monkeypatch
):
    monkeypatch.setattr(decode, "disagreement", lambda got, expected: "differs by 3.1e-01")
    local = handler(tiny_model_dir, "static")
    assert answers(local) == eager_answers  # the mismatched step was run again, eagerly
    state = graphs_state(local)
    assert state["enabled"] is False and "differs by 3.1e-01" in state["off_reason"]
    assert state["graphs"] == 0
    lines = [r.getMessage() for r in engine_log.records if "CUDA graphs off" in r.getMessage()]
    assert len(lines) == 1 and "decoding runs eager" in lines[0] and "differs" in lines[0]


def test_a_capture_that_fails_turns_graphs_off_and_decoding_goes_on(
    tiny_model_dir, eager_answers, engine_log, monkeypatch
):
    def broken(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode.Decoder, "_capture", broken)
    local = handler(tiny_model_dir, "static")
    assert answers(local) == eager_answers
    assert "operation not permitted" in graphs_state(local)["off_reason"]
    assert len([r for r in engine_log.records if "CUDA graphs off" in r.getMessage()]) == 1
    asyncio.run(local.release())
    pool = local.state()["models"][0]["kv_cache"]
    assert pool["bytes"] == 0


def test_graphs_are_off_on_the_cpu_and_when_the_setting_says_so(tiny_model_dir):
    cpu = handler(tiny_model_dir)
    assert graphs_state(cpu)["enabled"] is None  # nothing loaded yet
    answers(cpu, BODIES[:1])
    off_on_cpu = {
        "enabled": False,
        "graphs": 0,
        "captured": 0,
        "capture_seconds": 0.0,
        "memory_bytes": 0,
        "eager_steps": 0,
    }
    assert graphs_state(cpu) == {**off_on_cpu, "off_reason": "not on CUDA (cpu)"}
    # Eager: the pool is freed with its last row, at the engine's loop after the answer.
    assert wait_for(lambda: cpu.state()["models"][0]["kv_cache"]["bytes"] == 0)
    off = handler(tiny_model_dir, cuda_graphs=False)
    assert graphs_state(off)["off_reason"] == "turned off (cuda_graphs: false)"


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_captured_cuda_graphs_answer_as_eager_decoding_on_cuda(tiny_model_dir):
    on_cuda = {"device": "cuda", "dtype": "float32", "quantization": "none"}  # greedy: no ties
    eager = answers(handler(tiny_model_dir, cuda_graphs=False, **on_cuda))
    local = handler(tiny_model_dir, **on_cuda)
    assert answers(local) == eager
    state = graphs_state(local)
    assert state["enabled"] is True and state["graphs"] >= 4, state
