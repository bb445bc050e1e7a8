"""JSON-constrained output on the local model, through the real gateway.

The tiny model is random: unconstrained it writes garbage, so every valid answer here is the
constraint's doing.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

pytestmark = pytest.mark.integration

LOCAL = "qwen3-4b"
ASK = [{"role": "user", "content": "three cat breeds"}]

VALUES = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 20},
            "minItems": 3,
            "maxItems": 3,
        }
    },
    "required": ["values"],
    "additionalProperties": False,
}
MIXED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "fox", "owl"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "pos": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "count", "score", "ok", "tags", "pos"],
    "additionalProperties": False,
}
REFS = {
    "$defs": {
        "creature": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 8},
                "legs": {"type": "integer", "minimum": 0, "maximum": 8},
            },
            "required": ["name", "legs"],
            "additionalProperties": False,
        }
    },
    "type": "array",
    "items": {"$ref": "#/$defs/creature"},
    "minItems": 1,
    "maxItems": 3,
}
SCHEMAS = {"values": VALUES, "mixed": MIXED, "refs": REFS}


def json_schema(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(client, schema_name=None, *, seed=0, max_tokens=300, **kwargs):
    if schema_name is not None:
        kwargs["response_format"] = json_schema(schema_name, SCHEMAS[schema_name])
    return client.chat.completions.create(
        model=LOCAL, messages=ASK, temperature=1.0, seed=seed, max_tokens=max_tokens, **kwargs
    )


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_answer_is_valid_for_many_seeds(client, name):
    for seed in range(10):
        r = ask(client, name, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_the_same_request_unconstrained_is_not_json(client):
    texts = [ask(client, seed=seed, max_tokens=40).choices[0].message.content for seed in range(3)]
    for text in texts:
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_object_yields_objects(client):
    finished = []
    for seed in range(10):
        r = ask(client, seed=seed, response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            finished.append(json.loads(r.choices[0].message.content))
    assert finished, "no json_object answer finished within 300 tokens"
    assert all(isinstance(value, dict) for value in finished)


def test_streamed_constrained_text_is_the_same_valid_json(gateway, client, gateway_hold):
    whole = ask(client, "mixed", seed=4).choices[0].message.content
    # Held after the first token: the first piece reaches the client while the rest is still to
    # be made, however fast the machine (the number of pieces depends on its pace).
    gateway_hold.decoding()
    stream = iter(ask(client, "mixed", seed=4, stream=True))
    chunks = []
    while not (chunks and chunks[-1].choices and chunks[-1].choices[0].delta.content):
        chunks.append(next(stream))
    assert gateway_hold.held()  # the engine stands still: what the state says holds
    assert gateway.requests() == {"running": 1, "queued": 0}
    gateway_hold.release()
    chunks += list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 2
    assert "".join(pieces) == whole
    jsonschema.validate(json.loads(whole), MIXED)


def test_running_out_of_tokens_says_length(client):
    r = ask(client, "values", max_tokens=6)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)


def test_n_choices_are_each_valid(client):
    r = ask(client, "refs", seed=3, n=3)
    assert len(r.choices) == 3
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), REFS)


BAD_SCHEMAS = {
    "unknown type": ({"type": "foo"}, "not a valid JSON Schema"),
    "type not a string": ({"type": 5}, "not a valid JSON Schema"),
    "broken pattern": (
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a|b"}}},
        "not a valid JSON Schema",
    ),
    "lookbehind pattern (valid, not enforceable)": (
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}},
        "cannot enforce",
    ),
    "dangling $ref": (
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        "cannot enforce",
    ),
    "remote $ref": ({"$ref": "https://example.com/schema.json"}, "cannot enforce"),
    # llguidance cast these bounds to 64 bits: 200 with 9223372036854775807, finish_reason "stop"
    "integer bounds past 2^63": (
        {"type": "integer", "minimum": 1e20, "maximum": 1e21},
        "minimum 1e+20 at # is beyond ±2^63",
    ),
    # llguidance compiled these loops and allowed only end-of-turn: 200 with "", "stop"
    "$ref loop with no way out": (
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        "$ref cycle with no way out at #/$defs/a",
    ),
    "required property that loops": (
        {
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/node"}},
            "required": ["x"],
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"next": {"$ref": "#/$defs/node"}},
                    "required": ["next"],
                }
            },
        },
        "$ref cycle with no way out at #/$defs/node",
    ),
    # these made llguidance crash the process (a stack overflow; a 32-bit overflow)
    "both bounds at -2^63": (
        {"type": "integer", "minimum": -(2**63) - 1000, "maximum": -(2**63)},
        "maximum -9223372036854775808 at # is beyond ±2^63",
    ),
    "multipleOf 2^31": ({"type": "integer", "multipleOf": 2**31}, "multipleOf 2147483648"),
    # written rounded (18446744073709552000)
    "const integer past 64 bits": ({"const": 2**64 + 1}, "beyond 64 bits"),
}

# Schemas llguidance misread (it let through 0, -0, 2^53, or 9223372036854775807), which the
# gateway now gives it narrowed: every answer follows them.
MISREAD = {
    "exclusive 0 below 0.5": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5},
    "exclusive 0 above -0.5": {"type": "number", "minimum": -0.5, "exclusiveMaximum": 0},
    "integers past 2^53": {"type": "integer", "minimum": 2**53 + 1, "maximum": 2**53 + 3},
    "int64 range": {"type": "integer", "minimum": 2**62, "maximum": 2**63 - 1},
}


@pytest.mark.parametrize("name", list(BAD_SCHEMAS))
def test_invalid_or_unenforceable_schema_gets_400(gateway, name):
    schema, needle = BAD_SCHEMAS[name]
    body = {
        "model": LOCAL,
        "messages": ASK,
        "max_tokens": 20,
        "response_format": json_schema("bad", schema),
    }
    r = gateway.chat(body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_after_the_schemas_that_crashed_llguidance_the_gateway_still_serves(client):
    for seed in range(3):
        r = ask(client, "values", seed=seed)
        jsonschema.validate(json.loads(r.choices[0].message.content), VALUES)


@pytest.mark.parametrize("name", list(MISREAD))
def test_bounds_llguidance_misread_are_kept(client, name):
    schema = MISREAD[name]
    for seed in range(5):
        r = client.chat.completions.create(
            model=LOCAL,
            messages=ASK,
            temperature=1.0,
            seed=seed,
            max_tokens=40,
            response_format=json_schema(name, schema),
        )
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize(
    ("response_format", "needle"),
    [
        ({"type": "xml"}, "response_format.type 'xml' is not supported"),
        ({"type": "json_schema"}, "json_schema.schema must be a JSON Schema object"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
            "JSON Schema object",
        ),
    ],
)
def test_malformed_response_format_gets_400(gateway, response_format, needle):
    body = {"model": LOCAL, "messages": ASK, "max_tokens": 5, "response_format": response_format}
    r = gateway.chat(body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_constrained_and_free_requests_in_flight_together(client, aclient):
    free_alone = [ask(client, seed=s, max_tokens=30).choices[0].message.content for s in range(3)]

    async def together():
        free = [
            aclient.chat.completions.create(
                model=LOCAL, messages=ASK, temperature=1.0, seed=s, max_tokens=30
            )
            for s in range(3)
        ]
        constrained = [
            aclient.chat.completions.create(
                model=LOCAL,
                messages=ASK,
                temperature=1.0,
                seed=s,
                max_tokens=300,
                response_format=json_schema("values", VALUES),
            )
            for s in range(3)
        ]
        return await asyncio.gather(*free, *constrained)

    answers = asyncio.run(together())
    assert [a.choices[0].message.content for a in answers[:3]] == free_alone
    for answer in answers[3:]:
        jsonschema.validate(json.loads(answer.choices[0].message.content), VALUES)
