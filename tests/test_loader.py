"""Loading the model: real loading code on the tiny checkpoint, and clear errors."""

from __future__ import annotations

import threading

import pytest

from custom_handlers.inference.errors import ModelUnavailableError
from custom_handlers.inference.loader import ModelHolder, load_model
from custom_handlers.inference.settings import LocalModelSettings


def settings(model, **kwargs) -> LocalModelSettings:
    return LocalModelSettings(model=str(model), **kwargs)


def test_loads_the_tiny_checkpoint_on_cpu(tiny_model_dir):
    loaded = load_model(settings(tiny_model_dir))
    assert type(loaded.model).__name__ == "Qwen3ForCausalLM"
    assert (loaded.device, loaded.dtype, loaded.quantization) == ("cpu", "float32", "none")
    assert loaded.context_length == 2048
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in loaded.eos_token_ids
    assert loaded.generation_defaults == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_LLM_MODEL", "/models/x")
    monkeypatch.setenv("LOCAL_LLM_DEFAULT_MAX_TOKENS", "77")
    s = LocalModelSettings()
    assert (s.model, s.default_max_tokens, s.device, s.quantization) == (
        "/models/x",
        77,
        "auto",
        "auto",
    )


def test_default_model_is_the_4bit_qwen3(monkeypatch):
    monkeypatch.delenv("LOCAL_LLM_MODEL", raising=False)
    assert LocalModelSettings().model == "unsloth/Qwen3-4B-Instruct-2507-bnb-4bit"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("/nonexistent/qwen", "does not exist"),
        ("./no/such/dir", "does not exist"),
        ("no-such-org-zx/no-such-model-zx", "cannot be loaded from"),
    ],
)
def test_unloadable_sources_name_the_setting_and_value(monkeypatch, source, needle):
    import huggingface_hub.constants

    # No network in tests: offline mode makes the hub lookup fail at once (read at import time,
    # hence the constant as well as the variable).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError) as info:
        load_model(settings(source))
    message = info.value.message
    assert f"LOCAL_LLM_MODEL={source!r}" in message and needle in message
    assert info.value.status_code == 503
    assert "Traceback" not in message


def test_a_directory_without_config_is_explained(tmp_path):
    with pytest.raises(ModelUnavailableError, match=r"without a config\.json"):
        load_model(settings(tmp_path))


def test_cuda_device_without_cuda_is_explained(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelUnavailableError, match="CUDA is not available"):
        load_model(settings(tiny_model_dir, device="cuda"))


def test_many_concurrent_callers_load_once(tiny_model_dir):
    calls = []

    def factory():
        calls.append(1)
        return settings(tiny_model_dir)

    holder = ModelHolder(settings_factory=factory)
    results = []
    threads = [threading.Thread(target=lambda: results.append(holder.get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({id(r) for r in results}) == 1 and len(results) == 8


def test_a_failed_load_is_reported_to_a_burst_once_then_retried(tmp_path):
    calls = []

    def factory():
        calls.append(1)
        return settings(tmp_path / "missing")

    holder = ModelHolder(settings_factory=factory)
    for _ in range(3):
        with pytest.raises(ModelUnavailableError):
            holder.get()
    assert len(calls) == 1


def test_a_queue_of_zero_is_refused_at_start(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("LOCAL_LLM_MAX_QUEUE", "0")  # it would refuse every request
    with pytest.raises(ValidationError, match="max_queue"):
        LocalModelSettings()
