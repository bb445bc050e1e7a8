"""Property: a JSON schema is refused with a 400, or every answer under it follows it.

Thousands of generated schemas (types and unions, enum/const, bounds huge, tiny and fractional,
multipleOf, string lengths and patterns, items/prefixItems, properties/required/
additionalProperties, min/max counts, anyOf/oneOf/allOf, $defs/$ref with loops that can be left
and loops that cannot) go through the real code: ``parse_chat_request`` (``checked_schema``), then
``JsonConstraints`` compilation, then a walk that asks the real ``JsonMatcher`` for its mask at
each step and takes one allowed token, as the engine does with a random model: end-of-turn ends
the answer (``finish_reason: stop``), the step limit cuts it (``length``). A finished answer must
parse as JSON and validate against the schema the caller sent; a cut one is not judged.

The walk prefers short tokens and end-of-turn half the time (a model that likes punctuation):
every token is still one the mask allowed, and most answers then finish within the limit. A
matcher that gave up (then only end-of-turn is allowed) fails the test: the engine would answer
that as a finished 200. Huge minItems, and patterns with a huge minLength, are left out of the
generator: llguidance can run out of its per-token budget on them mid-answer, which no check of
the schema foresees (``test_llguidances_step_limits_...`` keeps that case, expected to fail until
the engine refuses such an answer). jsonschema cannot judge a few loops that never leave their
level (anyOf [itself, integer]): it recurses; those are counted apart.

Numbers are judged as JSON Schema defines them, exactly (``Decimal``, ``Fraction``), not through
Python's floats, whose rounding ``jsonschema`` inherits: 0.7 fails multipleOf 0.1 there.

A smaller set of schemas goes through the real in-process engine (``LocalLLM``, the tiny model).
"""

from __future__ import annotations

import asyncio
import decimal
import json
import random
import time
from collections import Counter
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custom_handlers.inference.constraints import JsonConstraints
from custom_handlers.inference.errors import InvalidRequestError, LocalLLMError
from custom_handlers.inference.request import parse_chat_request

STEPS = 64  # the walk's max_tokens
WALKED_SCHEMAS = 2000
ENGINE_SCHEMAS = 120
DEFS = ("d0", "d1", "d2")
PROPERTY = settings(
    deadline=None,
    derandomize=True,  # the same schemas on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- the schemas --------------------------------------------------------------------------------

HUGE_OR_TINY = [
    2**53,
    2**53 + 1,
    -(2**53) - 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    10**20,
    1e20,
    -1e21,
    1e300,
    1e-300,
    5e-324,
    1e-20,
    9.5e18,
    0.30000000000000004,
    1e-7,
]
BOUNDS = st.one_of(
    st.integers(-20, 20),
    st.sampled_from([0, 0.5, -0.5, 1.25, -2.75, 0.1, 0.3, 1e-5, -1e-5, 2.5, 100]),
    st.integers(-100_000, 100_000).map(lambda n: n / 1000),
    st.sampled_from(HUGE_OR_TINY),
)
MULTIPLES = st.one_of(
    st.integers(1, 12),
    st.sampled_from(
        [0.5, 0.1, 0.25, 0.01, 1e-3, 1e-10, 3.3, 0.07, 1.1, 86400, 65536, 2**31, 2**32 + 1]
    ),
    st.sampled_from([997, 1000, 0.997, 0.125, 7.5, 3600, 1e20, 1e-300, 123456.789, 99991, 9999]),
)
LENGTHS = st.one_of(st.integers(0, 6), st.sampled_from([10**6, 2**32 - 1, 2**32, 2**40]))
PATTERNS = st.sampled_from(
    ["^[a-c]{1,3}$", "^x[0-9]+$", "^(ab|cd)*$", "b", "^[A-Z][a-z]*$", "^\\d{2}-\\d{2}$", "^$"]
)
NAMES = st.sampled_from(["a", "b", "c", "id", "x y", "ключ", "n~/"])
TYPES = ["null", "boolean", "integer", "number", "string", "array", "object"]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.sampled_from([0.5, -1.25, "a", "", "ключ", 2**64 + 1, 0.30000000000000004])
    | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2)
    ),
    max_leaves=4,
)


@st.composite
def pair(draw, values):
    """Zero to two values, in order (a lower and an upper bound)."""
    found = sorted(draw(st.lists(values, max_size=2)), key=lambda v: Fraction(Decimal(repr(v))))
    lower = found[0] if found and draw(st.booleans()) else None
    upper = found[-1] if found and (len(found) == 2 or lower is None) else None
    return lower, upper


@st.composite
def numeric(draw, kind=None):
    schema = {} if kind is None else {"type": kind}
    lower, upper = draw(pair(BOUNDS))
    if lower is not None:
        schema["exclusiveMinimum" if draw(st.integers(0, 3)) == 0 else "minimum"] = lower
    if upper is not None:
        schema["exclusiveMaximum" if draw(st.integers(0, 3)) == 0 else "maximum"] = upper
    if draw(st.integers(0, 4)) == 0:
        schema["multipleOf"] = draw(MULTIPLES)
    return schema


@st.composite
def string(draw):
    schema = {"type": "string"}
    low, high = draw(pair(LENGTHS))
    if low is not None:
        schema["minLength"] = low
    if high is not None:
        schema["maxLength"] = high
    if draw(st.integers(0, 3)) == 0 and (low or 0) <= 6:  # (as minItems below)
        schema["pattern"] = draw(PATTERNS)
    return schema


def leaves(refs: bool):
    options = [
        st.builds(lambda: {"type": "null"}),
        st.builds(lambda: {"type": "boolean"}),
        st.builds(dict),
        st.booleans(),
        numeric("integer"),
        numeric("number"),
        numeric(),
        string(),
        st.builds(lambda v: {"const": v}, JSON_VALUES),
        st.builds(lambda vs: {"enum": vs}, st.lists(JSON_VALUES, min_size=1, max_size=3)),
        st.builds(
            lambda ts: {"type": ts},
            st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True),
        ),
    ]
    if refs:
        options.append(st.sampled_from(DEFS).map(lambda d: {"$ref": f"#/$defs/{d}"}))
    return st.one_of(options)


@st.composite
def an_object(draw, children):
    properties = draw(st.dictionaries(NAMES, children, max_size=3))
    schema = {"type": "object", "properties": properties}
    names = list(properties)
    if names or draw(st.booleans()):
        required = draw(st.lists(st.sampled_from([*names, "extra"]), max_size=3, unique=True))
        if required:
            schema["required"] = required
    extra = draw(st.integers(0, 5))
    if extra == 0:
        schema["additionalProperties"] = False
    elif extra == 1:
        schema["additionalProperties"] = draw(children)
    elif extra == 2:
        schema["additionalProperties"] = True
    if draw(st.integers(0, 5)) == 0:
        schema["patternProperties"] = {"^p": draw(children)}
    low, high = draw(pair(st.integers(0, 3)))
    if low is not None and draw(st.integers(0, 2)) == 0:
        schema["minProperties"] = low
    if high is not None and draw(st.integers(0, 2)) == 0:
        schema["maxProperties"] = high
    return schema


@st.composite
def an_array(draw, children):
    schema: dict = {"type": "array"}
    if draw(st.booleans()):
        schema["items"] = draw(children)
    if draw(st.integers(0, 3)) == 0:
        schema["prefixItems"] = draw(st.lists(children, min_size=1, max_size=2))
    low, high = draw(pair(st.one_of(st.integers(0, 4), st.sampled_from([10**6, 2**40]))))
    if low is not None and low <= 4:  # huge ones: test_llguidances_step_limits_never_give_...
        schema["minItems"] = low
    if high is not None:
        schema["maxItems"] = high
    return schema


def trees(refs: bool):
    def extend(children):
        return st.one_of(
            an_object(children),
            an_array(children),
            st.builds(lambda cs: {"anyOf": cs}, st.lists(children, min_size=1, max_size=3)),
            st.builds(lambda cs: {"oneOf": cs}, st.lists(children, min_size=1, max_size=3)),
            st.builds(lambda cs: {"allOf": cs}, st.lists(children, min_size=1, max_size=3)),
            st.builds(lambda n, c: {**n, "allOf": [c]}, numeric(), children),
        )

    return st.recursive(leaves(refs), extend, max_leaves=8)


TREES = trees(refs=False)
TREES_WITH_REFS = trees(refs=True)


# Loops by hand, so each kind comes up often: some with a way out, some without.
LOOPS = [
    {"$ref": "#/$defs/d1"},
    {"type": "object", "properties": {"n": {"$ref": "#/$defs/d0"}}, "required": ["n"]},
    {"type": "object", "properties": {"n": {"$ref": "#/$defs/d0"}}},
    {"type": "array", "items": {"$ref": "#/$defs/d0"}, "minItems": 1},
    {"type": "array", "items": {"$ref": "#/$defs/d0"}},
    {"anyOf": [{"$ref": "#/$defs/d1"}, {"type": "null"}]},
    {"anyOf": [{"$ref": "#/$defs/d0"}, {"type": "integer"}]},
    {"allOf": [{"$ref": "#/$defs/d1"}]},
]


DEFINITIONS = TREES_WITH_REFS | st.sampled_from(LOOPS)


@st.composite
def schemas(draw):
    if draw(st.integers(0, 2)) == 0:
        return draw(TREES)
    defs = {name: draw(DEFINITIONS) for name in DEFS}
    root = draw(TREES_WITH_REFS)
    if isinstance(root, dict) and "$ref" not in root and draw(st.booleans()):
        return {**root, "$defs": defs}
    return {"$defs": defs, "allOf": [root]}


# ---- judging an answer --------------------------------------------------------------------------


class Far(Decimal):
    """A number whose exponent not even ``decimal`` holds (1e123456789012345678901): its digits
    at the farthest exponent it holds, which orders it right against any bound, and the rest of
    the exponent in ``beyond``, for multipleOf."""

    beyond = 0


_WIDE = decimal.Context(Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


def _number(text: str) -> Decimal:
    """A JSON number with a point or exponent, exactly."""
    try:
        with decimal.localcontext(_WIDE):
            return Decimal(text)
    except decimal.InvalidOperation:
        mantissa, _, exponent = text.lower().partition("e")
        limit = decimal.MAX_EMAX // 2 if int(exponent) > 0 else decimal.MIN_EMIN // 2
        with decimal.localcontext(_WIDE):
            far = Far(f"{mantissa}e{limit}")
        far.beyond = int(exponent) - limit
        return far


def _multiple(x, step) -> bool:
    """``x`` is a whole multiple of ``step``, exactly (``x`` may have a huge exponent)."""
    _, digits, exponent = Decimal(x).as_tuple()
    exponent += getattr(x, "beyond", 0)
    n = int("".join(map(str, digits)) or "0")
    if n == 0:
        return True
    a, b = Fraction(Decimal(step)).as_integer_ratio()  # step = a / b
    if exponent >= 0:  # x / step = n 10^e b / a
        return n * pow(10, exponent, a) * b % a == 0
    if -exponent > len(str(n * b)):  # a 10^-e > n b: a fraction of one step
        return False
    return n * b % (a * 10**-exponent) == 0


def _multiple_of(validator, step, instance, schema):
    if validator.is_type(instance, "number") and not _multiple(instance, step):
        yield jsonschema.ValidationError(f"{instance} is not a multiple of {step}")


ExactValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"multipleOf": _multiple_of}
)


def violations(text: str, schema) -> list[str] | None:
    """What ``text`` breaks of ``schema`` (numbers as written); None if jsonschema cannot tell
    (a loop that never leaves the schema's own level, such as anyOf [itself, integer])."""
    value = json.loads(text, parse_float=_number)
    exact = json.loads(json.dumps(schema), parse_float=Decimal)
    try:
        return [e.message for e in ExactValidator(exact).iter_errors(value)]
    except RecursionError:
        return None


# ---- the walk -----------------------------------------------------------------------------------


class Walk:
    """The real matcher, token by token, on the tiny model's tokenizer."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer, GenerationConfig

        from custom_handlers.inference.loader import _eos_ids

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.constraints = JsonConstraints(tokenizer)
        config = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model_dir))
        self.eos = _eos_ids(config, tokenizer)  # what ends a row in the engine
        llg = self.constraints.llg_tokenizer()
        self.vocab = llg.vocab_size
        self.bytes = [llg.decode_bytes([t]) for t in range(self.vocab)]
        self.short = np.array([len(b) == 1 or t in self.eos for t, b in enumerate(self.bytes)])

    def grammar(self, schema, strict: bool) -> str:
        """What the gateway compiles for the schema; InvalidRequestError for a 400."""
        spec = {"name": "x", "schema": schema, "strict": strict}
        params = {"response_format": {"type": "json_schema", "json_schema": spec}}
        request = parse_chat_request([{"role": "user", "content": "a fox"}], params)
        return self.constraints.grammar(request.json_schema)

    def answer(self, grammar: str, rng: random.Random) -> tuple[str, str]:
        import llguidance.numpy

        matcher = self.constraints.matcher(grammar)
        bitmask = llguidance.numpy.allocate_token_bitmask(1, matcher.vocab_size)
        out = bytearray()
        for _ in range(STEPS):
            matcher.fill(bitmask, 0)
            allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: self.vocab]
            choices = np.flatnonzero(allowed)
            assert len(choices), "the mask allowed no token"
            preferred = np.flatnonzero(allowed & self.short)
            if len(preferred) and rng.random() < 0.5:
                choices = preferred
            token = int(choices[rng.randrange(len(choices))])
            matcher.consume(token)
            if token in self.eos:
                assert matcher.error is None, f"the matcher gave up after {out!r}: {matcher.error}"
                return out.decode("utf-8"), "stop"
            out += self.bytes[token]
        return out.decode("utf-8", errors="replace"), "length"


@pytest.fixture(scope="module")
def walk(tiny_model_dir):
    return Walk(tiny_model_dir)


def _judge(schema, text: str, finish: str, outcomes: Counter) -> None:
    if finish == "length":
        outcomes["cut by the step limit"] += 1
        return
    problems = violations(text, schema)
    if problems is None:
        outcomes["finished, not judged (jsonschema recursed)"] += 1
        return
    assert not problems, (json.dumps(schema), text, problems)
    outcomes["finished and valid"] += 1


def test_every_schema_is_refused_or_kept_on_random_walks(walk):
    outcomes: Counter = Counter()
    started = time.perf_counter()

    @settings(PROPERTY, max_examples=WALKED_SCHEMAS)
    @given(schema=schemas(), strict=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def walked(schema, strict, seed):
        try:
            grammar = walk.grammar(schema, strict)
        except InvalidRequestError as exc:
            assert exc.status_code == 400 and exc.param == "response_format", exc
            outcomes["refused (400)"] += 1
            return
        text, finish = walk.answer(grammar, random.Random(seed))
        _judge(schema, text, finish, outcomes)

    walked()
    print(
        f"\n{sum(outcomes.values())} schemas in {time.perf_counter() - started:.1f} s: {outcomes}"
    )
    assert sum(outcomes.values()) >= WALKED_SCHEMAS
    assert outcomes["finished and valid"] >= WALKED_SCHEMAS // 3
    assert outcomes["refused (400)"] >= WALKED_SCHEMAS // 20


# ---- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.settings import LocalModelSettings

    return LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))


async def _ask(local, schema, seed: int, max_tokens: int = 32):
    """The answer the in-process handler gives, or the error it raises."""
    params = {
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    try:
        messages = [{"role": "user", "content": "a fox"}]
        return await local.acompletion("x", messages, optional_params=params)
    except LocalLLMError as exc:
        return exc


def test_schemas_through_the_in_process_engine(local):
    """The same property through ``LocalLLM`` (request parsing, compilation, batched decoding with
    the masks applied to the model's logits); the tiny random model picks the tokens."""
    drawn: list = []

    @settings(PROPERTY, max_examples=ENGINE_SCHEMAS)
    @given(schema=schemas())
    def draw(schema):
        drawn.append(schema)

    draw()

    async def everything():
        gate = asyncio.Semaphore(16)  # rows decoded together, as concurrent callers get

        async def one(i, schema):
            async with gate:
                return await _ask(local, schema, seed=i)

        return await asyncio.gather(*(one(i, s) for i, s in enumerate(drawn)))

    outcomes: Counter = Counter()
    for schema, result in zip(drawn, asyncio.run(everything()), strict=True):
        if isinstance(result, LocalLLMError):
            assert isinstance(result, InvalidRequestError), result
            assert result.param == "response_format", result
            outcomes["refused (400)"] += 1
            continue
        choice = result.choices[0]
        _judge(schema, choice.message.content or "", choice.finish_reason, outcomes)
    print(f"\n{len(drawn)} schemas through the engine: {outcomes}")
    assert len(drawn) == ENGINE_SCHEMAS
    assert outcomes["finished and valid"] >= ENGINE_SCHEMAS // 4


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "null"}, "minItems": 100_000},
        {"type": "string", "pattern": "^a*$", "minLength": 10_000},
    ],
    ids=["forced array", "forced string"],
)
def test_llguidances_step_limits_never_give_a_finished_answer(local, schema):
    """Schemas the generator above leaves out: an answer llguidance gives up on mid-way (its
    per-token budget runs out on a long forced run, then it allows only end-of-turn) must be a
    400 or cut by max_tokens, never a finished 200 that breaks the schema."""
    result = asyncio.run(_ask(local, schema, seed=0, max_tokens=64))
    if isinstance(result, LocalLLMError):
        assert isinstance(result, InvalidRequestError) and result.param == "response_format"
        assert "JSON constraint gave up" in result.message
        return
    if result.choices[0].finish_reason == "length":
        return
    assert violations(result.choices[0].message.content or "", schema) == []


def _arguments(value: dict, **more) -> dict:
    return {"type": "object", "properties": {"x": value}, "required": ["x"], **more}


@pytest.mark.parametrize(
    ("parameters", "needle"),
    [
        (_arguments({"type": "integer", "minimum": 1e20, "maximum": 1e21}), "beyond ±2^63"),
        (
            _arguments(
                {"$ref": "#/$defs/a"},
                **{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
            ),
            "$ref cycle with no way out at #/$defs/a",
        ),
    ],
    ids=["bounds", "loop"],
)
def test_tool_parameters_get_the_same_checks(local, parameters, needle):
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    params = {"max_tokens": 8, "tools": tools, "tool_choice": "required"}
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(
            local.acompletion("x", [{"role": "user", "content": "a fox"}], optional_params=params)
        )
    assert info.value.param == "tools[0].function.parameters"
    assert needle in info.value.message
