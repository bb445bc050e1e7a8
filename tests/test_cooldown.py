"""One caller's mistake never makes a model unavailable to the others; a provider outage may.

LiteLLM pauses ("cools down") a deployment after one 401 or 404 from its provider, even alone in
its model group: every caller of ``gpt-4o-mini`` then got 429 for 5 s after one caller asked for an
endpoint the provider lacks. ``proxy_config.yaml``'s ``allowed_fails_policy`` stops 4xx answers from
counting. Both sides are tested on a gateway of their own, with the fake upstream: a 404 and a 401
leave the model serving the next caller at once; a deployment whose provider answers 500 is
paused, and the model's other deployment serves every request after that.
"""

from __future__ import annotations

import httpx
import pytest
import yaml

from tests.servers import CONFIG, FAKE_OPENAI_KEY, Gateway

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def cooldown_gateway(fake_openai, tiny_model_dir, tmp_path_factory):
    """The shipped YAML, plus ``flaky``: one deployment whose provider is down, one that works."""
    work = tmp_path_factory.mktemp("cooldown")
    config = yaml.safe_load(CONFIG.read_text())
    root = fake_openai.base_url.removesuffix("/v1")
    for api_base in (f"{root}/outage/v1", fake_openai.base_url):
        config["model_list"].append(
            {
                "model_name": "flaky",
                "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": api_base},
            }
        )
    path = work / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(config))
    # Chat completions only, like vLLM's server: its /v1/responses is a 404.
    chat_only = fake_openai.chat_only_base_url
    env = fake_openai.gateway_env(str(tiny_model_dir), OPENAI_BASE_URL=chat_only)
    gw = Gateway(env=env, workdir=work, config=path).start()
    yield gw
    gw.stop()


def test_a_404_from_the_provider_does_not_pause_the_model(cooldown_gateway):
    gw = cooldown_gateway
    headers = {"Authorization": f"Bearer {gw.key}"}
    # The fake upstream has chat completions only, like vLLM or llama.cpp's server.
    refused = httpx.post(
        f"{gw.base_url}/v1/responses",
        json={"model": "gpt-4o-mini", "input": "hello"},
        headers=headers,
        timeout=60,
    )
    assert refused.status_code == 404, refused.text
    for _ in range(3):
        answer = gw.chat({"model": "gpt-4o-mini", "messages": HELLO})
        assert answer.status_code == 200, answer.text


def test_a_401_from_the_provider_does_not_pause_the_model(cooldown_gateway, fake_openai):
    gw = cooldown_gateway
    fake_openai.invalid_keys.add(FAKE_OPENAI_KEY)
    try:
        refused = gw.chat({"model": "gpt-4o-mini", "messages": HELLO})
    finally:
        fake_openai.invalid_keys.discard(FAKE_OPENAI_KEY)
    assert refused.status_code == 401, refused.text
    answer = gw.chat({"model": "gpt-4o-mini", "messages": HELLO})
    assert answer.status_code == 200, answer.text


def test_a_provider_outage_pauses_that_deployment_and_the_other_one_serves(
    cooldown_gateway, fake_openai
):
    gw = cooldown_gateway

    def outage_hits() -> int:
        return sum(r["path"].startswith("/outage/") for r in fake_openai.requests)

    # Without a pause, LiteLLM's shuffle would send half the requests to the failing deployment:
    # 20 in a row that all avoid it would happen once in a million. With the pause (after more
    # than 3 failures in a minute, recorded once the router has answered; it lasts 5 s), they do.
    statuses, streak, seen = [], 0, outage_hits()
    for _ in range(80):
        statuses.append(gw.chat({"model": "flaky", "messages": HELLO}).status_code)
        now = outage_hits()
        streak, seen = (streak + 1 if now == seen else 0), now
        if streak == 20:
            break
    assert streak == 20, f"never 20 requests in a row without the failing deployment: {statuses}"
    assert statuses[-20:] == [200] * 20
