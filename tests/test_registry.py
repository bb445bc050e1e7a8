"""The registry's room for loads, in process: least recently used idle model out first, busy ones
never, one more try after a load runs out of memory."""

from __future__ import annotations

import asyncio

import pytest

from custom_handlers.inference import loader
from custom_handlers.inference.catalog import LocalEntry
from custom_handlers.inference.errors import ModelUnavailableError
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.registry import Registry
from custom_handlers.inference.settings import LocalModelSettings

FOX = [{"role": "user", "content": "a fox"}]


def provider(model_dir, names: list[str], max_loaded: int) -> LocalLLM:
    entries = []
    for name in names:
        settings = LocalModelSettings(model=str(model_dir), keep_alive=-1)
        settings.for_entry(name, checkpoint_from_env=False)
        entries.append(LocalEntry(name, f"zlocal/{model_dir}", settings))
    return LocalLLM(registry=Registry.of_entries(entries, max_loaded))


def ask(local: LocalLLM, name: str, model_dir) -> None:
    kwargs = {"litellm_params": {"metadata": {"model_group": name}}}
    params = {"max_tokens": 2}
    asyncio.run(local.acompletion(str(model_dir), FOX, optional_params=params, **kwargs))


def loaded(local: LocalLLM) -> list[str]:
    return local.registry.loaded


def test_the_least_recently_used_idle_model_makes_room(tiny_model_dir):
    local = provider(tiny_model_dir, ["a", "b", "c"], max_loaded=2)
    for name in ("a", "b", "a"):
        ask(local, name, tiny_model_dir)
    assert loaded(local) == ["a", "b"]
    ask(local, "c", tiny_model_dir)  # b was used less recently than a
    assert loaded(local) == ["a", "c"]
    ask(local, "b", tiny_model_dir)
    assert loaded(local) == ["b", "c"]  # a was now the least recently used


def test_a_request_for_an_undeclared_checkpoint_loads_nothing(tiny_model_dir):
    local = provider(tiny_model_dir, ["a"], max_loaded=1)
    with pytest.raises(Exception) as info:
        asyncio.run(local.acompletion("elsewhere/model", FOX, optional_params={}))
    assert getattr(info.value, "status_code", None) == 400
    assert "not a local model of this gateway's proxy_config.yaml" in info.value.message
    assert loaded(local) == []


def out_of_memory() -> ModelUnavailableError:
    error = ModelUnavailableError("The local model cannot be loaded: out of memory")
    error.out_of_memory = True
    return error


def test_a_load_out_of_memory_unloads_the_idle_models_and_tries_once_more(
    tiny_model_dir, monkeypatch
):
    local = provider(tiny_model_dir, ["a", "b", "c"], max_loaded=3)
    ask(local, "a", tiny_model_dir)
    ask(local, "b", tiny_model_dir)
    real, calls = loader.load_model, []

    def first_fails(settings, progress=None):
        calls.append(settings.source_label)
        if len(calls) == 1:
            raise out_of_memory()
        return real(settings, progress)

    monkeypatch.setattr(loader, "load_model", first_fails)
    ask(local, "c", tiny_model_dir)
    assert len(calls) == 2  # one more try, after the idle models were unloaded
    assert loaded(local) == ["c"]


def test_a_load_still_out_of_memory_after_the_retry_is_a_503(tiny_model_dir, monkeypatch):
    local = provider(tiny_model_dir, ["a", "b"], max_loaded=2)
    ask(local, "a", tiny_model_dir)
    calls = []

    def always_fails(settings, progress=None):
        calls.append(1)
        raise out_of_memory()

    monkeypatch.setattr(loader, "load_model", always_fails)
    with pytest.raises(ModelUnavailableError):
        ask(local, "b", tiny_model_dir)
    assert len(calls) == 2 and loaded(local) == []


def test_a_model_swapped_out_is_freed(tiny_model_dir):
    """Nothing keeps the unloaded model alive: its memory can go back to the system."""
    import gc
    import weakref

    local = provider(tiny_model_dir, ["a", "b"], max_loaded=1)
    ask(local, "a", tiny_model_dir)
    weights = weakref.ref(local.registry.models["a"].holder.loaded.model)
    ask(local, "b", tiny_model_dir)
    gc.collect()
    assert loaded(local) == ["b"] and weights() is None
