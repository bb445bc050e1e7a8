"""Checks on a request body before LiteLLM acts on it (pure Python, no gateway)."""

from __future__ import annotations

import pytest

from custom_handlers.gateway.body_checks import (
    GATEWAY_ONLY,
    MAX_BODY_DEPTH,
    check_chat_types,
    check_gateway_only,
    check_json_values,
)
from custom_handlers.inference.errors import InvalidRequestError

FOX = [{"role": "user", "content": "a fox"}]


def refused(check, body) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        check(body)
    assert info.value.status_code == 400
    return info.value


@pytest.mark.parametrize("name", list(GATEWAY_ONLY))
def test_keys_only_the_gateway_may_set_are_refused(name):
    error = refused(check_gateway_only, {"model": "gpt-4o-mini", "messages": FOX, name: "x"})
    assert f"'{name}' is a server-only setting" in error.message
    assert error.param == name


def test_an_ordinary_body_has_no_gateway_only_key():
    check_gateway_only({"model": "m", "messages": FOX, "temperature": 0.2, "user": "u"})


def test_a_valid_chat_body_passes():
    check_chat_types(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a fox"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    ],
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "tool", "content": "42", "tool_call_id": "1"},
            ],
            "temperature": 0,
            "top_p": 0.5,
            "max_tokens": 5,
            "stop": ["a", "b"],
            "stream": False,
            "stream_options": {"include_usage": True},
            "response_format": {"type": "json_object"},
            "tool_choice": "auto",
            "seed": None,
        }
    )


@pytest.mark.parametrize(
    ("patch", "param", "needle"),
    [
        ({"messages": "hi"}, "messages", "non-empty array"),
        ({"messages": []}, "messages", "non-empty array"),
        ({"messages": [1]}, "messages[0]", "must be an object"),
        ({"messages": [{"role": None, "content": "x"}]}, "messages[0].role", "must be a string"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "got an integer"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
        ({"messages": [{"role": "developer", "content": None}]}, "messages[0].content", "required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "x"}]}]},
            "messages[0].content",
            "type must be one of",
        ),
        (
            {"messages": [{"role": "tool", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "needs its 'image_url' field",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool_calls": 5}]},
            "messages[0].tool_calls",
            "must be an array",
        ),
        ({"temperature": "hot"}, "temperature", "must be a number, got a string"),
        ({"max_tokens": 2.5}, "max_tokens", "must be an integer, got a number (2.5)"),
        ({"seed": 2.0**70}, "seed", "got an integer outside the 64-bit range (1.181e+21)"),
        ({"n": True}, "n", "must be an integer, got a boolean"),
        ({"stream": "yes"}, "stream", "must be true or false"),
        ({"response_format": "json"}, "response_format", "must be an object"),
        ({"stop": {"a": 1}}, "stop", "must be a string or an array"),
        ({"stop": ["a", 1]}, "stop", "array of strings"),
        ({"timeout": "x"}, "timeout", "must be a number"),
        ({"prompt_id": 5}, "prompt_id", "must be a string"),
        ({"tools": 5}, "tools", "must be an array"),
    ],
)
def test_ill_typed_chat_fields_are_refused_naming_them(patch, param, needle):
    error = refused(check_chat_types, {"model": "m", "messages": FOX, **patch})
    assert error.param == param
    assert needle in error.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused_wherever_they_are(value):
    error = refused(check_json_values, {"messages": FOX, "x": [{"y": [1, value]}]})
    assert error.param == "x[0].y[1]"
    check_json_values({"messages": FOX, "x": [{"y": [1, 2.5, 1e308]}]})


def test_nesting_past_the_limit_is_refused_naming_the_top_level_field():
    deep: list = []
    for _ in range(MAX_BODY_DEPTH):
        deep = [deep]
    error = refused(check_json_values, {"messages": FOX, "extra": deep})
    assert error.param == "extra"
    assert f"more than {MAX_BODY_DEPTH} levels" in error.message
    check_json_values({"messages": FOX, "extra": deep[0]})
