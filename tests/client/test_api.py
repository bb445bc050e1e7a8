"""The public API is what ``client/__init__.py`` exports: pinned, so a change is deliberate."""

from __future__ import annotations

import inspect

import client
from client import _errors

PUBLIC = [
    "AsyncClient",
    "Check",
    "Client",
    "ClientError",
    "ConfigurationError",
    "ContextLengthError",
    "ExpandedPrompt",
    "GatewayAuthError",
    "GatewayError",
    "GatewayTimeoutError",
    "GatewayUnreachableError",
    "Library",
    "LibraryError",
    "LocalModelState",
    "LocalState",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "ProviderAuthError",
    "RateLimitError",
    "ReleaseResult",
    "RequestError",
    "ResponseError",
    "Settings",
    "Template",
    "TemplateError",
    "Variable",
    "VariableExistsError",
    "diagnose",
    "enhance_prompt",
    "generate_prompt_variable_values",
    "generate_text",
    "load_settings",
    "parse_template",
    "release_gpu",
]


def test_public_api_is_pinned():
    assert client.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(client, name) is not None


def test_every_exception_is_exported_and_a_client_error():
    for name in _errors.__all__:
        assert name in client.__all__
        assert issubclass(getattr(client, name), client.ClientError)


def test_sync_and_async_clients_are_twins():
    def public(cls):
        return {n for n, _ in inspect.getmembers(cls) if not n.startswith("_")}

    sync, async_ = public(client.Client), public(client.AsyncClient)
    assert sync - {"close"} == async_ - {"aclose"}
    for name in sync - {"close", "settings", "model", "library"}:
        method = getattr(client.AsyncClient, name)
        assert inspect.iscoroutinefunction(method), name
        assert inspect.signature(method) == inspect.signature(getattr(client.Client, name)), name


def test_the_library_functions_keep_the_old_apps_signatures():
    assert list(inspect.signature(client.generate_text).parameters)[:3] == [
        "prompt",
        "max_tokens",
        "temperature",
    ]
    assert list(inspect.signature(client.enhance_prompt).parameters)[:2] == [
        "prompt",
        "instruction",
    ]
    assert list(inspect.signature(client.generate_prompt_variable_values).parameters)[:3] == [
        "name",
        "context_prompt",
        "count",
    ]


def test_release_gpu_takes_a_model_first_and_the_timeout_by_name():
    for function in (client.release_gpu, client.Client.release_gpu, client.AsyncClient.release_gpu):
        parameters = inspect.signature(function).parameters
        assert [p for p in parameters if p != "self"] == ["model", "timeout"]
        assert parameters["model"].default is None
        assert parameters["timeout"].kind is inspect.Parameter.KEYWORD_ONLY
