"""Bad actors on the real gateway: server-only settings, hostile bodies, oversized inputs.

Each gets a 4xx naming the problem (a 401 first when the key is missing), nothing reaches the
cloud provider, and the gateway keeps serving.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.servers import Gateway

pytestmark = pytest.mark.integration

LOCAL = "qwen3-4b"
CLOUD = "gpt-4o-mini"
FOX = [{"role": "user", "content": "a fox"}]


def post_raw(gateway: Gateway, content: bytes, key: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(
        f"{gateway.base_url}/v1/chat/completions", content=content, headers=headers, timeout=120
    )


def refused(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text[:1000]
    error = r.json()["error"]
    assert error["message"] and "Traceback" not in error["message"], error
    expected = {400: "invalid_request_error", 401: "authentication_error"}[status]
    assert error["type"] == expected, error
    return error


def still_serving(client) -> None:
    for model in (LOCAL, CLOUD):
        answer = client.chat.completions.create(model=model, messages=FOX, max_tokens=2)
        assert answer.choices[0].message.content is not None


# ---- server-only settings -----------------------------------------------------------------------

LOCAL_SETTINGS = {
    "device": ("cpu", "LOCAL_LLM_DEVICE"),
    "model_path": ("/etc", "litellm_params.model in proxy_config.yaml"),
    "LOCAL_LLM_MODEL": ("/etc", "litellm_params.model in proxy_config.yaml"),
    "quantization": ("none", "LOCAL_LLM_QUANTIZATION"),
    "dtype": ("float16", "LOCAL_LLM_DTYPE"),
    "max_batch_size": (1000, "LOCAL_LLM_MAX_BATCH_SIZE"),
    "max_memory": ({"0": "80GiB"}, "fixed by the model"),
}


@pytest.mark.parametrize("name", list(LOCAL_SETTINGS))
def test_a_request_cannot_change_the_local_models_server_settings(gateway, client, name):
    value, where = LOCAL_SETTINGS[name]
    r = gateway.chat({"model": LOCAL, "messages": FOX, "max_tokens": 2, name: value})
    error = refused(r)
    assert f"'{name}' is a server-only setting" in error["message"]
    assert where in error["message"]
    assert error["param"] == name


def test_the_openai_sdks_extra_body_cannot_change_them_either(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=LOCAL, messages=FOX, max_tokens=2, extra_body={"device": "cuda:1"}
        )
    assert "LOCAL_LLM_DEVICE" in str(info.value)


CLOUD_SETTINGS = {
    "api_base": "http://127.0.0.1:9/v1",
    "base_url": "http://127.0.0.1:9/v1",
    "api_key": "sk-someone-elses",
    "organization": "org-other",
    "extra_headers": {"X-Other": "1"},
    "num_retries": 50,
    "custom_llm_provider": "anthropic",
}


@pytest.mark.parametrize("name", list(CLOUD_SETTINGS))
def test_a_request_cannot_redirect_or_rekey_a_cloud_model(gateway, fake_openai, name):
    before = len(fake_openai.requests)
    r = gateway.chat({"model": CLOUD, "messages": FOX, "max_tokens": 2, name: CLOUD_SETTINGS[name]})
    error = refused(r)
    assert name in error["message"]
    assert len(fake_openai.requests) == before  # the provider was never called


@pytest.mark.parametrize("key", [None, "sk-wrong-key-987"], ids=["no key", "wrong key"])
@pytest.mark.parametrize("name", ["api_base", "api_key", "temperature"])
def test_without_the_key_a_bad_body_learns_only_that_the_key_is_missing(gateway, key, name):
    body = {"model": CLOUD, "messages": FOX, name: "http://127.0.0.1:9/v1"}
    error = refused(post_raw(gateway, json.dumps(body).encode(), key), status=401)
    assert error["param"] == "api_key"


def test_one_right_key_among_the_headers_is_enough(gateway):
    """LiteLLM lets x-litellm-api-key win over Authorization; the gateway never refuses what it
    would accept."""
    r = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json={"model": LOCAL, "messages": FOX, "max_tokens": 2},
        headers={"Authorization": "Bearer sk-wrong-key-987", "x-litellm-api-key": gateway.key},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_the_key_in_anthropics_header_counts_as_the_key(gateway):
    r = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json={"model": CLOUD, "messages": FOX, "api_base": "http://127.0.0.1:9/v1"},
        headers={"x-api-key": gateway.key},
        timeout=60,
    )
    assert refused(r)["param"] == "api_base"


@pytest.mark.parametrize(
    ("provider_id", "name"), [("zlocal/qwen3-4b", LOCAL), ("openai/gpt-4o-mini", CLOUD)]
)
def test_a_model_is_called_by_its_name_not_its_provider_id(gateway, provider_id, name):
    error = refused(gateway.chat({"model": provider_id, "messages": FOX, "max_tokens": 2}))
    assert error["param"] == "model"
    assert f'"model": "{name}"' in error["message"]


# ---- hostile bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"[]", b'"hello"', b"42", b"null", b'[{"model": "qwen3-4b"}]'])
def test_a_body_that_is_not_a_json_object_gets_400(gateway, body):
    error = refused(post_raw(gateway, body, gateway.key))
    assert "must be a JSON object" in error["message"]


def _nested(depth: int) -> bytes:
    return b'{"model": "qwen3-4b", "messages": [{"role": "user", "content": "x"}], "x": ' + (
        b"[" * depth + b"]" * depth + b"}"
    )


def test_json_nested_past_the_parsers_limit_gets_400_saying_so(gateway):
    error = refused(post_raw(gateway, _nested(5000), gateway.key))
    assert "nests objects or arrays too deeply" in error["message"]


def test_json_nested_past_the_gateways_limit_gets_400_naming_the_field(gateway):
    error = refused(post_raw(gateway, _nested(300), gateway.key))
    assert "more than 128 levels deep" in error["message"]
    assert error["param"] == "x"


@pytest.mark.parametrize("model", [LOCAL, CLOUD])
def test_nan_and_infinity_get_400(gateway, model):
    content = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    error = refused(post_raw(gateway, content % model.encode(), gateway.key))
    assert error["param"] == "temperature"


def test_an_endpoint_the_local_model_does_not_serve_gets_400(gateway):
    r = httpx.post(
        f"{gateway.base_url}/v1/embeddings",
        json={"model": LOCAL, "input": "a fox"},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=60,
    )
    error = refused(r)
    assert error["message"].startswith("model 'qwen3-4b' does not serve /v1/embeddings")


# ---- oversized inputs: refused quickly, memory kept -------------------------------------------


def _schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


# Name -> (body fields, text the 4xx message contains). bench/faults.py times each of them.
OVERSIZED = {
    "10,000 messages": (
        {"messages": [{"role": "user", "content": "fox"}] * 10_000, "max_tokens": 2},
        "context_length_exceeded",
    ),
    "100,000 messages": (
        {"messages": [{"role": "user", "content": "fox"}] * 100_000, "max_tokens": 2},
        "GATEWAY_MAX_JSON_ITEMS",
    ),
    "90,000 messages": (
        {"messages": [{"role": "user", "content": "fox"}] * 90_000, "max_tokens": 2},
        "cannot fit",
    ),
    "max_tokens 2**62": ({"messages": FOX, "max_tokens": 2**62}, "context_length_exceeded"),
    "max_tokens past 64 bits": ({"messages": FOX, "max_tokens": 10**30}, "64-bit range"),
    "n 10**9": ({"messages": FOX, "n": 10**9}, "'n' must be between"),
    "10,000 stop strings": ({"messages": FOX, "stop": ["a"] * 10_000}, "at most 16"),
    "schema nested 100 deep": (
        {"messages": FOX, "response_format": _schema(_deep_schema(100))},
        "more than 64 levels deep",
    ),
    "schema of 200 KiB": (
        {
            "messages": FOX,
            "response_format": _schema({"enum": [f"value-{i:06d}" for i in range(16_000)]}),
        },
        "the limit is 65536",
    ),
    "schema with unsatisfiable types": (
        {
            "messages": FOX,
            "response_format": _schema({"allOf": [{"type": "string"}, {"type": "integer"}]}),
        },
        "cannot enforce this JSON schema",
    ),
    "schema with a 10**12-character string": (
        {"messages": FOX, "response_format": _schema({"type": "string", "maxLength": 10**12})},
        "cannot enforce this JSON schema",
    ),
    # These three took the whole gateway down inside llguidance (a stack overflow, an overflow, all
    # memory) before they were refused.
    "schema with both bounds at -2**63": (
        {
            "messages": FOX,
            "response_format": _schema(
                {"type": "integer", "minimum": -(2**63) - 1000, "maximum": -(2**63)}
            ),
        },
        "is beyond ±2^63",
    ),
    "schema with multipleOf 2**31": (
        {"messages": FOX, "response_format": _schema({"type": "integer", "multipleOf": 2**31})},
        "multipleOf 2147483648",
    ),
    "schema with multipleOf 9,999,991": (
        {"messages": FOX, "response_format": _schema({"type": "integer", "multipleOf": 9999991})},
        "multipleOf 9999991",
    ),
}


@pytest.mark.parametrize("name", list(OVERSIZED))
def test_oversized_inputs_get_a_4xx(gateway, name):
    fields, needle = OVERSIZED[name]
    r = gateway.chat({"model": LOCAL, **fields})
    assert 400 <= r.status_code < 500, r.text[:500]
    assert needle in r.json()["error"]["message"]


def test_after_every_hostile_input_the_gateway_still_serves(gateway, client):
    for fields, _ in OVERSIZED.values():
        gateway.chat({"model": LOCAL, **fields})
    post_raw(gateway, _nested(5000), gateway.key)
    still_serving(client)


def test_schemas_that_only_look_costly_are_served_within_max_tokens(gateway):
    """Huge minimums, nested repetitions, self-reference: bounded by max_tokens, cut with length;
    or, where llguidance's per-token budget runs out on a forced run (the 10^6 a's), a 400 naming
    response_format, never an answer that breaks the schema."""
    for schema in (
        {"type": "array", "items": {"type": "string"}, "minItems": 10**9},
        {"type": "string", "pattern": "^((a{100}){100}){100}$"},
        {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"},
        {
            "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
            "$ref": "#/$defs/n",
        },
    ):
        r = gateway.chat(  # within its 60 s timeout: never hangs the gateway
            {"model": LOCAL, "messages": FOX, "max_tokens": 8, "response_format": _schema(schema)}
        )
        if r.status_code == 400:  # llguidance's per-token budget ran out on a forced run
            error = r.json()["error"]
            assert "JSON constraint gave up" in error["message"], (schema, error)
            assert error["param"] == "response_format"
        else:
            assert r.status_code == 200, (schema, r.text[:500])
            assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
