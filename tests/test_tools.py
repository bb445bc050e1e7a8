"""Tool calls read back from Qwen3's call layout, whatever pieces the text comes in."""

from __future__ import annotations

import json

import pytest

from custom_handlers.inference.jobs import coalesce
from custom_handlers.inference.tools import CallDelta, CallReader

CALLS = [
    ("weather", {"city": "Paris", "where": {"lat": 1.5, "tags": ["}", "\\n"]}}),
    ("now", {}),
]


def bodies():
    """The text between <tool_call> and </tool_call> for each call, as the grammar forces it."""
    for name, arguments in CALLS:
        compact = json.dumps(arguments, separators=(",", ":"))
        yield f'\n{{"name": "{name}", "arguments": {compact}}}\n'


def read(pieces_of):
    reader, deltas = CallReader(index=0), []
    for body in bodies():
        reader.open()
        for piece in pieces_of(body):
            deltas += reader.push(piece)
        deltas += reader.close()
    return reader, deltas


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_calls_are_read_whole_whatever_the_pieces(size):
    reader, deltas = read(lambda body: [body[i : i + size] for i in range(0, len(body), size)])
    assert reader.complete == 2
    assert [(c["name"], json.loads(c["arguments"])) for c in reader.calls] == CALLS
    # OpenAI's streaming shape: id and name first, then only argument pieces.
    for call, (name, arguments) in enumerate(CALLS):
        mine = [d for d in deltas if d.call == call]
        assert mine[0].id.startswith("call_") and mine[0].name == name
        assert all(d.id is None and d.name is None for d in mine[1:])
        assert json.loads("".join(d.arguments for d in mine)) == arguments
    assert reader.calls[0]["id"] != reader.calls[1]["id"]


def test_the_end_of_the_call_is_never_released_as_arguments():
    reader = CallReader(index=0)
    reader.open()
    released = ""
    for piece in ['\n{"name": "now", "arguments": ', "{}", "}", "\n"]:
        released += "".join(d.arguments for d in reader.push(piece))
    assert released == "{}"  # "}" and "}\n" held back: they could close the call
    assert reader.close() == []
    assert reader.calls[0]["arguments"] == "{}"


def test_a_call_cut_short_is_not_complete():
    reader = CallReader(index=0)
    reader.open()
    reader.push('\n{"name": "weather", "arguments": {"ci')
    assert (reader.complete, reader.calls[0]["name"]) == (0, "weather")


def test_pieces_of_one_call_coalesce_into_one_delta():
    deltas = [
        CallDelta(0, 0, "", "call_1", "weather"),
        CallDelta(0, 0, '{"ci'),
        CallDelta(0, 0, 'ty":1}'),
        CallDelta(0, 1, "", "call_2", "now"),
        CallDelta(0, 1, "{}"),
    ]
    assert coalesce(deltas) == [
        CallDelta(0, 0, '{"city":1}', "call_1", "weather"),
        CallDelta(0, 1, "{}", "call_2", "now"),
    ]
