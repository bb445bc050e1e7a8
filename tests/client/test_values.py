"""Reading a model's answer: one clean prompt, or distinct values from JSON or from lines."""

from __future__ import annotations

import json

import pytest

from client._prompts import (
    VALUE_PATTERN,
    value_length_limit,
    values_budget,
    values_request,
    values_schema,
)
from client._values import clean_prompt, clean_value, extract_values, not_a_value


@pytest.mark.parametrize(
    "answer",
    [
        "A fox in a misty forest, soft light",
        '"A fox in a misty forest, soft light"',
        "Enhanced prompt: A fox in a misty forest, soft light",
        "**Prompt:** A fox in a misty forest, soft light",
        "Here is your enhanced prompt:\n\nA fox in a misty forest, soft light",
        "<think>The user wants a fox.\nOk.</think>\n\nA fox in a misty forest, soft light",
        "```\nA fox in a misty forest, soft light\n```",
        "  A fox in a misty forest,\n soft light  ",
    ],
)
def test_clean_prompt_keeps_only_the_prompt(answer):
    assert clean_prompt(answer) == "A fox in a misty forest, soft light"


def test_clean_prompt_keeps_inner_quotes_and_an_unfinished_think_is_nothing():
    assert clean_prompt("'Hello' written on a sign, 'Bye' below") == (
        "'Hello' written on a sign, 'Bye' below"
    )
    assert clean_prompt("<think>still thinking about foxes") == ""


def test_clean_prompt_drops_repeated_clauses_and_an_answer_cut_mid_clause():
    # SmolLM2-135M-Instruct's enhance answer at temperature 0.7 (seed 1), cut at 320 tokens
    looped = (
        "A lighthouse at dusk, a beacon of light in the darkness, a lone figure, a lighthouse, "
        "a beacon, " + "a lighthouse, " * 40 + "a light"
    )
    assert clean_prompt(looped, cut=True) == (
        "A lighthouse at dusk, a beacon of light in the darkness, a lone figure, a lighthouse, "
        "a beacon"
    )
    assert clean_prompt("very tall, very big, Very tall, very tall.") == "very tall, very big"
    # Only a cut answer loses its last clause; one that ends on its own keeps it whole.
    assert clean_prompt("A fox, soft light, 35mm fil", cut=True) == "A fox, soft light"
    assert clean_prompt("A fox. Soft light on the fur", cut=True) == "A fox."
    assert clean_prompt("A fox, soft light, 35mm film") == "A fox, soft light, 35mm film"
    assert clean_prompt("A fox in the snow", cut=True) == "A fox in the snow"  # nothing to cut at


@pytest.mark.parametrize(
    "answer",
    [
        '{"values": ["Siamese", "Persian", "Maine Coon"]}',
        '["Siamese", "Persian", "Maine Coon"]',
        'Sure! Here they are: ["Siamese", "Persian", "Maine Coon"] Enjoy.',
        '```json\n{"values": ["Siamese", "Persian", "Maine Coon"]}\n```',
        '<think>cats</think>{"breeds": ["Siamese", "Persian", "Maine Coon"]}',
        '{"values": ["Siamese", "Persian", "Maine Coon", "Beng',  # cut by max_tokens
        "Here are 3 cat breeds:\n1. Siamese\n2. Persian\n3. Maine Coon",
        "- Siamese\n- Persian\n- Maine Coon\n",
        '"Siamese",\n"Persian",\n"Maine Coon"',
        "Siamese\n\nPersian\nsiamese\nMaine Coon",  # repeats dropped, whatever the case
    ],
)
def test_extract_values_from_json_or_lines(answer):
    assert extract_values(answer) == ["Siamese", "Persian", "Maine Coon"]


def test_values_are_one_line_and_never_a_description_line():
    assert clean_value("a fox\nin the snow") == "a fox in the snow"
    assert clean_value("# not a comment") == "not a comment"
    assert clean_value("  3) Maine Coon, ") == "Maine Coon"
    assert extract_values('{"values": ["", "  ", "ok"]}') == ["ok"]


def test_value_length_follows_the_name():
    assert value_length_limit("cat_breed") == 80
    assert value_length_limit("50_word_scene_description") >= 50 * 8
    assert value_length_limit("detailed_scene") == 400
    assert value_length_limit("100words") >= 100 * 8


def test_the_schema_bounds_the_answer_within_the_budget():
    count, chars = 5, value_length_limit("cat_breed")
    fmt = values_schema(count, chars)
    assert fmt["type"] == "json_schema"
    schema = fmt["json_schema"]["schema"]
    array = schema["properties"]["values"]
    assert (array["minItems"], array["maxItems"]) == (count, count)
    assert array["items"] == {
        "type": "string",
        "minLength": 1,
        "maxLength": chars,
        "pattern": VALUE_PATTERN,
    }
    # The longest answer the schema allows (compact JSON, no escapes possible) fits the budget.
    longest = json.dumps({"values": ["x" * chars] * count}, separators=(",", ":"))
    assert len(longest) <= values_budget(count, chars)


def test_the_value_pattern_refuses_what_would_need_an_escape():
    import re

    pattern = re.compile(VALUE_PATTERN)
    assert pattern.match("a phoenix, wings of ember")
    for bad in ('say "hi"', "back\\slash", "two\nlines", "tab\there", ""):
        assert not pattern.match(bad), bad


def test_values_request_names_the_variable_and_what_to_avoid():
    request = values_request("cat_breed", "a __cat_breed__ on a sofa", 3, ["Siamese"])
    user = request.messages[-1]["content"]
    assert "__cat_breed__" in user and '"cat breed"' in user
    assert "a __cat_breed__ on a sofa" in user
    assert "Number of values: 3" in user
    assert "Siamese" in user
    assert request.max_tokens == values_budget(3, 80)


def test_punctuation_and_the_variables_own_name_are_not_values():
    # SmolLM2-135M-Instruct's answers for __lighting__ and __cat_breed__ (temperature 0.9)
    for junk in ("...", "—", "_lighting__", "Lighting", "__lighting__", "lighting"):
        assert not_a_value(junk, "lighting")
    assert not_a_value("cat_breed", "cat_breed") and not_a_value("Cat Breed", "cat_breed")
    assert not_a_value("light", "styles/light")  # a folder's variable: its own name too
    for value in ("Siamese", "soft window light", "cat breed show", "1", "Lighting 1"):
        assert not not_a_value(value, "lighting" if "Light" in value else "cat_breed")
