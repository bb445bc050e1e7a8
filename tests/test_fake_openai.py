"""The fake OpenAI upstream answers the real ``openai`` SDK as OpenAI does (no gateway here).

The client tests run against the cloud alias through this fake, so what it sends must parse,
validate and fit the request's schemas exactly as a real provider's answers would.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Literal

import httpx
import jsonschema
import pytest
from openai import NotFoundError, OpenAI, pydantic_function_tool
from openai.lib._pydantic import to_strict_json_schema
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, Field, TypeAdapter

from tests.servers import FakeOpenAI, _fake_json

MODEL = "gpt-4o-mini"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 3},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
EVENTS = TypeAdapter(ResponseStreamEvent)
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]


class Color(StrEnum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str = Field(min_length=20)
    zip_code: str = Field(max_length=4)


class Person(BaseModel):
    name: str
    age: int = Field(ge=18, le=120)
    score: float = Field(gt=0, lt=1)
    color: Color
    kind: Literal["person"]
    nickname: str | None = None
    address: Address
    previous: list[Address] = []
    favourites: set[Color]
    born: datetime
    pair: tuple[int, str]
    parent: Person | None = None  # recursive: the fake must stop somewhere


@pytest.fixture(scope="module")
def fake():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(fake):
    return OpenAI(base_url=fake.base_url, api_key="sk-fake", max_retries=0, timeout=30)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def raw(fake, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{fake.base_url}{path}", json=body, timeout=30)


def sse_payloads(response: httpx.Response) -> list[str]:
    return [
        line.removeprefix("data: ") for line in response.text.splitlines() if line[:5] == "data:"
    ]


def strict_events(fake, body: dict) -> list:
    """A Responses stream read raw and validated strictly (the SDK itself does not validate)."""
    text = raw(fake, "/responses", {**body, "stream": True}).text
    blocks = [block.splitlines() for block in text.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in blocks]
    events = [EVENTS.validate_json(lines[1].removeprefix("data: ")) for lines in blocks]
    assert names == [e.type for e in events]  # each event's `event:` line names its type
    return events


# ---- JSON that fits a schema ---------------------------------------------------------------------


def test_simple_schemas_keep_their_counted_values():
    schema = {
        "type": "object",
        "properties": {
            "values": {"type": "array", "items": {"type": "string"}, "minItems": 4},
            "count": {"type": "integer"},
            "three": {"type": "array", "items": {"type": "number"}},
        },
    }
    assert _fake_json(schema) == {
        "values": [f"fake value {i}" for i in range(1, 5)],
        "count": 5,
        "three": [6, 7, 8],
    }


@pytest.mark.parametrize("strict", [False, True], ids=["model_json_schema", "strict"])
def test_a_pydantic_model_schema_gets_a_valid_instance(strict):
    schema = to_strict_json_schema(Person) if strict else Person.model_json_schema()
    value = _fake_json(schema)
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    person = Person.model_validate(value)
    assert person.color is Color.RED and len(person.address.street) >= 20


def test_keywords_are_honoured():
    cases = [
        {"const": 42},
        {"type": ["null", "integer"], "exclusiveMinimum": 100},
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
        {"type": "integer", "maximum": -3},
        {"type": "string", "format": "date-time"},
        {"type": "string", "maxLength": 2},
        {"oneOf": [{"type": "null"}, {"type": "boolean"}]},
        {"type": "array", "items": {"enum": ["a"]}, "uniqueItems": True},
        {"$ref": "#/definitions/x", "definitions": {"x": {"type": "integer", "minimum": 9}}},
        {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}}], "required": ["b"]},
    ]
    for schema in cases:
        value = _fake_json(schema)
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


# ---- chat completions: tools ---------------------------------------------------------------------


def test_tools_get_a_call_of_the_first_function_with_valid_arguments(client):
    r = client.chat.completions.create(model=MODEL, messages=user("weather?"), tools=CHAT_TOOLS)
    choice = r.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call_fake_1", "function", "get_weather")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_a_named_tool_choice_is_called_and_none_gets_text(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model=MODEL, messages=user("time?"), tools=CHAT_TOOLS, tool_choice=named
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_time"
    r = client.chat.completions.create(
        model=MODEL, messages=user("time?"), tools=CHAT_TOOLS, tool_choice="none"
    )
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("echo: time?", "stop")


def test_a_tool_result_ends_the_round_trip_with_text(client):
    first = client.chat.completions.create(model=MODEL, messages=user("hi"), tools=CHAT_TOOLS)
    call = first.choices[0].message
    messages = [
        *user("hi"),
        call.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=CHAT_TOOLS)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("echo: sunny", "stop")


def test_parse_with_a_pydantic_tool_gets_a_model(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=user("who?"), tools=[pydantic_function_tool(Person)]
    )
    assert isinstance(r.choices[0].message.tool_calls[0].function.parsed_arguments, Person)


def test_parse_with_a_response_format_gets_a_model(client):
    r = client.chat.completions.parse(model=MODEL, messages=user("who?"), response_format=Person)
    assert isinstance(r.choices[0].message.parsed, Person)


def test_a_streamed_tool_call_has_openais_shape(fake):
    body = {
        "model": MODEL,
        "messages": user("weather?"),
        "tools": CHAT_TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    *data, done = sse_payloads(raw(fake, "/chat/completions", body))
    assert done == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in data]
    head = chunks[0].choices[0].delta
    assert head.role == "assistant"
    assert (head.tool_calls[0].id, head.tool_calls[0].function.name) == (
        "call_fake_1",
        "get_weather",
    )
    assert head.tool_calls[0].function.arguments == ""
    pieces = [c.choices[0].delta.tool_calls[0].function.arguments for c in chunks[1:-2]]
    assert 2 <= len(pieces) <= 3
    jsonschema.validate(json.loads("".join(pieces)), WEATHER)
    finish = chunks[-2].choices[0]
    assert (finish.finish_reason, finish.delta.tool_calls, finish.delta.content) == (
        "tool_calls",
        None,
        None,
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_the_sdks_stream_helper_assembles_the_call(client):
    with client.chat.completions.stream(
        model=MODEL, messages=user("weather?"), tools=CHAT_TOOLS
    ) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


# ---- chat completions: logprobs and streams ------------------------------------------------------


def test_logprobs_cover_the_answer(fake):
    body = {"model": MODEL, "messages": user("a b c"), "logprobs": True, "top_logprobs": 2}
    r = ChatCompletion.model_validate(raw(fake, "/chat/completions", body).json())
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content == "echo: a b c"
    for token in content:
        assert token.bytes == list(token.token.encode()) and token.logprob == -0.5
        assert [t.token for t in token.top_logprobs][:1] == [token.token]
        assert len(token.top_logprobs) == 2
    without = raw(fake, "/chat/completions", {"model": MODEL, "messages": user("x")}).json()
    assert without["choices"][0]["logprobs"] is None


def test_streamed_logprobs_come_with_each_piece(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=user("one two"), logprobs=True, top_logprobs=1, stream=True
    )
    pieces = [c.choices[0] for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(p.delta.content for p in pieces) == "echo: one two"
    assert [p.logprobs.content[0].token for p in pieces] == [p.delta.content for p in pieces]


def test_a_stream_ends_with_usage_only_when_asked(client):
    def chunks(**more):
        return list(
            client.chat.completions.create(
                model=MODEL, messages=user("one two three"), stream=True, **more
            )
        )

    asked = chunks(stream_options={"include_usage": True})
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 4
    assert asked[-2].choices[0].finish_reason == "stop"
    assert asked[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in asked if c.choices)
    assert text == "echo: one two three"
    assert all(c.choices and c.usage is None for c in chunks())


def test_other_paths_still_answer_404(fake):
    assert raw(fake, "/embeddings", {"model": MODEL, "input": "x"}).status_code == 404
    chat_only = OpenAI(base_url=fake.chat_only_base_url, api_key="sk-fake", max_retries=0)
    with pytest.raises(NotFoundError):
        chat_only.responses.create(model=MODEL, input="x")
    r = chat_only.chat.completions.create(model=MODEL, messages=user("x"))
    assert r.choices[0].message.content == "echo: x"


# ---- the Responses API ---------------------------------------------------------------------------


def test_a_response_validates_and_echoes(client, fake):
    r = client.responses.create(model=MODEL, input="a fox")
    assert (r.output_text, r.status, r.output[0].type) == ("echo: a fox", "completed", "message")
    strict = Response.model_validate(raw(fake, "/responses", {"model": MODEL, "input": "x"}).json())
    assert strict.usage.output_tokens == 2 and strict.usage.input_tokens_details.cached_tokens == 0


def test_a_response_to_input_items_echoes_the_last_user_text(client):
    r = client.responses.create(
        model=MODEL,
        instructions="be brief",
        input=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "input_text", "text": "a cat"}]},
        ],
    )
    assert r.output_text == "echo: a cat"


def test_a_streamed_response_sends_openais_events(client, fake):
    events = list(client.responses.create(model=MODEL, input="a fox", stream=True))
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == "echo: a fox"
    strict = strict_events(fake, {"model": MODEL, "input": "a fox"})
    assert [e.type for e in strict] == [e.type for e in events]


def test_the_sdks_responses_stream_helper_assembles_the_text(client):
    with client.responses.stream(model=MODEL, input="a fox") as stream:
        assert stream.get_final_response().output_text == "echo: a fox"


def test_a_function_tool_gets_a_call_then_its_output_is_echoed(client):
    r = client.responses.create(model=MODEL, input="weather?", tools=RESPONSES_TOOLS)
    [call] = r.output
    assert (call.type, call.id, call.call_id, call.name) == (
        "function_call",
        "fc_fake_1",
        "call_fake_1",
        "get_weather",
    )
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    after = client.responses.create(
        model=MODEL, input=[*user("weather?"), call, output], tools=RESPONSES_TOOLS
    )
    assert after.output_text == "echo: sunny"
    plain = client.responses.create(
        model=MODEL, input="weather?", tools=RESPONSES_TOOLS, tool_choice="none"
    )
    assert plain.output_text == "echo: weather?"


def test_a_streamed_function_call_sends_the_arguments_in_pieces(client, fake):
    events = list(
        client.responses.create(model=MODEL, input="weather?", tools=RESPONSES_TOOLS, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert 2 <= len(deltas) <= 3
    assert "".join(deltas) == events[-3].arguments == events[-1].response.output[0].arguments
    jsonschema.validate(json.loads(events[-3].arguments), WEATHER)
    strict = strict_events(fake, {"model": MODEL, "input": "weather?", "tools": RESPONSES_TOOLS})
    assert [e.type for e in strict] == kinds


def test_responses_parse_gets_a_model(client):
    r = client.responses.parse(model=MODEL, input="who?", text_format=Person)
    assert isinstance(r.output_parsed, Person)


def test_a_bad_responses_body_gets_a_400(fake):
    r = raw(fake, "/responses", {"model": MODEL, "input": 7})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_responses_are_kept_and_chained_as_openai_keeps_them(client):
    first = client.responses.create(model=MODEL, input="Remember: Paris, seven days.")
    assert first.id.startswith("resp_fake_") and first.usage.input_tokens == 4
    assert client.responses.retrieve(first.id) == first
    chained = client.responses.create(model=MODEL, input="And now?", previous_response_id=first.id)
    assert chained.id != first.id and chained.output_text == "echo: And now?"
    # the earlier input (4 words) and output ("echo: Remember: ...", 5 words) come first
    assert chained.usage.input_tokens == 4 + 5 + 2
    streamed = list(
        client.responses.create(
            model=MODEL, input="And now?", previous_response_id=chained.id, stream=True
        )
    )
    final = streamed[-1].response
    assert final.usage.input_tokens > chained.usage.input_tokens
    assert client.responses.retrieve(final.id).id == final.id
    with pytest.raises(NotFoundError) as missing:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_unknown")
    assert missing.value.body["code"] == "previous_response_not_found"
    unkept = client.responses.create(model=MODEL, input="hi", store=False)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(unkept.id)
