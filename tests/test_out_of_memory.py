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


# ---- a load that fails keeps none of its weights (issue 23, item 9) -----------------------------
#
# On a GPU, a load that runs out of memory half-way leaves a partly built model in the frames of
# its traceback; an error kept with its traceback (the holder keeps the last one, the first try's
# is alive while the retry runs) would keep those weights on the device. Here on the CPU the model
# is the real tiny checkpoint's, the failure is torch's own OutOfMemoryError, and a weak reference
# says whether anything still holds the model.


def _oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class _Room:
    """A registry that admits every load and, asked to make room, says it did."""

    def admit(self, holder):
        import contextlib

        return contextlib.nullcontext()

    def free_idle(self, holder) -> bool:
        return True


def _fail_load(holder) -> str:
    """``holder.get()``, which must fail; its message, with nothing of the error kept here."""
    try:
        holder.get()
    except ModelUnavailableError as exc:
        return exc.message
    raise AssertionError("the load did not fail")


@pytest.mark.parametrize("where", ["inside from_pretrained", "after from_pretrained"])
def test_a_failed_load_keeps_none_of_its_weights(tiny_model_dir, monkeypatch, where):
    import gc
    import weakref

    import transformers

    from custom_handlers.inference import loader
    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.settings import LocalModelSettings

    built: list[weakref.ref] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        result = real(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        built.append(weakref.ref(model))
        if where == "inside from_pretrained":
            raise _oom()  # with the model still a local of this frame
        return result

    def tie_then_fail(model, *args):
        raise _oom()  # load_model's own frame holds the model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    if where == "after from_pretrained":
        monkeypatch.setattr(loader, "_tie_missing_lm_head", tie_then_fail)
    holder = ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir), device="cpu"))
    message = _fail_load(holder)
    assert "out of memory" in message
    assert holder.last_error == message  # the error is kept, to answer the next request at once
    gc.collect()
    assert [ref() for ref in built] == [None]


def test_the_retry_after_an_out_of_memory_load_runs_without_the_first_tries_weights(
    tiny_model_dir, monkeypatch
):
    import gc
    import weakref

    import transformers

    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.settings import LocalModelSettings

    built: list[weakref.ref] = []
    first_alive_at_retry: list[bool] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        if built:  # the retry: is the first try's model still held by anything?
            gc.collect()
            first_alive_at_retry.append(built[0]() is not None)
        result = real(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        built.append(weakref.ref(model))
        if len(built) == 1:
            raise _oom()
        return result

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    holder = ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir), device="cpu"))
    holder.room = _Room()
    loaded = holder.get()
    assert loaded.model is built[1]()  # the retry's model is the one served
    assert first_alive_at_retry == [False]


# ---- a failed batch gives its KV pool back at once (issue 23, item 8) ---------------------------


def test_a_failed_batch_frees_its_kv_pool_before_the_device_cache_is_emptied(tiny_model_dir):
    """The pool (KVBatch -> SlotCache -> SlotLayer -> KVBatch, a reference cycle) and the failed
    step's tensors (in its error's frames) must be gone when the engine empties the device cache
    after an out-of-memory step: otherwise the next pool is allocated beside the old one."""
    import weakref

    import torch

    local = handler(tiny_model_dir)
    loaded = local.holder.get()
    engine = local.engine
    pool: list[weakref.ref] = []
    alive_at_release: list[bool] = []
    real_forward = loaded.model.forward
    calls = 0

    def forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:  # a decoding step: the pool exists
            pool.append(weakref.ref(engine.runner.batch.keys[0]))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    def release_cached_memory():
        alive_at_release.append(pool[0]() is not None)

    loaded.model.forward = forward
    local.holder.release_cached_memory = release_cached_memory

    async def scenario():
        with pytest.raises(ModelUnavailableError):
            await local.acompletion("x", FOX, optional_params={"max_tokens": 20})
        return await local.acompletion("x", FOX, optional_params={"max_tokens": 3})

    served = asyncio.run(scenario())
    assert served.usage.completion_tokens >= 1
    assert alive_at_release[:1] == [False]
