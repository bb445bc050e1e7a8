"""Z-Explorer's prompt language: ``__name__``, ``> instruction`` and ``: xN``."""

from __future__ import annotations

import pytest

from client import Template, TemplateError, parse_template
from client._template import substitute


def test_the_done_when_template():
    t = parse_template("a __mythical_creature__ in a forest > cinematic : x3")
    assert t == Template(
        text="a __mythical_creature__ in a forest > cinematic : x3",
        prompt="a __mythical_creature__ in a forest",
        instruction="cinematic",
        count=3,
    )
    assert t.enhance and t.variables == ["mythical_creature"]


@pytest.mark.parametrize(
    ("text", "prompt", "instruction", "count"),
    [
        ("a cat", "a cat", None, 1),
        ("a cat > ", "a cat", "", 1),
        ("a cat >", "a cat", "", 1),
        ("a cat >studio ghibli", "a cat", "studio ghibli", 1),
        ("a cat > style: noir", "a cat", "style: noir", 1),
        ("a cat > style: noir : x2", "a cat", "style: noir", 2),
        ("a cat : x10,w832,h1216", "a cat", None, 10),
        ("a cat: X2", "a cat", None, 2),
        ("a -> b", "a -> b", None, 1),
        ("time: 5pm", "time: 5pm", None, 1),
        ("a __animal__ > cinematic, 35mm : x3", "a __animal__", "cinematic, 35mm", 3),
    ],
)
def test_parse(text, prompt, instruction, count):
    t = parse_template(text)
    assert (t.prompt, t.instruction, t.count) == (prompt, instruction, count)


def test_image_options_are_kept():
    t = parse_template("a cat : x2, w832, h1216")
    assert (t.count, t.width, t.height) == (2, 832, 1216)


@pytest.mark.parametrize("text", ["> cinematic", "  ", "a cat : x0", "a cat : x101"])
def test_unusable_templates_say_why(text):
    with pytest.raises(TemplateError):
        parse_template(text)


def test_variables_folders_and_repeats():
    t = parse_template("__styles/light__ on __animal__ and __animal__, __a-b__ __x__")
    assert t.variables == ["styles/light", "animal", "a-b", "x"]
    assert parse_template("snake_case_word and __ alone__").variables == []


def test_substitute_picks_once_per_occurrence():
    picks = iter(["fox", "owl"])
    text, chosen = substitute("a __animal__ and a __animal__", lambda name: next(picks))
    assert text == "a fox and a owl"
    assert chosen == {"animal": "owl"}
