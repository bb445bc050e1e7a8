"""``/v1/responses`` on an ``openai/`` model behind a server that has chat completions only.

The README's "Add a model" section points vLLM, llama.cpp's server and other OpenAI-compatible
servers at ``openai/<id>`` with an ``api_base``. For such a model LiteLLM calls the server's own
``/v1/responses``, which those servers lack (404); ``use_chat_completions_api: true`` in the entry's
``litellm_params`` makes LiteLLM answer Responses requests through the server's chat completions.
The fake upstream's ``chat_only_base_url`` has chat completions only, like those servers.
"""

from __future__ import annotations

import pytest
import yaml
from openai import NotFoundError, OpenAI

from tests.servers import CONFIG, Gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bridge_gateway(fake_openai, tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("responses-bridge")
    config = yaml.safe_load(CONFIG.read_text())
    for name, bridged in (("chat-only", False), ("chat-only-bridged", True)):
        params = {"model": "openai/my-model", "api_base": fake_openai.chat_only_base_url}
        if bridged:
            params["use_chat_completions_api"] = True
        config["model_list"].append({"model_name": name, "litellm_params": params})
    path = work / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = Gateway(env=fake_openai.gateway_env(str(tiny_model_dir)), workdir=work, config=path)
    yield gw.start()
    gw.stop()


def _client(gw: Gateway) -> OpenAI:
    return OpenAI(base_url=f"{gw.base_url}/v1", api_key=gw.key, max_retries=0, timeout=60)


def test_without_the_setting_the_servers_missing_endpoint_is_a_404(bridge_gateway):
    with pytest.raises(NotFoundError):
        _client(bridge_gateway).responses.create(model="chat-only", input="a fox")


def test_with_use_chat_completions_api_responses_work_plain_and_streamed(bridge_gateway):
    client = _client(bridge_gateway)
    response = client.responses.create(model="chat-only-bridged", input="a fox")
    assert response.output_text == "echo: a fox"
    events = list(client.responses.create(model="chat-only-bridged", input="a fox", stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "echo: a fox"
