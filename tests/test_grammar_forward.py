"""Grammar fast-forward (issue 24): a constrained row decoding alone checks the tokens its grammar
forces as a draft, in one pass. Greedy constrained answers (a JSON schema, a named tool call) must
stay token for token what they are without drafts, and valid; the drafts must really be checked
and kept (the engine's counts); and a pass that masked every position with the row's current
mask, not the mask after the draft's tokens before it, must be caught by the comparison."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from tests.test_speculation import _handler
from tests.test_tool_calls import eager_caller_dir  # noqa: F401 (a fixture)

VALUES = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 3,
            "maxItems": 3,
        },
        "style": {"enum": ["photographic", "watercolor", "ink drawing"]},
    },
    "required": ["values", "style"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "weather_forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "count", "parameters": {"type": "object"}}},
]
ASK = [{"role": "user", "content": "three values and the weather in Lisbon"}]
SCHEMA_BODY = {
    "max_tokens": 120,
    "temperature": 0,
    "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": VALUES}},
}
NAMED_BODY = {
    "max_tokens": 120,
    "temperature": 0,
    "tools": TOOLS,
    "tool_choice": {"type": "function", "function": {"name": "weather_forecast"}},
}


def _reply(local, body: dict) -> tuple:
    """What the caller sees, in full: text, calls (name and arguments), finish reason, tokens."""
    response = asyncio.run(local.acompletion("x", ASK, optional_params=dict(body)))
    choice = response.choices[0]
    calls = tuple(
        (call.function.name, call.function.arguments) for call in choice.message.tool_calls or ()
    )
    return choice.message.content, calls, choice.finish_reason, response.usage.completion_tokens


def _valid(reply: tuple) -> None:
    content, calls, reason, _ = reply
    if calls:
        assert reason in ("tool_calls", "length")  # "required" may call again, in parallel
        for name, arguments in calls:
            assert name == "weather_forecast"
            jsonschema.validate(json.loads(arguments), WEATHER)
    else:
        assert reason == "stop"
        jsonschema.validate(json.loads(content), VALUES)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return _handler(tiny_model_dir, draft_tokens=0)


@pytest.fixture(scope="module")
def drafting(tiny_model_dir):
    return _handler(tiny_model_dir, draft_tokens=7)


BODIES = {
    "json schema": SCHEMA_BODY,
    "json schema, presence penalty": {**SCHEMA_BODY, "presence_penalty": 1.5},
    "json schema, tool_choice none": {**SCHEMA_BODY, "tools": TOOLS, "tool_choice": "none"},
    "named tool call": NAMED_BODY,
    "required tool call": {**NAMED_BODY, "tool_choice": "required"},
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_greedy_constrained_answers_are_the_same_with_forced_tokens_checked(plain, drafting, body):
    expected = _reply(plain, body)
    engine = drafting.engine
    before = engine.forced_drafted, engine.forced_accepted
    got = _reply(drafting, body)
    assert got == expected
    _valid(got)
    checked, kept = engine.forced_drafted - before[0], engine.forced_accepted - before[1]
    assert checked > 0 and kept > 0  # forced tokens were drafted, checked and kept
    assert kept <= checked
    assert plain.engine.forced_drafted == 0  # drafts off: none


def test_forced_tokens_are_kept_in_runs(drafting):
    # The named call's layout and key names are forced: several tokens kept in one pass, so the
    # answer takes fewer passes than tokens (each pass writes the kept tokens and one more).
    engine = drafting.engine
    before = engine.forced_accepted
    _, _, _, tokens = _reply(drafting, NAMED_BODY)
    assert engine.forced_accepted - before >= 5
    assert tokens > engine.forced_accepted - before


def test_a_mask_not_moved_along_the_draft_is_caught(plain, tiny_model_dir, monkeypatch):
    # Mutation: every position of the pass masked as the row's next token (the draft's tokens
    # not consumed). The forced tokens are then checked against the wrong masks: the answers
    # differ from those decoded token by token (or are cut short), and the check above fails.
    import llguidance.numpy
    import torch

    from custom_handlers.inference import constraints, outputs
    from custom_handlers.inference.errors import LocalLLMError

    def stale_mask(logits, matcher, draft):
        bitmask = llguidance.numpy.allocate_token_bitmask(len(draft) + 1, matcher.vocab_size)
        for j in range(len(draft) + 1):
            matcher.fill(bitmask, j)
        constraints._apply_bitmask(logits, torch.from_numpy(bitmask))

    monkeypatch.setattr(outputs, "mask_along", stale_mask)
    broken = _handler(tiny_model_dir, draft_tokens=7)

    def reply_or_error(body: dict):
        try:
            return _reply(broken, body)
        except LocalLLMError as exc:  # the grammar refused a token the stale mask let through
            return exc

    differ = [reply_or_error(body) != _reply(plain, body) for body in BODIES.values()]
    assert sum(differ) >= 2


def test_logprobs_rows_still_decode_one_token_a_step(drafting):
    engine = drafting.engine
    before = engine.drafted
    _reply(drafting, {**SCHEMA_BODY, "logprobs": True})
    assert engine.drafted == before


def test_a_call_the_model_opens_itself_is_the_same_with_forced_tokens_checked(
    eager_caller_dir,  # noqa: F811 (the fixture imported above)
):
    # tool_choice "auto": the row writes text (no drafts) until it samples <tool_call>; the call's
    # grammar starts there, and its forced tokens are drafted from then on.
    plain_caller = _handler(eager_caller_dir, draft_tokens=0)
    drafting_caller = _handler(eager_caller_dir, draft_tokens=7)
    body = {"max_tokens": 100, "temperature": 0, "tools": TOOLS}
    calls = 0
    for content in ("weather?", "count them", "what now", "hello", "forecast for Porto"):
        ask = [{"role": "user", "content": content}]
        replies = [
            asyncio.run(local.acompletion("x", ask, optional_params=dict(body)))
            for local in (plain_caller, drafting_caller)
        ]
        seen = [
            (
                r.choices[0].message.content,
                [
                    (c.function.name, c.function.arguments)
                    for c in r.choices[0].message.tool_calls or ()
                ],
                r.choices[0].finish_reason,
            )
            for r in replies
        ]
        assert seen[0] == seen[1]
        calls += bool(seen[0][1])
    assert calls > 0  # the eager caller opens calls under greedy decoding too
    assert drafting_caller.engine.forced_accepted > 0


def test_sampled_constrained_answers_without_a_seed_draft_and_stay_valid(drafting):
    # A sampled row checks forced tokens with the rejection rule on its masked distribution (a
    # forced token has all of it: always kept); whatever is drawn, the answer follows the schema.
    engine = drafting.engine
    before = engine.forced_accepted
    for body in (SCHEMA_BODY, NAMED_BODY):
        for _ in range(3):
            _valid(_reply(drafting, {**body, "temperature": 1.0}))
    assert engine.forced_accepted > before


EXAMPLE = '{"style":"watercolor","values":["a red fox","a red fox","a red fox"]}'  # as written
COPYING = [{"role": "user", "content": f"Answer like this: {EXAMPLE}. Again: {EXAMPLE}"}]


def test_where_its_grammar_forces_nothing_a_constrained_row_drafts_from_its_prompt(
    plain, tiny_model_dir
):
    # After the forced '{"values": ["' the grammar allows any string: the prompt's '["' was
    # followed by 'a red fox", "a red fox', a draft the grammar allows as far as it goes.
    local = _handler(tiny_model_dir, draft_tokens=7)
    drafts, real = [], local.engine._packed_step

    def packed_step(loaded, plan):
        drafts.extend((share.forced, len(share.draft)) for share in plan if share.draft)
        real(loaded, plan)

    local.engine._packed_step = packed_step

    def reply(handler) -> tuple:
        body = dict(SCHEMA_BODY)
        response = asyncio.run(handler.acompletion("x", COPYING, optional_params=body))
        return response.choices[0].message.content, response.usage.completion_tokens

    expected = reply(plain)
    assert reply(local) == expected  # token for token, greedy
    _valid((expected[0], (), "stop", expected[1]))
    assert any(not forced and n >= 4 for forced, n in drafts)  # from the prompt, in the JSON
    assert any(forced for forced, _ in drafts)  # and the grammar's forced tokens
    engine = local.engine
    assert engine.drafted - engine.forced_drafted > 0  # counted apart from the forced ones
