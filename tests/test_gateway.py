"""The real LiteLLM proxy with proxy_config.yaml, called with the OpenAI SDK (tiny local model)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import yaml

from tests.pace import wait_for
from tests.servers import CONFIG, FAKE_OPENAI_KEY, Gateway, free_port

pytestmark = pytest.mark.integration

LOCAL = "qwen3-4b"
FOX = [{"role": "user", "content": "a cute fox in a misty forest"}]


def greedy(client, messages=FOX, **kwargs):
    kwargs.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=LOCAL, messages=messages, temperature=0, **kwargs)


def seeded(client, messages=FOX, **kwargs):
    """A sampled answer: the random tiny model's greedy output is often one repeated token."""
    kwargs.setdefault("max_tokens", 24)
    kwargs.setdefault("seed", 11)
    return client.chat.completions.create(
        model=LOCAL, messages=messages, temperature=1.0, top_p=1.0, **kwargs
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- answers ------------------------------------------------------------------------------------


def test_completion_is_openai_shaped_with_true_usage(client, tokenizer):
    r = greedy(client, max_tokens=16)
    choice = r.choices[0]
    assert r.object == "chat.completion"
    assert r.model == LOCAL
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, FOX)
    # OpenAI's details objects: prompt tokens served from the prefix cache, and reasoning tokens
    # (0: non-thinking mode). The same prompt again reuses all but the last of its tokens' KV.
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_system_assistant_turns_and_text_parts(client, tokenizer):
    messages = [
        {"role": "system", "content": "You write image prompts."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a fox"}, {"type": "text", "text": " at night"}],
        },
        {"role": "assistant", "content": "A fox at night."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "again"},
    ]
    r = greedy(client, messages=messages, max_tokens=4)
    as_strings = [
        {"role": "system", "content": "You write image prompts."},
        {"role": "user", "content": "a fox at night"},
        {"role": "assistant", "content": "A fox at night."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "again"},
    ]
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, as_strings)


def test_max_tokens_and_max_completion_tokens_cut_with_length(client):
    r = greedy(client, max_tokens=5)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 5)
    r = client.chat.completions.create(
        model=LOCAL, messages=FOX, temperature=0, max_completion_tokens=3
    )
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 3)


def test_temperature_zero_is_deterministic(client):
    first = greedy(client).choices[0].message.content
    assert all(greedy(client).choices[0].message.content == first for _ in range(2))


def test_same_seed_same_output_other_seed_other_output(client):
    def sample(seed):
        return (
            client.chat.completions.create(
                model=LOCAL, messages=FOX, temperature=1.0, top_p=1.0, seed=seed, max_tokens=24
            )
            .choices[0]
            .message.content
        )

    a = sample(1234)
    assert sample(1234) == a
    assert sample(4321) != a


def test_tiny_top_p_and_top_k_one_reduce_sampling_to_greedy(client):
    expected = greedy(client).choices[0].message.content
    by_top_p = client.chat.completions.create(
        model=LOCAL, messages=FOX, temperature=1.5, top_p=1e-6, seed=7, max_tokens=24
    )
    by_top_k = client.chat.completions.create(
        model=LOCAL,
        messages=FOX,
        temperature=1.5,
        seed=7,
        max_tokens=24,
        extra_body={"top_k": 1, "top_p": 1.0},
    )
    assert by_top_p.choices[0].message.content == expected
    assert by_top_k.choices[0].message.content == expected


def _stop_candidate(text: str) -> str:
    """A short piece from the middle of ``text`` that is not just whitespace."""
    for start in range(3, len(text) - 2):
        piece = text[start : start + 2]
        if piece.strip() and "\ufffd" not in piece:
            return piece
    pytest.fail(f"no stop candidate in {text!r}")


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_ends_the_answer_before_the_stop_text(client, as_list):
    full = seeded(client, max_tokens=40).choices[0].message.content
    stop = _stop_candidate(full)
    r = seeded(client, max_tokens=40, stop=[stop, "never-appears-123"] if as_list else stop)
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_greedy_n_returns_n_identical_choices(client):
    r = greedy(client, n=2, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content


def test_more_than_four_stop_strings_all_apply(client):
    full = seeded(client, max_tokens=40).choices[0].message.content
    stop = _stop_candidate(full)
    decoys = [f"decoy-{i}-never" for i in range(5)]
    r = seeded(client, max_tokens=40, stop=[*decoys, stop])
    assert r.choices[0].message.content == full[: full.find(stop)]


def test_n_returns_n_choices(client):
    r = client.chat.completions.create(
        model=LOCAL, messages=FOX, n=3, temperature=1.0, seed=5, max_tokens=12
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens <= 36


# ---- streaming ----------------------------------------------------------------------------------


def test_stream_sends_text_in_chunks_and_usage_when_asked(gateway, client, gateway_hold):
    expected = seeded(client, max_tokens=300)
    assert expected.usage.completion_tokens >= 200, "this seed ends too early for the test"
    # The model is held after the first token: the first piece must reach the client while the
    # answer is still being made, however fast the machine (no count of pieces to guess).
    gateway_hold.decoding()
    stream = iter(
        seeded(client, max_tokens=300, stream=True, stream_options={"include_usage": True})
    )
    chunks = []
    while not (chunks and chunks[-1].choices and chunks[-1].choices[0].delta.content):
        chunks.append(next(stream))
    assert gateway_hold.held()  # the engine stands still: what the state says holds
    assert gateway.requests() == {"running": 1, "queued": 0}  # sent before the answer was done
    gateway_hold.release()
    chunks += list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    usage = [c.usage for c in chunks if c.usage]
    assert len(pieces) >= 2
    assert "".join(pieces) == expected.choices[0].message.content
    assert finishes == [expected.choices[0].finish_reason]
    assert len(usage) == 1
    assert chunks[-1].usage and chunks[-1].choices == []  # OpenAI's usage chunk: no choice
    assert usage[0].completion_tokens == expected.usage.completion_tokens
    assert usage[0].prompt_tokens == expected.usage.prompt_tokens


def test_stream_without_include_usage_sends_no_usage(client):
    chunks = list(greedy(client, max_tokens=6, stream=True))
    assert not [c for c in chunks if c.usage]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_closing_a_stream_stops_its_generation(gateway, client, gateway_hold):
    before = len(gateway.cancelled_counts())  # the session's gateway: other tests cancel too
    gateway_hold.decoding()  # held after its first token: what it made before the close is known
    stream = client.chat.completions.create(
        model=LOCAL, messages=FOX, temperature=1.0, seed=1, max_tokens=1900, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    # Cancelled (no longer counted as running) while the model stood still; then let go.
    assert gateway.wait_for_requests({"running": 0, "queued": 0}) == {"running": 0, "queued": 0}
    gateway_hold.release()
    tokens = gateway.wait_for_cancellation(before)
    assert tokens <= 2  # its first token, and at most the step held when the client left
    assert greedy(client, max_tokens=2).choices[0].finish_reason == "length"


# ---- bad input: 4xx, clear message, gateway keeps serving ----------------------------------------

BAD_REQUESTS = {
    "empty messages": ({"messages": []}, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    "image content": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}
                    ],
                }
            ]
        },
        "only text",
    ),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens negative": ({"max_tokens": -5}, "max_tokens"),
    "temperature too high": ({"temperature": 2.5}, "temperature"),
    "temperature negative": ({"temperature": -0.1}, "temperature"),
    "top_p zero": ({"top_p": 0}, "top_p"),
    "top_p above one": ({"top_p": 1.5}, "top_p"),
    "n zero": ({"n": 0}, "'n'"),
    "stop empty string": ({"stop": [""]}, "stop"),
    "tool of another type": ({"tools": [{"type": "web_search"}]}, "of type 'web_search'"),
    "tool schema unenforceable": (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}},
                }
            ]
        },
        "tools[0].function.parameters",
    ),
    "context exceeded by max_tokens": ({"max_tokens": 5000}, "context_length_exceeded"),
    "megabytes of prompt": (
        {"messages": [{"role": "user", "content": "fox " * 1_000_000}], "max_tokens": 10},
        "cannot fit",
    ),
    "context exceeded by prompt": (
        {"messages": [{"role": "user", "content": "fox " * 3000}], "max_tokens": 10},
        "context_length_exceeded",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_400_with_a_clear_message(gateway, name):
    patch, expected = BAD_REQUESTS[name]
    body = {"model": LOCAL, "messages": FOX, "max_tokens": 4, **patch}
    r = gateway.chat(body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert expected in error["message"]
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"] and "litellm." not in error["message"]


def test_errors_name_the_parameter(gateway):
    r = gateway.chat({"model": LOCAL, "messages": FOX, "temperature": 9})
    assert r.json()["error"]["param"] == "temperature"


def test_bad_input_on_a_stream_gets_400_before_any_chunk(gateway):
    r = gateway.chat({"model": LOCAL, "messages": FOX, "max_tokens": 5000, "stream": True})
    assert r.status_code == 400
    assert "context_length_exceeded" in r.json()["error"]["message"]


def test_unknown_model_is_openais_404_model_not_found_on_every_route(client, gateway):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=FOX)
    assert "no-such-model" in str(info.value) and info.value.code == "model_not_found"
    headers = {"Authorization": f"Bearer {gateway.key}"}
    body = {"model": "no-such-model", "input": "a fox", "prompt": "a fox", "messages": FOX}
    for route in ("completions", "responses", "embeddings", "images/generations", "rerank"):
        r = httpx.post(f"{gateway.base_url}/v1/{route}", json=body, headers=headers, timeout=30)
        assert r.status_code == 404, route
        assert r.json()["error"]["code"] == "model_not_found", route
        assert r.json()["error"]["param"] == "model", route
    r = httpx.post(
        f"{gateway.base_url}/v1/messages", json=body | {"max_tokens": 5}, headers=headers
    )
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{gateway.base_url}/v1/models/no-such-model", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_malformed_json_gets_400(gateway):
    r = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        content=b'{"model": "qwen3-4b", "mes',
        headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("model", [LOCAL, "gpt-4o-mini"])
def test_json_sent_as_a_form_gets_400_saying_to_send_the_content_type(gateway, model):
    # What `curl -d '{...}'` sends without -H 'Content-Type: application/json'.
    body = json.dumps({"model": model, "messages": FOX}).encode()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {gateway.key}", **form},
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert "'Content-Type: application/json'" in error["message"]
    assert error["type"] == "invalid_request_error"
    keyless = httpx.post(f"{gateway.base_url}/v1/chat/completions", content=body, headers=form)
    assert keyless.status_code == 401  # the key is checked first, as for every body


def test_an_unreachable_provider_gets_502_naming_the_model_and_the_address(
    fake_openai, tiny_model_dir, tmp_path
):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = fake_openai.gateway_env(str(tiny_model_dir), OLLAMA_API_BASE=nobody)
    env["OPENAI_BASE_URL"] = f"{nobody}/v1"
    # The answer's words are checked, not LiteLLM's two retries of a refused connection, whose
    # back-off made this test wait about 30 s: the retries are off here.
    config = yaml.safe_load(CONFIG.read_text())
    config.setdefault("router_settings", {})["num_retries"] = 0
    (tmp_path / "proxy_config.yaml").write_text(yaml.safe_dump(config))
    gw = Gateway(env=env, workdir=tmp_path, config=tmp_path / "proxy_config.yaml").start()
    try:
        for model, start in (("ollama-qwen3", "Start Ollama"), ("gpt-4o-mini", "Start that")):
            for stream in (False, True):
                r = gw.chat({"model": model, "messages": FOX, "stream": stream})
                assert r.status_code == 502, r.text
                error = r.json()["error"]
                assert error["message"].startswith(
                    f"The provider behind model '{model}' cannot be reached at {nobody} ("
                ), error
                assert start in error["message"] and "ssl:<" not in error["message"]
                assert error["type"] == "api_connection_error"
        assert gw.chat({"model": LOCAL, "messages": FOX, "max_tokens": 2}).status_code == 200
    finally:
        gw.stop()


def test_start_up_logs_no_warning_that_does_not_apply(gateway):
    # LiteLLM warned about trusted_proxy_ranges (answered in proxy_config.yaml) and about
    # custom_auth_run_common_checks (records in a database this gateway does not have).
    started = gateway.log().split("Uvicorn running on")[0]
    assert "Uvicorn running on" in gateway.log()
    assert [line for line in started.splitlines() if "WARNING" in line] == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "route, body",
    [
        ("/v1/chat/completions", {"messages": FOX}),
        ("/v1/completions", {"prompt": "a fox"}),
        ("/v1/responses", {"input": "a fox"}),
    ],
)
def test_every_route_answers_the_local_models_refusal_alike(gateway, route, body, stream):
    r = httpx.post(
        f"{gateway.base_url}{route}",
        json={"model": LOCAL, **body, "top_p": 0, "stream": stream},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=60,
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == "'top_p' must be greater than 0.0 and at most 1.0, got 0."
    assert (error["type"], error["param"]) == ("invalid_request_error", "top_p")


@pytest.mark.parametrize(
    "extra",
    [
        {"verbosity": "low"},
        {"thinking": {"type": "enabled", "budget_tokens": 100}},
        {"verbosity": "low", "allowed_openai_params": ["verbosity"]},
        {"allowed_openai_params": ["service_tier"]},
    ],
)
def test_parameters_the_local_model_lacks_get_its_own_400_and_no_bypass(gateway, extra):
    r = gateway.chat({"model": LOCAL, "messages": FOX, "max_tokens": 2, **extra})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith(f"'{error['param']}' is not supported by the local model")
    assert error["param"] in extra
    assert "drop_params" not in error["message"]  # never "change the server's settings"


def test_reasoning_effort_is_qwen3s_thinking_switch(gateway):
    # The tiny checkpoint's template reads enable_thinking, as a hybrid Qwen3's does.
    for effort in ("none", "minimal", "low", "high"):
        body = {"model": LOCAL, "messages": FOX, "max_tokens": 8, "reasoning_effort": effort}
        r = gateway.chat({**body, "seed": 1})
        assert r.status_code == 200, r.text
        # A leading think block never reaches the caller; random weights may still write the
        # <think> token later in the text, which is text like any other.
        assert not r.json()["choices"][0]["message"]["content"].lstrip().startswith("<think>")
    bad = gateway.chat({"model": LOCAL, "messages": FOX, "reasoning_effort": "extreme"})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "reasoning_effort")
    constrained = {"response_format": {"type": "json_object"}, "reasoning_effort": "low"}
    r = gateway.chat({"model": LOCAL, "messages": FOX, **constrained})
    assert r.status_code == 400 and "constrained from its first token" in r.text


def test_a_cloud_model_still_takes_allowed_openai_params(gateway):
    body = {"model": "gpt-4o-mini", "messages": FOX, "allowed_openai_params": ["user"]}
    assert gateway.chat(body).status_code == 200


def test_a_refused_request_logs_one_line_and_no_traceback(gateway):
    seen = len(gateway.log())
    refused = [
        {"model": LOCAL, "messages": FOX, "top_p": 0},
        {"model": LOCAL, "messages": FOX, "top_p": 0, "stream": True},
        {"model": LOCAL, "messages": FOX, "max_tokens": 10**6},
    ]
    for body in refused:
        assert gateway.chat(body).status_code == 400
    # The log is written as the answers go out: wait for the lines (or more) to be there.
    wait_for(lambda: gateway.log()[seen:].count("Refused with 400") >= len(refused))
    logged = gateway.log()[seen:]
    assert "Traceback" not in logged
    lines = [line for line in logged.splitlines() if "Refused with 400" in line]
    assert len(lines) == len(refused), logged[-3000:]
    assert "'top_p' must be greater than 0.0" in lines[0]
    assert "context_length_exceeded" in lines[2]


def test_gateway_still_serves_after_bad_input(gateway, client):
    for name in BAD_REQUESTS:
        patch, _ = BAD_REQUESTS[name]
        gateway.chat({"model": LOCAL, "messages": FOX, **patch})
    assert greedy(client, max_tokens=3).usage.completion_tokens >= 1


# ---- auth ---------------------------------------------------------------------------------------


# Every route that serves or describes models (LiteLLM's others are closed: tests/test_surface.py).
# Only /health/liveliness and /health/readiness answer without the key.
KEYED_ROUTES = [
    "POST /v1/chat/completions",
    "POST /chat/completions",
    "POST /engines/qwen3-4b/chat/completions",
    "POST /openai/deployments/qwen3-4b/chat/completions",
    "POST /v1/completions",
    "POST /v1/responses",
    "POST /v1/messages",
    "POST /v1/embeddings",
    "POST /v1/images/generations",
    "POST /v1/rerank",
    "GET /v1/models",
    "GET /models",
    "GET /health",
]  # /local/state and /local/release: tests/test_local_state.py; the closed routes (LiteLLM's
# management and pass-through routes): tests/test_surface.py


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong-key-987"}], ids=["no key", "wrong key"]
)
@pytest.mark.parametrize("route", KEYED_ROUTES)
def test_missing_or_wrong_key_gets_401(gateway, headers, route):
    method, path = route.split()
    body = {"model": LOCAL, "messages": FOX, "max_tokens": 2, "input": "x", "prompt": "x"}
    r = httpx.request(
        method, gateway.base_url + path, headers=headers, json=body if method == "POST" else None
    )
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert "sk-wrong-key-987" not in r.text
    assert gateway.key not in r.text


def test_keys_never_reach_the_log(gateway, client):
    httpx.get(f"{gateway.base_url}/v1/models", headers={"Authorization": "Bearer sk-leak-me-4321"})
    greedy(client, max_tokens=2)
    log = gateway.log()
    assert "sk-leak-me-4321" not in log
    assert gateway.key not in log
    assert FAKE_OPENAI_KEY not in log


def test_models_lists_every_alias(client):
    assert {m.id for m in client.models.list()} >= {
        "qwen3-4b",
        "gpt-4o-mini",
        "claude-haiku",
        "ollama-qwen3",
    }


# ---- concurrency --------------------------------------------------------------------------------


def test_concurrent_requests_are_all_answered(client, aclient):
    prompts = [[{"role": "user", "content": f"a fox number {i}"}] for i in range(8)]
    alone = [greedy(client, messages=p, max_tokens=12).choices[0].message.content for p in prompts]

    async def one(i):
        if i % 2:
            stream = await aclient.chat.completions.create(
                model=LOCAL, messages=prompts[i], temperature=0, max_tokens=12, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        r = await aclient.chat.completions.create(
            model=LOCAL, messages=prompts[i], temperature=0, max_tokens=12
        )
        return r.choices[0].message.content

    async def all_at_once():
        return await asyncio.gather(*(one(i) for i in range(8)))

    assert asyncio.run(all_at_once()) == alone


# ---- cloud routing (fake OpenAI upstream on loopback) -------------------------------------------


def test_cloud_alias_is_routed_to_the_provider(client, fake_openai):
    before = len(fake_openai.requests)
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello cloud"}]
    )
    assert r.choices[0].message.content == "echo: hello cloud"
    sent = fake_openai.requests[before]
    assert sent["body"]["model"] == "gpt-4o-mini"
    assert sent["authorization"] == f"Bearer {FAKE_OPENAI_KEY}"


def test_cloud_alias_streams(client):
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "echo: one two three"
