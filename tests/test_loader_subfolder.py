"""A model in a subfolder of a repo or directory: Z-Image's text encoder (``text_encoder/`` with
the Qwen3 weights, ``tokenizer/`` beside it), loaded by the real loader and run by the handler."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import litellm
import pytest

from custom_handlers.inference.errors import ModelUnavailableError
from custom_handlers.inference.loader import ModelHolder, load_model
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings

MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
FOX = [{"role": "user", "content": "a cute fox in a misty forest"}]


def z_image_layout(tiny_model_dir: Path, root: Path) -> Path:
    """The tiny checkpoint laid out as Z-Image ships its text encoder."""
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    for name in MODEL_FILES:
        shutil.copy(tiny_model_dir / name, root / "text_encoder" / name)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, root / "tokenizer" / name)
    (root / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    return root


def base_model_layout(tiny_model_dir: Path, root: Path) -> Path:
    """The same, but saved from the base ``Qwen3Model`` (no lm_head), untied in its config: the
    worst case of a text-encoder checkpoint."""
    from transformers import AutoModelForCausalLM

    z_image_layout(tiny_model_dir, root)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    full.model.save_pretrained(root / "text_encoder")
    config_path = root / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["architectures"] == ["Qwen3Model"]
    config["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(config))
    return root


def z_image_settings(root: Path) -> LocalModelSettings:
    return LocalModelSettings(
        model=str(root), subfolder="text_encoder", tokenizer_subfolder="tokenizer"
    )


@pytest.fixture(scope="module")
def z_image_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return z_image_layout(tiny_model_dir, tmp_path_factory.mktemp("z-image") / "Z-Image-Turbo")


@pytest.fixture(scope="module")
def handlers(tiny_model_dir, z_image_dir):
    """The handler twice, on the plain tiny checkpoint and on its Z-Image layout."""
    flat = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))
    z_image = LocalLLM(ModelHolder(lambda: z_image_settings(z_image_dir)))
    previous = litellm.custom_provider_map
    litellm.custom_provider_map = [
        {"provider": "zflat", "custom_handler": flat},
        {"provider": "zimage", "custom_handler": z_image},
    ]
    litellm.utils.custom_llm_setup()
    yield flat, z_image
    litellm.custom_provider_map = previous


def test_settings_read_the_subfolders_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_LLM_SUBFOLDER", "text_encoder")
    monkeypatch.setenv("LOCAL_LLM_TOKENIZER_SUBFOLDER", "tokenizer")
    settings = LocalModelSettings()
    assert (settings.model_folder, settings.tokenizer_folder) == ("text_encoder", "tokenizer")
    assert "LOCAL_LLM_SUBFOLDER='text_encoder'" in settings.source_label


def test_the_tokenizer_defaults_to_the_model_subfolder(monkeypatch):
    for name in ("LOCAL_LLM_SUBFOLDER", "LOCAL_LLM_TOKENIZER_SUBFOLDER"):
        monkeypatch.delenv(name, raising=False)
    assert (LocalModelSettings().model_folder, LocalModelSettings().tokenizer_folder) == ("", "")
    settings = LocalModelSettings(subfolder="llm/")
    assert (settings.model_folder, settings.tokenizer_folder) == ("llm", "llm")


def test_loads_z_images_text_encoder_layout(z_image_dir):
    loaded = load_model(z_image_settings(z_image_dir))
    assert type(loaded.model).__name__ == "Qwen3ForCausalLM"
    assert loaded.context_length == 2048
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids
    assert loaded.generation_defaults == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }


def test_a_base_model_checkpoint_gets_its_head_tied_to_the_embeddings(
    tiny_model_dir, tmp_path, caplog
):
    import torch

    flat = load_model(LocalModelSettings(model=str(tiny_model_dir)))
    loaded = load_model(z_image_settings(base_model_layout(tiny_model_dir, tmp_path / "zi")))
    assert type(loaded.model).__name__ == "Qwen3ForCausalLM"
    head, embeddings = loaded.model.lm_head.weight, loaded.model.model.embed_tokens.weight
    assert head.data_ptr() == embeddings.data_ptr()
    assert "tied the output layer to the input embeddings" in caplog.text
    ids = flat.tokenizer("a fox in a forest", return_tensors="pt").input_ids
    greedy = dict(do_sample=False, max_new_tokens=12, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        assert torch.equal(loaded.model.generate(ids, **greedy), flat.model.generate(ids, **greedy))


def test_the_handler_generates_from_the_z_image_layout_as_from_the_plain_checkpoint(handlers):
    kwargs = dict(messages=FOX, temperature=0, max_tokens=24)
    plain = litellm.completion(model="zflat/x", **kwargs)
    z_image = litellm.completion(model="zimage/x", **kwargs)
    assert z_image.choices[0].message.content == plain.choices[0].message.content
    assert z_image.usage.completion_tokens == plain.usage.completion_tokens > 0
    streamed = litellm.completion(model="zimage/x", stream=True, **kwargs)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert text == plain.choices[0].message.content


@pytest.mark.parametrize(
    ("subfolder", "tokenizer", "needle"),
    [
        ("", None, "is a directory without a config.json"),
        ("text_encoders", "tokenizer", "has no text_encoders/config.json. Set LOCAL_LLM_SUBFOLDER"),
        ("text_encoder", "tokenizers", "Set LOCAL_LLM_TOKENIZER_SUBFOLDER"),
    ],
)
def test_wrong_subfolders_are_explained(z_image_dir, subfolder, tokenizer, needle):
    settings = LocalModelSettings(
        model=str(z_image_dir), subfolder=subfolder, tokenizer_subfolder=tokenizer
    )
    with pytest.raises(ModelUnavailableError) as info:
        load_model(settings)
    assert needle in str(info.value)
    assert info.value.status_code == 503
