"""The client over a fake gateway at the HTTP layer: requests sent, answers read, errors mapped.

The error bodies are the ones the real gateway (LiteLLM 1.108 + our auth hook) was seen to send;
the integration tests check the same cases end to end.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from client import (
    AsyncClient,
    Client,
    ConfigurationError,
    ContextLengthError,
    GatewayAuthError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    ModelNotFoundError,
    ModelUnavailableError,
    ProviderAuthError,
    RateLimitError,
    RequestError,
    ResponseError,
    load_settings,
)
from client._prompts import ENHANCE_PRESENCE_PENALTY, ENHANCE_SYSTEM, VALUES_SYSTEM

from .conftest import UNIT_KEY

GATEWAY_401 = "Invalid API key: it does not match the gateway's LITELLM_MASTER_KEY."
UNKNOWN_MODEL = (
    "/chat/completions: Invalid model name passed in model=no-such-model. Call `/v1/models` to "
    "view available models for your key."
)
OPENAI_WRONG_KEY = (
    "litellm.AuthenticationError: AuthenticationError: OpenAIException - Incorrect API key "
    "provided: sk-fake-***. You can find your API key at https://platform.openai.com/account/"
    "api-keys.\n\nLiteLLM: model group 'gpt-4o-mini' failed with the error above. No fallback "
    "was attempted."
)
OPENAI_NO_KEY = (
    "litellm.InternalServerError: InternalServerError: OpenAIException - Missing credentials. "
    "Please pass an `api_key`, `workload_identity`, `admin_api_key`, or set the `OPENAI_API_KEY` "
    "or `OPENAI_ADMIN_KEY` environment variable.\n\nLiteLLM: model group 'gpt-4o-mini' failed "
    "with the error above. No fallback was attempted."
)
ANTHROPIC_NO_KEY = (
    "litellm.AuthenticationError: Missing Anthropic API Key - A call is being made to anthropic "
    "but no key is set either in the environment variables or via params. Please set "
    "`ANTHROPIC_API_KEY` or `ANTHROPIC_AUTH_TOKEN` in your environment vars\n\nLiteLLM: model "
    "group 'claude-haiku' failed with the error above. No fallback was attempted."
)
PROVIDER_429 = (
    "litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached for "
    "gpt-4o-mini on requests per min (RPM).\n\nLiteLLM: model group 'gpt-4o-mini' failed with "
    "the error above. No fallback was attempted."
)
COOLDOWN_429 = (
    "No deployments available for selected model, Try again in 5 seconds. All deployments for "
    "selected model are in cooldown. Passed model=claude-haiku. pre-call-checks=False"
)
OLLAMA_DOWN = (
    "litellm.APIConnectionError: Ollama_chatException - Cannot connect to host localhost:11434 "
    "ssl:<ssl.SSLContext object at 0x7f5083658d40> [Connect call failed ('REDACTED', 11434)]"
)
PROVIDER_UNREACHABLE = (  # what the gateway answers since it names the address (a 502)
    "The provider behind model 'ollama-qwen3' cannot be reached at http://127.0.0.1:11434 "
    "(Connect call failed ('127.0.0.1', 11434)). Start Ollama (`ollama serve`), or fix its "
    "address: the model's api_base in proxy_config.yaml, or the provider's variable where the "
    "gateway runs (OLLAMA_API_BASE, OPENAI_BASE_URL...)."
)
LOCAL_NO_JSON = (
    "litellm.BadRequestError: ZlocalException - response_format other than 'text' is not "
    "supported by the local model yet.\n\nLiteLLM: model group 'qwen3-4b' failed with the error "
    "above. No fallback was attempted."
)


# ---- what is sent --------------------------------------------------------------------------------


def test_requests_carry_the_gateway_key_never_openai_api_key(unit_client, fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    fake.reply("ok")
    assert unit_client.generate_text("hi", max_tokens=5, temperature=0.2) == "ok"
    request = fake.requests[0]
    assert request["headers"]["authorization"] == f"Bearer {UNIT_KEY}"
    assert request["body"] == {
        "model": "qwen3-4b",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "temperature": 0.2,
    }


@pytest.mark.parametrize("model", ["qwen3-4b", "gpt-4o-mini", "claude-haiku"])
def test_every_model_gets_the_same_prompts(fake, unit_env, model):
    with Client(http_client=httpx.Client(transport=httpx.MockTransport(fake.handle))) as client:
        client.model = model
        fake.reply("A fox.")
        fake.reply('{"values": ["a", "b"]}')
        client.enhance_prompt("a fox", "ghibli")
        client.generate_prompt_variable_values("cat_breed", "a __cat_breed__", 2)
    enhance, values = fake.chats
    assert enhance["model"] == values["model"] == model
    assert enhance["messages"][0] == {"role": "system", "content": ENHANCE_SYSTEM}
    assert enhance["messages"][-1]["content"] == "Idea: a fox\nInstruction: ghibli"
    assert values["messages"][0] == {"role": "system", "content": VALUES_SYSTEM}
    assert values["response_format"]["type"] == "json_schema"
    assert (
        values["response_format"]["json_schema"]["schema"]["properties"]["values"]["maxItems"] == 2
    )


def test_enhance_returns_only_the_prompt(unit_client, fake):
    fake.reply('<think>hmm</think>\nEnhanced prompt: "A fox, three kits, golden light"')
    assert unit_client.enhance_prompt("a fox with three kits") == "A fox, three kits, golden light"


def test_an_empty_enhancement_is_an_error(unit_client, fake):
    fake.reply("<think>" + "fox " * 50, finish_reason="length")
    with pytest.raises(ResponseError, match=r"returned no prompt \(it ran out of tokens\)"):
        unit_client.enhance_prompt("a fox")


# ---- values --------------------------------------------------------------------------------------


def test_values_from_a_model_that_ignores_the_schema(unit_client, fake):
    fake.reply("Here are some breeds:\n1. Siamese\n2. Persian\n3. Sphynx\n4. Bengal")
    assert unit_client.generate_prompt_variable_values("cat_breed", "", 3) == [
        "Siamese",
        "Persian",
        "Sphynx",
    ]


def test_missing_values_are_asked_for_again_without_repeats(unit_client, fake):
    fake.reply('{"values": ["Siamese", "siamese", "Persian", ""]}')
    fake.reply('{"values": ["Persian", "Sphynx"]}')
    fake.reply('{"values": ["Bengal"]}')
    assert unit_client.generate_prompt_variable_values("cat_breed", "", 4) == [
        "Siamese",
        "Persian",
        "Sphynx",
        "Bengal",
    ]
    first, second, third = fake.chats
    assert (
        first["response_format"]["json_schema"]["schema"]["properties"]["values"]["minItems"] == 4
    )
    assert (
        second["response_format"]["json_schema"]["schema"]["properties"]["values"]["minItems"] == 2
    )
    assert "Siamese; Persian" in second["messages"][-1]["content"]
    assert "Siamese; Persian; Sphynx" in third["messages"][-1]["content"]


def test_too_few_values_after_every_try_is_an_error(unit_client, fake):
    for _ in range(4):
        fake.reply('{"values": ["Siamese"]}')
    with pytest.raises(ResponseError, match="1 distinct values for __cat_breed__ of the 2"):
        unit_client.generate_prompt_variable_values("cat_breed", "", 2)
    assert len(fake.chats) == 4  # 1 of 2 (half: fine), then three rounds bringing nothing


def asked(body) -> int:
    return body["response_format"]["json_schema"]["schema"]["properties"]["values"]["minItems"]


def test_many_values_come_in_batches(unit_client, fake):
    fake.reply(json.dumps({"values": [f"v{i}" for i in range(25)]}))
    fake.reply(json.dumps({"values": [f"v{i}" for i in range(25, 40)]}))
    values = unit_client.generate_prompt_variable_values("thing", "", 40)
    assert values == [f"v{i}" for i in range(40)]
    assert [asked(body) for body in fake.chats] == [25, 15]
    # What to avoid is bounded: the most recent values only.
    assert "v24" in fake.chats[1]["messages"][-1]["content"]


def test_a_batch_too_long_for_the_context_is_made_to_fit(unit_client, fake):
    fake.error(
        400,
        "litellm.BadRequestError: ZlocalException - context_length_exceeded: This model's maximum "
        "context length is 2048 tokens. However, you requested 2193 tokens (501 in the messages, "
        "1692 in the completion).",
        type="invalid_request_error",
    )
    fake.reply(json.dumps({"values": [f"v{i}" for i in range(18)]}))
    fake.reply(json.dumps({"values": ["v18", "v19"]}))
    assert len(unit_client.generate_prompt_variable_values("thing", "", 20)) == 20
    # (2048 - 501 - 32) // (80 + 3) = 18 values fit.
    assert [asked(body) for body in fake.chats] == [20, 18, 2]


def test_a_prompt_too_long_for_the_context_is_an_error(unit_client, fake):
    fake.error(
        400,
        "litellm.BadRequestError: ZlocalException - context_length_exceeded: This model's maximum "
        "context length is 2048 tokens. However, you requested 2600 tokens (2500 in the messages, "
        "100 in the completion).",
    )
    with pytest.raises(ContextLengthError) as caught:
        unit_client.generate_prompt_variable_values("thing", "", 1)
    assert (caught.value.context_tokens, caught.value.prompt_tokens) == (2048, 2500)
    assert "too long for model 'qwen3-4b'" in str(caught.value)


def test_a_model_refusing_response_format_is_asked_again_without_it(unit_client, fake):
    fake.error(400, LOCAL_NO_JSON, type="invalid_request_error")
    fake.reply('["Siamese", "Persian"]')
    assert unit_client.generate_prompt_variable_values("cat_breed", "", 2) == [
        "Siamese",
        "Persian",
    ]
    with_format, without = fake.chats
    assert "response_format" in with_format and "response_format" not in without
    assert without["messages"] == with_format["messages"]


ANTHROPIC_NO_PRESENCE = (
    "litellm.UnsupportedParamsError: anthropic does not support parameters: ['presence_penalty'], "
    "for model=claude-haiku-4-5. To drop these, set `litellm.drop_params=True` or for proxy:\n\n"
    "`litellm_settings:\n drop_params: true`\n"
)


def test_enhance_asks_for_a_presence_penalty_and_the_values_do_not(unit_client, fake):
    fake.reply("A fox.")
    fake.reply('{"values": ["a", "b"]}')
    unit_client.enhance_prompt("a fox")
    unit_client.generate_prompt_variable_values("cat_breed", "", 2)
    enhance, values = fake.chats
    assert enhance["presence_penalty"] == ENHANCE_PRESENCE_PENALTY
    assert "presence_penalty" not in values


def test_a_model_refusing_presence_penalty_is_asked_again_without_it(unit_client, fake):
    unit_client.model = "claude-haiku"
    fake.error(400, ANTHROPIC_NO_PRESENCE, type="invalid_request_error")
    fake.reply("A fox at dawn.")
    assert unit_client.enhance_prompt("a fox") == "A fox at dawn."
    with_penalty, without = fake.chats
    assert "presence_penalty" in with_penalty and "presence_penalty" not in without
    assert without["messages"] == with_penalty["messages"]


# ---- errors --------------------------------------------------------------------------------------


def test_gateway_401_names_the_key_setting(unit_client, fake):
    fake.error(401, GATEWAY_401, type="authentication_error")
    with pytest.raises(GatewayAuthError, match="refused the key from LITELLM_PROXY_API_KEY"):
        unit_client.enhance_prompt("a fox")


def test_unknown_model_lists_the_gateways_models(unit_client, fake):
    unit_client.model = "openai/gpt-4o-mini"
    fake.error(400, UNKNOWN_MODEL.replace("no-such-model", "openai/gpt-4o-mini"))
    with pytest.raises(ModelNotFoundError) as caught:
        unit_client.enhance_prompt("a fox")
    assert caught.value.available == ["gpt-4o-mini", "qwen3-4b"]
    assert "It serves: gpt-4o-mini, qwen3-4b. Did you mean gpt-4o-mini?" in str(caught.value)


def test_unknown_model_when_the_list_is_unavailable(unit_client, fake):
    fake.error(400, UNKNOWN_MODEL)
    fake.error(500, "boom", path="/v1/models")
    with pytest.raises(ModelNotFoundError, match="See `z-explorer models`"):
        unit_client.enhance_prompt("a fox")


@pytest.mark.parametrize(
    ("message", "status", "env_var", "words"),
    [
        (OPENAI_WRONG_KEY, 401, "OPENAI_API_KEY", "OpenAI refused the API key"),
        (OPENAI_NO_KEY, 500, "OPENAI_API_KEY", "needs OpenAI's API key"),
        (ANTHROPIC_NO_KEY, 401, "ANTHROPIC_API_KEY", "needs Anthropic's API key"),
    ],
)
def test_a_providers_key_problem_names_its_env_var(
    unit_client, fake, message, status, env_var, words
):
    fake.error(status, message, type="authentication_error")
    with pytest.raises(ProviderAuthError) as caught:
        unit_client.enhance_prompt("a fox")
    assert caught.value.env_var == env_var
    assert words in str(caught.value) and f"set {env_var} where the gateway runs" in str(
        caught.value
    )
    assert "LITELLM_PROXY_API_KEY" not in str(caught.value)


@pytest.mark.parametrize(
    ("message", "headers", "seconds", "words"),
    [
        (PROVIDER_429, {"llm_provider-retry-after": "7"}, 7, "rate limited by its provider"),
        (COOLDOWN_429, {"retry-after": "5"}, 5, "paused model"),
        ("Rate limit. Please try again in 1.5s.", {}, 1.5, "rate limited"),
        ("Rate limit.", {"retry-after-ms": "250"}, 0.25, "rate limited"),
        ("Rate limit.", {}, None, "wait a minute and retry"),
    ],
)
def test_rate_limits_say_when_to_retry(unit_client, fake, message, headers, seconds, words):
    fake.error(429, message, headers=headers)
    with pytest.raises(RateLimitError) as caught:
        unit_client.enhance_prompt("a fox")
    assert caught.value.retry_after == seconds
    assert words in str(caught.value)
    if seconds is not None:
        assert f"retry in {seconds:g} s" in str(caught.value)


def test_a_busy_local_model_says_when_to_retry(unit_client, fake):
    busy = (
        "The local model is busy: 64 requests are waiting already (LOCAL_LLM_MAX_QUEUE=64). "
        "Retry in a few seconds."
    )
    fake.error(503, busy, type="service_unavailable", headers={"retry-after": "2"})
    with pytest.raises(RateLimitError) as caught:
        unit_client.enhance_prompt("a fox")
    assert caught.value.retry_after == 2
    assert str(caught.value).startswith("Model 'qwen3-4b' is busy; retry in 2 s. The gateway said:")


def test_unreachable_gateway_names_the_url_and_how_to_start_it(unit_client, fake):
    fake.fail(httpx.ConnectError("Connection refused"))
    with pytest.raises(GatewayUnreachableError) as caught:
        unit_client.enhance_prompt("a fox")
    assert "http://gateway.test" in str(caught.value)
    assert "uv run z-explorer-gateway" in str(caught.value)
    assert "LITELLM_PROXY_API_BASE" in str(caught.value)


def test_timeout_says_which_setting_to_raise(unit_client, fake):
    fake.fail(httpx.ReadTimeout("timed out"))
    with pytest.raises(GatewayTimeoutError, match=r"within 300 s.*LLM_TIMEOUT"):
        unit_client.enhance_prompt("a fox")


def test_a_provider_server_that_is_down(unit_client, fake):
    fake.error(500, OLLAMA_DOWN)
    with pytest.raises(ModelUnavailableError) as caught:
        unit_client.enhance_prompt("a fox")
    assert "ollama serve" in str(caught.value) and "ssl:<" not in str(caught.value)


def test_a_provider_server_the_gateway_cannot_reach_keeps_its_address(unit_client, fake):
    fake.error(502, PROVIDER_UNREACHABLE)
    with pytest.raises(ModelUnavailableError) as caught:
        unit_client.enhance_prompt("a fox")
    text = str(caught.value)
    assert text.startswith("Model 'qwen3-4b' cannot answer: The provider behind model")
    assert "http://127.0.0.1:11434" in text and "ollama serve" in text


def test_a_local_model_that_cannot_load(unit_client, fake):
    fake.error(503, "litellm.ServiceUnavailableError: LOCAL_LLM_MODEL='...' does not exist")
    with pytest.raises(ModelUnavailableError, match="LOCAL_LLM_MODEL"):
        unit_client.enhance_prompt("a fox")


def test_other_refusals_keep_their_status_and_message(unit_client, fake):
    fake.error(400, "litellm.BadRequestError: ZlocalException - 'top_p' must be above 0, got 0.")
    with pytest.raises(RequestError, match=r"HTTP 400\): ZlocalException - 'top_p' must") as c:
        unit_client.enhance_prompt("a fox")
    assert c.value.status_code == 400


def test_errors_are_translated_from_the_sdks(unit_client, fake):
    import openai

    fake.error(401, GATEWAY_401)
    with pytest.raises(GatewayAuthError) as caught:
        unit_client.enhance_prompt("a fox")
    assert isinstance(caught.value.__cause__, openai.AuthenticationError)


def test_settings_are_validated_before_any_request(fake, monkeypatch):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", "not a url")
    client = Client(
        load_settings(), http_client=httpx.Client(transport=httpx.MockTransport(fake.handle))
    )
    with pytest.raises(ConfigurationError) as caught:
        client.enhance_prompt("a fox")
    assert len(caught.value.problems) == 2  # the URL and the missing key
    assert fake.requests == []


# ---- the async twin ------------------------------------------------------------------------------


def test_async_client_does_the_same(fake, unit_env):
    fake.reply("A fox.")
    fake.reply('{"values": ["a", "b"]}')
    fake.error(401, GATEWAY_401)

    async def main():
        http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
        async with AsyncClient(http_client=http) as client:
            enhanced = await client.enhance_prompt("a fox")
            values = await client.generate_prompt_variable_values("x", "", 2)
            models = await client.list_models()
            with pytest.raises(GatewayAuthError):
                await client.generate_text("hi")
        return enhanced, values, models

    assert asyncio.run(main()) == ("A fox.", ["a", "b"], ["gpt-4o-mini", "qwen3-4b"])


def test_expand_generates_a_missing_variable_once_and_reuses_the_file(unit_client, fake):
    import random

    fake.reply('{"values": ["phoenix", "griffin", "kirin"]}')
    for i in range(3):
        fake.reply(f"enhanced {i}")
    results = unit_client.expand(
        "a __creature__ in a forest > cinematic : x3", values_per_variable=3, rng=random.Random(1)
    )
    assert [r.prompt for r in results] == ["enhanced 0", "enhanced 1", "enhanced 2"]
    for r in results:
        assert r.substituted == f"a {r.values['creature']} in a forest"
        assert r.values["creature"] in ("phoenix", "griffin", "kirin")
    saved = unit_client.library.get("creature")
    assert saved.values == ["phoenix", "griffin", "kirin"]
    assert "generated by qwen3-4b" in saved.description
    assert fake.chats[1]["messages"][-1]["content"].endswith("Instruction: cinematic")
    # Again: the saved file is used, and without '>' the model is not asked at all.
    assert len(unit_client.expand("a __creature__ : x4")) == 4
    assert len(fake.chats) == 4
