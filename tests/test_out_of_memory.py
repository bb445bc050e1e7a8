"""A CUDA out-of-memory in a step fails the batch's requests with a 503; the next one is served.

No GPU is needed: torch's own ``OutOfMemoryError`` is raised from the real model's forward pass
(fault injection into the loaded tiny model, once), as CUDA raises it when an allocation fails.
"""

from __future__ import annotations

import asyncio

import pytest

from custom_handlers.inference.errors import ModelUnavailableError
from tests.test_keep_alive import FOX, handler


def fail_once(model, at_call: int):
    """Make the model's ``at_call``-th forward pass raise CUDA's out-of-memory error."""
    import torch

    real_forward = model.forward
    calls = 0

    def forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    model.forward = forward


@pytest.mark.parametrize("at_call", [1, 3], ids=["in prefill", "in a decoding step"])
def test_out_of_memory_fails_the_request_with_503_and_the_next_is_served(tiny_model_dir, at_call):
    local = handler(tiny_model_dir)
    loaded = local.holder.get()
    fail_once(loaded.model, at_call)

    async def scenario():
        with pytest.raises(ModelUnavailableError) as failed:
            await local.acompletion("x", FOX, optional_params={"max_tokens": 20})
        served = await local.acompletion("x", FOX, optional_params={"max_tokens": 3})
        return failed.value, served

    error, served = asyncio.run(scenario())
    assert error.status_code == 503
    assert "ran out of GPU memory" in error.message
    assert served.usage.completion_tokens >= 1
    assert local.holder.loaded is loaded  # the model stayed; only the batch was dropped
    assert local.engine.running == 0
