"""Every text the client sends to a model, and the budgets that go with it.

The same messages go to every model, local or cloud: a model is only a name. Change the wording
here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ENHANCE_SYSTEM = """\
You write prompts for text-to-image models.
Turn the user's idea into one rich, concrete image prompt: the subject and what it is doing, the \
setting, the composition and camera, the lighting, the colours, the mood, and a medium or style.
Keep every fact of the idea exactly as given: how many of each thing, ages, genders, names, named \
places and things, text to be shown, colours and styles. Add detail around them; never drop, \
change or contradict one.
If an instruction is given, follow it: it decides the style and mood, but it never overrides a \
fact of the idea.
Answer with the prompt only: one paragraph of plain text, 40 to 120 words. No title, no preamble, \
no quotation marks, no lists, no notes."""

# One worked example: small models copy the shape of an answer better than they follow rules.
ENHANCE_EXAMPLE_USER = (
    "Idea: two old men playing chess in a park\nInstruction: black and white photo"
)
ENHANCE_EXAMPLE_ANSWER = (
    "A black and white photograph of two old men playing chess at a weathered stone table in a "
    "city park, one leaning forward with his chin on his fist, the other reaching for a knight, "
    "bare plane trees and a wrought-iron bench behind them, soft overcast light, deep shadows in "
    "the creases of their coats, shallow depth of field, 50mm lens, grainy film texture, quiet "
    "and contemplative mood"
)

VALUES_SYSTEM = """\
You write the values of a variable in an image-prompt template. The variable's name is your \
instruction: it says what each value is and how long it is. Read underscores as spaces and \
numbers literally: "cat_breed" means one cat breed per value; "50_word_scene_description" means \
a scene described in about 50 words per value.
Each value must read well where the variable stands in the template, be clearly different from \
the others, and be plain text on one line: no numbering, no quotation marks, no explanation.
Answer with JSON only, in the form {"values": ["...", "..."]}, with exactly the number of values \
asked for."""

VALUES_USER = """\
Variable: __{name}__ (read: "{readable}")
Template it fills: {context}
Number of values: {count}"""

VALUES_AVOID = "\nAlready written (do not repeat any of these): {existing}"

# Budgets. Values are bounded in length so that a model constrained by the JSON schema can always
# finish inside max_tokens: a compact JSON string of n characters takes at most about n tokens.
# The answer asked for is 40-120 words: about 150 tokens at most (the worked example's 68 words
# are 85 tokens with SmolLM2's tokenizer), a third more for room. A looping model stops here.
ENHANCE_MAX_TOKENS = 200
ENHANCE_TEMPERATURE = 0.7
# Against endless repetition ("a soft and gentle light, a gentle breeze, ..." to the token cap):
# Qwen3's model card recommends presence_penalty between 0 and 2 for this. An OpenAI parameter,
# honoured by the local model, OpenAI and most providers; a model that refuses it (LiteLLM's
# Anthropic and Ollama providers) is asked again without it (client/_llm.py). Not for the values:
# their JSON's quotes and commas repeat by design, and a penalty on the closing quote lengthens
# every value.
ENHANCE_PRESENCE_PENALTY = 1.0
VALUES_TEMPERATURE = 0.9
SHORT_VALUE_CHARS = 80  # names of things: breeds, colours, creatures
LONG_VALUE_CHARS = 400  # descriptions, scenes, sentences
MAX_OUTPUT_TOKENS = 16_384  # the largest output most providers accept (gpt-4o-mini's limit)
# One line without quotes or backslashes: nothing in a value needs a JSON escape.
VALUE_PATTERN = '^[^"\\\\\\u0000-\\u001f]+$'
_LONG_WORDS = ("description", "scene", "sentence", "paragraph", "detailed", "story", "prompt")
_WORD_COUNT = re.compile(r"(\d+)_?words?\b")


@dataclass(frozen=True)
class ChatRequest:
    """What to send: messages and sampling. The transport adds the model."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    response_format: dict[str, Any] | None = field(default=None)
    presence_penalty: float | None = None  # None: not sent


def text_request(prompt: str, max_tokens: int, temperature: float) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": prompt}], max_tokens, temperature)


def enhance_request(prompt: str, instruction: str = "") -> ChatRequest:
    user = f"Idea: {prompt.strip()}"
    if instruction.strip():
        user += f"\nInstruction: {instruction.strip()}"
    messages = [
        {"role": "system", "content": ENHANCE_SYSTEM},
        {"role": "user", "content": ENHANCE_EXAMPLE_USER},
        {"role": "assistant", "content": ENHANCE_EXAMPLE_ANSWER},
        {"role": "user", "content": user},
    ]
    return ChatRequest(
        messages,
        ENHANCE_MAX_TOKENS,
        ENHANCE_TEMPERATURE,
        presence_penalty=ENHANCE_PRESENCE_PENALTY,
    )


def value_length_limit(name: str) -> int:
    """The longest value (in characters) a variable's name calls for."""
    lowered = name.lower()
    words = _WORD_COUNT.search(lowered)
    if words:
        return max(SHORT_VALUE_CHARS, int(words.group(1)) * 9 + 40)
    if any(word in lowered for word in _LONG_WORDS):
        return LONG_VALUE_CHARS
    return SHORT_VALUE_CHARS


def values_schema(count: int, max_chars: int) -> dict[str, Any]:
    """``{"values": [count strings]}``, each one line of 1 to ``max_chars`` characters.

    The pattern keeps quotes, backslashes and control characters (newlines) out of the values, so
    none needs a JSON escape: the compact answer is at most ``count * (max_chars + 3) + 13``
    characters, and a model constrained by the schema always finishes within the budget
    ``values_request`` sets. ``strict`` is false because strict-mode providers refuse
    ``maxLength``; the local model enforces the schema either way.
    """
    item = {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": VALUE_PATTERN}
    array = {"type": "array", "items": item, "minItems": count, "maxItems": count}
    schema = {
        "type": "object",
        "properties": {"values": array},
        "required": ["values"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "variable_values", "schema": schema, "strict": False},
    }


def values_budget(count: int, max_chars: int) -> int:
    """max_tokens for ``count`` values: the longest answer the schema allows, in characters."""
    return min(MAX_OUTPUT_TOKENS, count * (max_chars + 3) + 32)


def values_request(
    name: str, context: str, count: int, existing: list[str] | None = None
) -> ChatRequest:
    max_chars = value_length_limit(name)
    user = VALUES_USER.format(
        name=name,
        readable=name.replace("/", " ").replace("_", " ").replace("-", " ").strip(),
        context=context.strip() or "(none given)",
        count=count,
    )
    if existing:
        user += VALUES_AVOID.format(existing="; ".join(existing))
    budget = values_budget(count, max_chars)
    messages = [{"role": "system", "content": VALUES_SYSTEM}, {"role": "user", "content": user}]
    return ChatRequest(
        messages, budget, VALUES_TEMPERATURE, response_format=values_schema(count, max_chars)
    )
