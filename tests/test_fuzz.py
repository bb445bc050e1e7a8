"""Fuzz POST /v1/chat/completions on the real gateway: whatever the body, no 5xx, and it stays up.

Bodies follow the OpenAI chat schema with random, often ill-typed, values in every field (and
unknown keys), or are any JSON value at all. Both the local model and the cloud alias (the fake
OpenAI upstream) are fuzzed. ``derandomize`` makes every run send the same examples, so CI is
reproducible; most examples carry a small ``max_tokens`` so the valid ones finish fast.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

LOCAL = "qwen3-4b"
CLOUD = "gpt-4o-mini"
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies ---------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


_text = st.text(max_size=30)
_roles = st.sampled_from(
    ["user", "user", "system", "developer", "assistant", "assistant", "tool", "function", "x"]
)
_part_types = st.sampled_from(["text", "image_url", "input_audio", "refusal", "x"])
_text_parts = st.fixed_dictionaries({"type": st.just("text"), "text": _text})
_any_parts = st.fixed_dictionaries(
    {"type": _part_types}, optional={"text": _text, "image_url": json_values}
)
_content = st.one_of(
    *[_text] * 3, st.lists(_text_parts, max_size=3), st.lists(_any_parts, max_size=2), st.none()
)
_message = st.fixed_dictionaries(
    {"role": _roles, "content": _content},
    optional={"name": _text, "tool_calls": st.lists(json_values, max_size=2)},
)
_schemas = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "boolean", "number"])}),
    lambda inner: (
        st.fixed_dictionaries(
            {
                "type": st.just("object"),
                "properties": st.dictionaries(st.text(max_size=4), inner, max_size=3),
            }
        )
        | st.fixed_dictionaries(
            {"type": st.just("array"), "items": inner, "maxItems": st.integers(0, 3)}
        )
    ),
    max_leaves=4,
)
_response_formats = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "x"])}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries({"name": _text, "schema": _schemas}),
        }
    ),
)
# Plausible values of each field (valid or not for a given model); any field may get junk instead.
_FIELDS = {
    "messages": st.lists(_message, min_size=1, max_size=3),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-2, 50),
    "n": st.integers(-1, 3),
    "stop": st.one_of(_text, st.lists(_text, max_size=5)),
    "seed": st.integers(-(2**64), 2**64),
    "response_format": _response_formats,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "keep_alive": st.sampled_from([-1, 0, 30, 300]),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(-1, 12),
    "min_p": st.floats(-0.5, 1.5),
    "logit_bias": st.dictionaries(st.integers(0, 700).map(str), st.floats(-120, 120), max_size=3),
    "logprobs": st.booleans(),
    "tools": st.lists(json_values, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto"]),
    "user": _text,
    "metadata": st.dictionaries(st.text(max_size=6), _text, max_size=2),
    "max_completion_tokens": st.integers(1, 8),
}
_OPTIONAL = [name for name in _FIELDS if name != "messages"]
# Small budgets keep valid requests fast; ~1 in 7 has none (the tiny model's default then applies).
_max_tokens = st.one_of(*[st.integers(1, 8)] * 5, st.none(), json_values)


@st.composite
def chat_bodies(draw, model: str) -> dict:
    """A chat body with a few optional fields; none, one or two of its fields are junk."""
    present = draw(st.sets(st.sampled_from(_OPTIONAL), max_size=4))
    junk = draw(st.sets(st.sampled_from([*_OPTIONAL, "messages", "model"]), max_size=2))
    body = {
        name: draw(json_values if name in junk else _FIELDS[name])
        for name in ["messages", *sorted(present | (junk - {"model"}))]
    }
    max_tokens = draw(_max_tokens)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    unknown = draw(st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=1))
    body.update({k: v for k, v in unknown.items() if k not in body})
    body["model"] = draw(json_values) if "model" in junk else model
    return body


# ---- the checks ---------------------------------------------------------------------------------


def post(gateway, body) -> httpx.Response:
    """Raw JSON as a careless client might send it (NaN and Infinity included)."""
    return httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        content=json.dumps(body, allow_nan=True),
        headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"},
        timeout=120,
    )


def check_answer(body, r: httpx.Response) -> None:
    shown = f"body={json.dumps(body, allow_nan=True)[:2000]}\n-> {r.status_code} {r.text[:1000]}"
    assert r.status_code < 500, shown
    if r.status_code >= 400:
        error = r.json().get("error")
        assert isinstance(error, dict) and isinstance(error.get("message"), str), shown
        assert error["message"], shown


def assert_still_serving(client) -> None:
    for model in (LOCAL, CLOUD):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "still there?"}], max_tokens=2
        )
        assert r.choices[0].message.content is not None


@pytest.mark.parametrize("model", [LOCAL, CLOUD])
def test_fuzzed_chat_bodies_never_get_a_5xx(gateway, client, model):
    @FUZZ
    @given(body=chat_bodies(model))
    def fuzz(body):
        check_answer(body, post(gateway, body))

    fuzz()
    assert_still_serving(client)


def test_any_json_value_as_the_body_never_gets_a_5xx(gateway, client):
    @FUZZ
    @given(body=json_values | st.dictionaries(st.text(max_size=10), json_values, max_size=4))
    def fuzz(body):
        check_answer(body, post(gateway, body))

    fuzz()
    assert_still_serving(client)
