"""Validation of OpenAI chat requests (pure Python, no model)."""

from __future__ import annotations

import json

import pytest

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.request import MAX_SCHEMA_DEPTH, checked_schema, parse_chat_request

USER = [{"role": "user", "content": "a fox"}]
BIG = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}


def parse(messages=USER, stream=False, **params):
    return parse_chat_request(messages, params, stream=stream)


def test_defaults_leave_sampling_to_the_model():
    request = parse()
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.n, s.stop) == (
        None,
        None,
        None,
        None,
        None,
        1,
        (),
    )
    assert request.messages == USER


def test_all_parameters_are_read():
    request = parse(
        max_tokens=10, temperature=0, top_p=0.5, top_k=5, seed=3, n=2, stop=["a", "b", "a"]
    )
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.n) == (10, 0.0, 0.5, 5, 3, 2)
    assert s.stop == ("a", "b")  # duplicates dropped, order kept
    assert s.greedy


def test_max_completion_tokens_wins_over_max_tokens():
    assert parse(max_tokens=10, max_completion_tokens=4).sampling.max_tokens == 4


def test_text_parts_are_joined_and_developer_is_a_system_turn():
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "fox"}],
        },
    ]
    assert parse(messages).messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a fox"},
    ]


@pytest.mark.parametrize(
    ("messages", "params", "needle"),
    [
        ([], {}, "non-empty list"),
        ("hello", {}, "non-empty list"),
        ([{"role": "function", "content": "x"}], {}, "messages[0].role"),
        ([{"role": "tool"}], {}, "messages[0].content"),
        ([{"role": "user"}], {}, "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], {}, "only text"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], {}, "tool_calls[0]"),
        ([{"role": "assistant", "content": "", "function_call": {"name": "f"}}], {}, "legacy"),
        (USER, {"max_tokens": 0}, "'max_tokens' must be at least 1"),
        (USER, {"max_tokens": 2.5}, "'max_tokens' must be an integer"),
        (USER, {"max_tokens": True}, "'max_tokens' must be an integer"),
        (USER, {"temperature": 2.01}, "'temperature'"),
        (USER, {"temperature": "hot"}, "'temperature' must be a number"),
        (USER, {"top_p": 0.0}, "'top_p' must be greater than 0.0"),
        (USER, {"top_p": 1.01}, "'top_p'"),
        (USER, {"top_k": -1}, "'top_k'"),
        (USER, {"n": 0}, "'n' must be between 1 and 8"),
        (USER, {"n": 9}, "'n' must be between 1 and 8"),
        (USER, {"seed": "x"}, "'seed' must be an integer"),
        (USER, {"stop": ""}, "'stop'"),
        (USER, {"stop": ["ok", 3]}, "'stop'"),
        (USER, {"stop": [str(i) for i in range(17)]}, "at most 16"),
        (USER, {"tools": [{"type": "function"}]}, "tools[0].function must be an object"),
        (USER, {"tools": [{"type": "web_search"}]}, "of type 'web_search'"),
        (USER, {"tools": [{"function": {"name": "a b"}}]}, "tools[0].function.name"),
        (
            USER,
            {"tools": [{"function": {"name": "f", "parameters": {"type": "string"}}}]},
            "type 'object'",
        ),
        (USER, {"tools": [{"function": {"name": "f"}}] * 2}, "'f' twice"),
        (USER, {"tools": [{"function": {"name": f"f{i}"}} for i in range(129)]}, "limit is 128"),
        (
            USER,
            {"tools": [{"function": {"name": f"f{i}", "parameters": BIG}} for i in range(6)]},
            "add up to",
        ),
        (
            USER,
            {
                "tools": [
                    {"function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
                ]
            },
            "tools[0].function.parameters is not a valid JSON Schema",
        ),
        (USER, {"tool_choice": "required"}, "offers no 'tools'"),
        (
            USER,
            {"tools": [{"function": {"name": "f"}}], "tool_choice": "maybe"},
            "'tool_choice' must be",
        ),
        (
            USER,
            {
                "tools": [{"function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "names the function 'g'",
        ),
        (
            USER,
            {"tools": [{"function": {"name": "f"}}], "parallel_tool_calls": "yes"},
            "parallel_tool_calls",
        ),
        (USER, {"functions": [{"name": "f"}]}, "send 'tools'"),
        (USER, {"logprobs": 2}, "'logprobs' must be true or false"),
        (USER, {"top_logprobs": 2}, "needs 'logprobs': true"),
        (USER, {"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be between 0 and 20"),
        (USER, {"presence_penalty": 2.5}, "'presence_penalty' must be at least -2.0"),
        (USER, {"typical_p": 0.5}, "'typical_p' is not supported"),
    ],
)
def test_bad_requests_name_the_problem(messages, params, needle):
    with pytest.raises(InvalidRequestError) as info:
        parse(messages, **params)
    assert needle in info.value.message
    assert info.value.status_code == 400


def test_n_above_one_is_refused_when_streaming():
    with pytest.raises(InvalidRequestError, match="n > 1"):
        parse(stream=True, n=2)


def test_harmless_defaults_are_accepted():
    parse(presence_penalty=0, frequency_penalty=0.0, response_format={"type": "text"}, tools=[])


def test_response_format_json_schema_becomes_a_canonical_schema():
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    request = parse(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    closed = {**schema, "additionalProperties": False}  # no keys beyond those it lists
    assert request.json_schema == json.dumps(closed, sort_keys=True, separators=(",", ":"))


def test_response_format_json_object_and_text():
    assert parse(response_format={"type": "json_object"}).json_schema == '{"type":"object"}'
    assert parse(response_format={"type": "text"}).json_schema is None
    assert parse().json_schema is None


@pytest.mark.parametrize(
    ("response_format", "needle"),
    [
        ("json", "must be an object"),
        ({"type": "yaml"}, "'yaml' is not supported"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "JSON Schema object"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}, "valid JSON Schema"),
        (
            {
                "type": "json_schema",
                "json_schema": {"schema": {"properties": {"a": {"minLength": -1}}}},
            },
            "properties/a/minLength",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 70000]}}},
            "the limit is 65536",
        ),
    ],
)
def test_bad_response_format_is_refused(response_format, needle):
    with pytest.raises(InvalidRequestError) as info:
        parse(response_format=response_format)
    assert needle in info.value.message


# ---- server-only settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("model_path", "litellm_params.model in proxy_config.yaml"),
        ("LOCAL_LLM_MODEL", "litellm_params.model in proxy_config.yaml"),
        ("model_info", "proxy_config.yaml"),
        ("litellm_params", "proxy_config.yaml"),
        ("local_llm_device", "LOCAL_LLM_DEVICE"),
        ("device", "LOCAL_LLM_DEVICE"),
        ("device_map", "LOCAL_LLM_DEVICE"),
        ("dtype", "LOCAL_LLM_DTYPE"),
        ("torch_dtype", "LOCAL_LLM_DTYPE"),
        ("quantization", "LOCAL_LLM_QUANTIZATION"),
        ("load_in_4bit", "LOCAL_LLM_QUANTIZATION"),
        ("trust_remote_code", "LOCAL_LLM_TRUST_REMOTE_CODE"),
        ("subfolder", "LOCAL_LLM_SUBFOLDER"),
        ("tokenizer_subfolder", "LOCAL_LLM_TOKENIZER_SUBFOLDER"),
        ("max_batch_size", "LOCAL_LLM_MAX_BATCH_SIZE"),
        ("max_queue", "LOCAL_LLM_MAX_QUEUE"),
        ("max_n", "LOCAL_LLM_MAX_N"),
        ("default_max_tokens", "LOCAL_LLM_DEFAULT_MAX_TOKENS"),
        ("LOCAL_LLM_KEEP_ALIVE", "LOCAL_LLM_KEEP_ALIVE"),
        ("Max-Batch-Size", "LOCAL_LLM_MAX_BATCH_SIZE"),
        ("hf_token", "HF_TOKEN"),
    ],
)
def test_server_only_settings_are_refused_naming_where_they_are_set(name, env):
    with pytest.raises(InvalidRequestError) as info:
        parse(**{name: "x"})
    message = info.value.message
    assert f"'{name}' is a server-only setting" in message
    assert env in message
    assert info.value.param == name
    if env.startswith("LOCAL_LLM_") and env != "LOCAL_LLM_MODEL":  # per model, or for every one
        setting = env.removeprefix("LOCAL_LLM_").lower()
        assert f"model_info.{setting} in proxy_config.yaml" in message


@pytest.mark.parametrize("name", ["max_memory", "gpu_memory_utilization", "context_length"])
def test_settings_fixed_by_the_model_are_refused_too(name):
    with pytest.raises(InvalidRequestError, match="fixed by the model"):
        parse(**{name: 1})


def test_a_server_only_setting_inside_a_raw_extra_body_is_refused():
    with pytest.raises(InvalidRequestError) as info:
        parse(extra_body={"device": "cuda:0"})
    assert info.value.param == "extra_body.device"
    assert "LOCAL_LLM_DEVICE" in info.value.message


def test_what_litellm_itself_adds_to_optional_params_is_not_a_server_setting():
    # Seen in optional_params on /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages.
    parse(
        max_retries=0,
        stream_options={"include_usage": True},
        keep_alive=5,
        top_k=2,
        best_of=1,
        echo=False,
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        extra_body={"keep_alive": 5},
    )


def _nested_properties(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_schema_nested_past_the_limit_is_refused_before_it_is_validated():
    # 100 levels (200 nested objects) hit the validator's recursion limit: a 500 before the fix.
    for levels in (33, 100, 400):
        with pytest.raises(InvalidRequestError, match="more than 64 levels deep") as info:
            parse(response_format=_json_schema(_nested_properties(levels)))
        assert info.value.param == "response_format"


def test_a_schema_nested_up_to_the_limit_is_accepted():
    schema = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH - 1):
        schema = {"type": "array", "items": schema}
    assert parse(response_format=_json_schema(schema)).json_schema is not None
    assert parse(response_format=_json_schema(_nested_properties(31))).json_schema is not None


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("name", ["temperature", "top_p", "keep_alive"])
def test_nan_is_refused(name):
    # JSON has no NaN, but the gateway's parser accepts it; it passed every range check.
    with pytest.raises(InvalidRequestError) as info:
        parse(**{name: float("nan")})
    assert info.value.param == name


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "where": {"type": "object", "properties": {}}},
    "required": ["city"],
}


def test_tools_are_read_with_their_choice():
    tools = [
        {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
        {"type": "function", "function": {"name": "now", "description": "the time"}},
    ]
    request = parse(tools=tools)
    assert (request.tools.choice, request.tools.forced, request.tools.parallel) == (
        "auto",
        None,
        True,
    )
    assert [f.name for f in request.tools.callable] == ["weather", "now"]
    assert json.loads(request.tools.functions[1].parameters) == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    named = {"type": "function", "function": {"name": "now"}}
    forced = parse(tools=tools, tool_choice=named, parallel_tool_calls=False).tools
    assert (forced.must_call, forced.forced, forced.parallel) == (True, "now", False)
    assert [f.name for f in forced.callable] == ["now"]
    assert parse(tools=tools, tool_choice="none").tools.may_call is False
    assert parse(tools=tools, tool_choice="required").tools.must_call is True


def test_objects_get_no_keys_their_schema_does_not_name():
    free = {"type": "object"}
    loose = {**WEATHER, "properties": {**WEATHER["properties"], "free": free}}
    open_ = {"type": "object", "properties": {}, "additionalProperties": {"type": "integer"}}

    def parameters(strict):
        tools = [{"function": {"name": "w", "parameters": loose, "strict": strict}}]
        return json.loads(parse(tools=tools).tools.functions[0].parameters)

    default = parameters(strict=False)  # objects that list their properties are closed
    assert default["additionalProperties"] is False
    assert default["properties"]["where"]["additionalProperties"] is False
    assert default["properties"]["free"] == free  # lists none: any object, as JSON Schema says
    strict = parameters(strict=True)  # every object is closed, as OpenAI's strict mode requires
    assert strict["properties"]["free"] == {**free, "additionalProperties": False}
    tools = [{"function": {"name": "w", "parameters": open_}}]
    said = json.loads(parse(tools=tools).tools.functions[0].parameters)
    assert said == open_  # what a schema says of other keys is kept


def test_a_tool_conversation_is_kept_for_the_chat_template():
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    ]
    assert parse(messages).messages[1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]


# ---- every number is bounded (issue 20) ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, -1, -(2**63), 2**63, 2**64 - 1])
def test_any_64_bit_seed_is_accepted(seed):
    assert parse(seed=seed).sampling.seed == seed


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64, 10**5000], ids=["low", "high", "5001-digit"])
def test_a_seed_past_64_bits_is_refused_naming_the_range(seed):
    with pytest.raises(InvalidRequestError) as info:
        parse(seed=seed)
    assert info.value.param == "seed"
    assert "between -9223372036854775808 and 18446744073709551615" in info.value.message
    assert len(info.value.message) < 200  # a 5,000-digit seed is not written back


def test_a_number_of_thousands_of_digits_is_refused_without_writing_it_out():
    # str() of an int past 4,300 digits raises ValueError: the message must not call it.
    with pytest.raises(InvalidRequestError, match=r"'temperature'.*an integer of \d+ bits"):
        parse(temperature=10**5000)
    with pytest.raises(InvalidRequestError, match=r"'n'.*an integer of \d+ bits"):
        parse(n=-(10**5000))


def test_stop_strings_are_at_most_1000_characters():
    assert parse(stop=["a" * 1000, "b"]).sampling.stop == ("a" * 1000, "b")
    with pytest.raises(InvalidRequestError) as info:
        parse(stop=["b", "a" * 1001])
    assert info.value.param == "stop"
    assert "at most 1000 characters long; one has 1001" in info.value.message


def test_an_empty_stop_list_is_no_stop():
    assert parse(stop=[]).sampling.stop == ()


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-300, 1e-45, 1e-30, 9.9e-6])
def test_temperatures_too_small_to_differ_from_zero_are_greedy(temperature):
    assert parse(temperature=temperature).sampling.greedy


@pytest.mark.parametrize("temperature", [None, 1e-5, 0.7, 2])
def test_other_temperatures_sample(temperature):
    assert not parse(temperature=temperature).sampling.greedy


def test_a_huge_top_k_is_accepted_as_no_limit():
    # Past the vocabulary it changes nothing; sampling clamps it (test_bounds.py runs one).
    assert parse(top_k=2**64).sampling.top_k == 2**64


def test_closing_objects_leaves_const_enum_default_and_examples_as_written():
    data = {"properties": {"a": 1}, "type": "object"}
    schema = {
        "type": "object",
        "properties": {"x": {"const": data, "default": data}, "y": {"enum": [data]}},
        "examples": [data],
    }
    kept = json.loads(checked_schema(schema, "response_format.json_schema.schema"))
    assert kept["properties"]["x"] == {"const": data, "default": data}
    assert kept["properties"]["y"] == {"enum": [data]}
    assert kept["examples"] == [data]
    assert kept["additionalProperties"] is False  # the schema's own objects are still closed
