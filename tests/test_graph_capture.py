"""The CUDA-graph path's own CUDA logic, on the CPU: streams, devices, capture at load, the bounded
set of sizes, memory, out-of-memory captures and torch 2.11's allocator state (issue 23).

The engine runs in its "cuda" graph mode with ``tests/fake_cuda.py`` standing in for
``decode.CudaApi``: the fake records what the graph path asks of CUDA, and its "graphs" record the
real step's aten operations and replay them on the same tensors, as CUDA replays kernels on the
same addresses. So answers decoded from replays must be the eager answers, token for token.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from tests.fake_cuda import FakeCuda
from tests.pace import DEADLINE_S, wait_for
from tests.test_decode_graphs import BODIES, answers, graphs_state, handler


def on_fake_cuda(model_dir, api: FakeCuda | None = None, **settings):
    local = handler(model_dir, "cuda", **settings)
    local.engine.cuda_api = api or FakeCuda()
    return local, local.engine.cuda_api


@pytest.fixture(scope="module")
def eager_answers(tiny_model_dir):
    return answers(handler(tiny_model_dir))


def test_replayed_steps_answer_as_eager_on_the_models_device_and_its_own_stream(
    tiny_model_dir, eager_answers
):
    local, cuda = on_fake_cuda(tiny_model_dir)
    assert answers(local) == eager_answers
    state = graphs_state(local)
    assert state["enabled"] is True and state["eager_steps"] == 0, state
    assert state["graphs"] == state["captured"] == 20  # 5 row counts x 4 widths, at load
    device = local.holder.get().model.device
    # One side stream, made once, on the model's device (cuBLAS keeps a workspace per stream);
    # every capture on it, with the model's device current, into one memory pool.
    assert [s.device for s in cuda.streams] == [device]
    assert {id(c["stream"]) for c in cuda.captures} == {id(cuda.streams[0])}
    assert {c["device"] for c in cuda.captures} == {torch.device(device)}
    assert len({c["pool"] for c in cuda.captures}) == 1
    # Every replay with the model's device current (cuda:1 replays on cuda:1).
    assert cuda.replays and {d for d, _ in cuda.replays} == {torch.device(device)}


def test_two_models_capture_on_streams_of_their_own(tiny_model_dir):
    cuda = FakeCuda()
    first, _ = on_fake_cuda(tiny_model_dir, cuda)
    second, _ = on_fake_cuda(tiny_model_dir, cuda)
    answers(first, BODIES[:1])
    answers(second, BODIES[:1])
    assert len(cuda.streams) == 2 and cuda.streams[0] is not cuda.streams[1]
    assert {id(c["stream"]) for c in cuda.captures} == {id(s) for s in cuda.streams}
    assert all(c["stream"] is not None for c in cuda.captures)  # never torch's shared default


def test_unloading_frees_the_graphs_and_cublas_workspaces(tiny_model_dir):
    local, cuda = on_fake_cuda(tiny_model_dir)
    answers(local, BODIES[:2])
    assert cuda.workspaces_cleared == 0
    assert asyncio.run(local.release())["released"]
    assert cuda.workspaces_cleared == 1
    assert local.engine.runner.decoder is None
    assert local.state()["models"][0]["kv_cache"]["bytes"] == 0


def test_graph_memory_is_reported_in_the_state(tiny_model_dir):
    local, cuda = on_fake_cuda(tiny_model_dir)
    answers(local, BODIES[:1])
    state = graphs_state(local)
    assert state["memory_bytes"] == cuda.reserved > 0  # what the captures took, as measured


def test_a_capture_short_of_memory_skips_that_size_and_is_tried_again_when_idle(
    tiny_model_dir, eager_answers, caplog
):
    caplog.set_level(logging.WARNING, logger="custom_handlers.engine")
    cuda = FakeCuda()
    cuda.fail_next.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    local, _ = on_fake_cuda(tiny_model_dir, cuda)
    local.holder.get()
    assert answers(local) == eager_answers
    state = graphs_state(local)
    assert state["enabled"] is True and state["off_reason"] is None  # not off for good
    # The size that ran out of memory (1 row, 256 columns: the first) decoded eagerly meanwhile,
    # and is captured at the engine's first idle moment.
    assert wait_for(lambda: graphs_state(local)["graphs"] == 20), graphs_state(local)
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "out of GPU memory" in line and "try 1 of 3" in line]
    assert not [line for line in lines if "CUDA graphs off" in line]


def test_a_failed_capture_does_not_leave_the_allocator_capturing(tiny_model_dir, eager_answers):
    # torch 2.11: a capture that fails at its end leaves the allocator "capturing"; the next
    # capture's empty_cache would then fail an internal assert and turn graphs off.
    cuda = FakeCuda(leaves_capture_open=True)
    cuda.fail_next.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    local, _ = on_fake_cuda(tiny_model_dir, cuda)
    local.holder.get()
    assert answers(local) == eager_answers
    # The size that failed is captured at the first idle moment; no capture runs after that.
    assert wait_for(lambda: graphs_state(local)["graphs"] == 20), graphs_state(local)
    assert len(cuda.ended) == 1 and not cuda.open_captures  # ended by the decoder
    cuda.empty_cache()  # the allocator works again
    assert graphs_state(local)["enabled"] is True


def test_a_capture_that_fails_otherwise_turns_graphs_off_and_decoding_goes_on(
    tiny_model_dir, eager_answers
):
    cuda = FakeCuda()
    cuda.fail_next.append(RuntimeError("CUDA error: operation failed due to a previous error"))
    local, _ = on_fake_cuda(tiny_model_dir, cuda)
    assert answers(local) == eager_answers
    state = graphs_state(local)
    assert state["enabled"] is False and "operation failed" in state["off_reason"]
    assert not cuda.open_captures


def test_a_new_pool_shape_keeps_the_old_graphs_and_is_captured_when_idle(tiny_model_dir):
    # 2 MiB for the tiny model (512 bytes a token): 4,096 tokens, 16 slots of 256 columns at
    # load. A 300-token answer needs 512 columns: the pool's shape becomes 8 x 512 in place.
    local, _ = on_fake_cuda(tiny_model_dir, kv_cache_mb=2)
    eager = handler(tiny_model_dir, kv_cache_mb=2)
    assert answers(local, BODIES[3:4]) == answers(eager, BODIES[3:4])  # 12 tokens: 256 columns
    assert graphs_state(local)["graphs"] == 5  # at load: 1, 2, 4, 8, 16 rows x 256 columns
    assert (local.engine.runner.batch.slots, local.engine.runner.batch.columns) == (16, 256)
    address = local.engine.runner.batch.keys[0].data_ptr()
    expected = answers(eager, BODIES[:3])
    assert answers(local, BODIES[:3]) == expected  # the short rows' KV moved with the shape
    assert local.engine.runner.batch.keys[0].data_ptr() == address  # the pool never moved
    assert (local.engine.runner.batch.slots, local.engine.runner.batch.columns) == (8, 512)
    # Idle: the new shape's sizes (1, 2, 4, 8 rows x 256, 512 columns), next to the old ones.
    assert wait_for(lambda: graphs_state(local)["graphs"] == 5 + 8), graphs_state(local)
    assert graphs_state(local)["off_reason"] is None


def test_a_graph_whose_replay_computes_nothing_fails_its_check(
    tiny_model_dir, eager_answers, monkeypatch
):
    # cuda:N captured with device 0 current: the model's kernels ran eagerly while "capturing"
    # and the graph replays nothing. Its logits must not pass for the eager step's.
    from tests import fake_cuda

    monkeypatch.setattr(fake_cuda.FakeGraph, "replay", lambda self: None)
    local, _ = on_fake_cuda(tiny_model_dir)
    assert answers(local) == eager_answers
    state = graphs_state(local)
    assert state["enabled"] is False and "non-finite" in state["off_reason"], state


def test_emptying_the_device_cache_never_raises(monkeypatch, caplog):
    from custom_handlers.inference import loader

    def broken():
        raise RuntimeError(
            "captures_underway.empty() INTERNAL ASSERT FAILED at CUDACachingAllocator"
        )

    monkeypatch.setattr(torch.cuda, "empty_cache", broken)
    caplog.set_level(logging.WARNING, logger="custom_handlers.loader")
    loader._empty_device_cache(True)
    assert [r.getMessage() for r in caplog.records] == [
        "Could not give cached GPU memory back: captures_underway.empty() INTERNAL ASSERT FAILED "
        "at CUDACachingAllocator"
    ]


def test_a_failure_while_cleaning_up_a_failed_step_does_not_end_the_engine_thread(
    tiny_model_dir, monkeypatch
):
    from custom_handlers.inference.errors import ModelUnavailableError
    from tests.test_keep_alive import FOX
    from tests.test_out_of_memory import fail_once

    local = handler(tiny_model_dir)
    fail_once(local.holder.get().model, at_call=3)  # a decoding step

    def broken():
        raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED")

    monkeypatch.setattr(local.holder, "release_cached_memory", broken)

    async def scenario():
        with pytest.raises(ModelUnavailableError):
            await local.acompletion("x", FOX, optional_params={"max_tokens": 20})
        thread = local.engine._thread
        # Without the guard the thread died here and this request was never taken: bounded wait.
        served = await asyncio.wait_for(
            local.acompletion("x", FOX, optional_params={"max_tokens": 3}), DEADLINE_S
        )
        return thread, served

    thread, served = asyncio.run(scenario())
    assert served.usage.completion_tokens >= 1
    assert local.engine._thread is thread and thread.is_alive()  # the same thread went on
