"""Settings: the documented order, the old app's names, and every problem reported at once."""

from __future__ import annotations

import warnings

import pytest

from client import ConfigurationError, Settings, load_settings
from client._config import write_env_file


def load(**overrides) -> Settings:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load_settings(**overrides)


def test_defaults():
    settings = load()
    assert settings.gateway_url == "http://localhost:4000"
    assert settings.base_url == "http://localhost:4000/v1"
    assert settings.model_name == "qwen3-4b"
    assert settings.api_key is None
    assert str(settings.library_dir).endswith("library")
    assert settings.timeout_seconds == 300


def test_every_field_has_a_description_and_an_env_name():
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert field.validation_alias and field.validation_alias.isupper(), name


@pytest.mark.parametrize("url", ["http://gw:4000", "http://gw:4000/", "http://gw:4000/v1"])
def test_the_url_may_end_in_v1(monkeypatch, url):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", url)
    assert load().base_url == "http://gw:4000/v1"
    assert load().gateway_url == "http://gw:4000"


def test_environment_beats_dotenv_which_beats_defaults(monkeypatch, _isolated):
    (_isolated / ".env").write_text(
        "LLM_MODEL=gpt-4o-mini\nLITELLM_PROXY_API_BASE=http://from-dotenv:4000\n"
    )
    assert load().model_name == "gpt-4o-mini"
    assert load().gateway_url == "http://from-dotenv:4000"
    monkeypatch.setenv("LLM_MODEL", "claude-haiku")
    assert load().model_name == "claude-haiku"
    assert load(model="ollama-qwen3").model_name == "ollama-qwen3"


def test_the_dotenv_is_the_working_directorys(monkeypatch, tmp_path, _isolated):
    (_isolated / ".env").write_text("LLM_MODEL=here\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load().model_name == "qwen3-4b"


def test_proxy_key_beats_master_key_wherever_each_is_set(monkeypatch, _isolated):
    monkeypatch.setenv("LITELLM_MASTER_KEY", "sk-master")
    settings = load()
    assert (settings.api_key, settings.key_source) == ("sk-master", "LITELLM_MASTER_KEY")
    (_isolated / ".env").write_text("LITELLM_PROXY_API_KEY=sk-proxy\n")
    settings = load()
    assert (settings.api_key, settings.key_source) == ("sk-proxy", "LITELLM_PROXY_API_KEY")
    assert "sk-proxy" not in repr(settings) and "sk-master" not in repr(settings)


def test_llm_repo_is_used_when_llm_model_is_unset_with_a_warning_python_shows(monkeypatch):
    monkeypatch.setenv("LLM_REPO", "gpt-4o-mini")
    with pytest.warns(FutureWarning, match="LLM_REPO is deprecated.*LLM_MODEL=gpt-4o-mini"):
        settings = load_settings()
    assert (settings.model_name, settings.model_source) == ("gpt-4o-mini", "LLM_REPO")
    # FutureWarning, unlike DeprecationWarning, is shown to users by Python's default filters.
    assert issubclass(FutureWarning, Warning) and not issubclass(FutureWarning, DeprecationWarning)


def test_llm_model_beats_llm_repo_and_silences_it(monkeypatch, _isolated):
    monkeypatch.setenv("LLM_REPO", "gpt-4o-mini")
    (_isolated / ".env").write_text("LLM_MODEL=claude-haiku\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_settings().model_name == "claude-haiku"


def test_an_old_hugging_face_llm_repo_explains_the_gateway_and_uses_the_local_model(monkeypatch):
    monkeypatch.setenv("LLM_REPO", "unsloth/Qwen3-4B-Instruct-2507-bnb-4bit")
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", "sk-x")
    with pytest.warns(FutureWarning, match="LOCAL_LLM_MODEL=unsloth/Qwen3-4B"):
        settings = load_settings()
    assert settings.model_name == "qwen3-4b"
    assert settings.problems() == []


def test_llm_mode_litellm_is_accepted_silently(monkeypatch):
    monkeypatch.setenv("LLM_MODE", "litellm")
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", "sk-x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = load_settings()
    assert settings.notices() == [] and settings.problems() == []


@pytest.mark.parametrize("mode", ["hf_download", "hf_local", "z_image", "gguf", "HF_DOWNLOAD"])
def test_old_local_modes_are_explained_not_fatal(monkeypatch, mode):
    monkeypatch.setenv("LLM_MODE", mode)
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", "sk-x")
    with pytest.warns(FutureWarning, match="gateway serves the local model.*LOCAL_LLM_MODEL"):
        settings = load_settings()
    assert settings.problems() == []
    settings.validate()


def test_validate_reports_every_problem_at_once(monkeypatch, _isolated):
    (_isolated / "library").write_text("not a folder")
    monkeypatch.setenv("LOCAL_LIBRARY_DIR", str(_isolated / "library"))
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", "localhost:4000")
    monkeypatch.setenv("LLM_MODE", "turbo")
    monkeypatch.setenv("LLM_TIMEOUT", "soon")
    monkeypatch.setenv("LLM_MODEL", "two words")
    with pytest.raises(ConfigurationError) as caught:
        load().validate()
    problems = caught.value.problems
    assert len(problems) == 6
    for needle in (
        "LITELLM_PROXY_API_BASE",
        "LITELLM_PROXY_API_KEY",
        "LLM_MODEL",
        "LLM_MODE=",
        "LLM_TIMEOUT",
        "LOCAL_LIBRARY_DIR",
    ):
        assert any(needle in p for p in problems), needle
    assert str(caught.value).startswith("6 configuration problems: (1) ")


def test_a_good_configuration_validates(monkeypatch):
    monkeypatch.setenv("LITELLM_MASTER_KEY", "sk-x")
    load().validate()


def test_unknown_override_is_a_programming_error():
    with pytest.raises(TypeError, match="colour"):
        load_settings(colour="red")


def test_write_env_file_keeps_other_lines_and_is_owner_only(_isolated):
    env = _isolated / ".env"
    env.write_text("# mine\nLITELLM_MASTER_KEY=sk-keep\nexport LLM_MODEL=old\n")
    write_env_file(env, {"LLM_MODEL": "gpt-4o-mini", "LITELLM_PROXY_API_KEY": "a b#c"})
    assert env.read_text() == (
        '# mine\nLITELLM_MASTER_KEY=sk-keep\nLLM_MODEL=gpt-4o-mini\nLITELLM_PROXY_API_KEY="a b#c"\n'
    )
    assert env.stat().st_mode & 0o777 == 0o600
    settings = load()
    assert (settings.model_name, settings.api_key) == ("gpt-4o-mini", "a b#c")
