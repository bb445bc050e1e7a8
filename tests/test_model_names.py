"""Callers name models by their names in proxy_config.yaml, never by a deployment's provider id.

Uses LiteLLM's real Router built from the project's own proxy_config.yaml (nothing is called).
"""

from __future__ import annotations

import litellm
import pytest
import yaml
from litellm import Router

from custom_handlers.gateway.body_checks import check_model_name
from custom_handlers.inference.errors import InvalidRequestError, NotFoundError
from tests.servers import CONFIG


@pytest.fixture(scope="module", autouse=True)
def _zlocal_provider():
    """Register the local provider as the proxy does from custom_provider_map (never called)."""
    from custom_handlers.inference.provider import local_llm

    entry = {"provider": "zlocal", "custom_handler": local_llm}
    added = "zlocal" not in litellm.provider_list
    litellm.custom_provider_map.append(entry)
    litellm.utils.custom_llm_setup()
    yield
    litellm.custom_provider_map.remove(entry)
    if added:
        litellm.provider_list.remove("zlocal")
        litellm._custom_providers.remove("zlocal")


def router(extra_entries: list[dict] | None = None, **settings) -> Router:
    model_list = yaml.safe_load(CONFIG.read_text())["model_list"] + (extra_entries or [])
    return Router(model_list=model_list, **settings)


@pytest.fixture(scope="module")
def project_router() -> Router:
    return router()


@pytest.mark.parametrize(
    ("provider_id", "name"),
    [
        ("zlocal/qwen3-4b", "qwen3-4b"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("anthropic/claude-haiku-4-5", "claude-haiku"),
    ],
)
def test_a_provider_id_is_refused_naming_the_model_to_call(project_router, provider_id, name):
    with pytest.raises(InvalidRequestError) as info:
        check_model_name(provider_id, project_router)
    assert info.value.status_code == 400
    assert info.value.param == "model"
    assert f"'{provider_id}' is the provider id behind the model '{name}'" in info.value.message
    assert f'"model": "{name}"' in info.value.message


@pytest.mark.parametrize("model", ["qwen3-4b", "gpt-4o-mini", "claude-haiku", "ollama-qwen3"])
def test_the_names_in_the_yaml_pass(project_router, model):
    check_model_name(model, project_router)


@pytest.mark.parametrize("model", ["no-such-model", "gpt4o-mini", "openai/gpt-4o"])
def test_an_unknown_name_is_openais_404_model_not_found(project_router, model):
    with pytest.raises(NotFoundError) as info:
        check_model_name(model, project_router)
    assert info.value.status_code == 404
    assert (info.value.code, info.value.param) == ("model_not_found", "model")
    assert f"The model '{model}' does not exist" in info.value.message
    assert "GET /v1/models" in info.value.message


def test_non_strings_are_left_to_the_type_checks(project_router):
    check_model_name(None, project_router)
    check_model_name(42, project_router)
    check_model_name("zlocal/qwen3-4b", None)  # no router: nothing to check against


def test_a_model_group_alias_still_works():
    aliased = router(model_group_alias={"fast": "gpt-4o-mini"})
    check_model_name("fast", aliased)


def test_with_a_wildcard_entry_any_name_may_be_served():
    wildcard = router([{"model_name": "openai/*", "litellm_params": {"model": "openai/*"}}])
    check_model_name("openai/gpt-4o-mini", wildcard)
    check_model_name("no-such-model", wildcard)  # LiteLLM decides what a wildcard serves
