"""What llguidance keeps of a JSON schema, and the schema to give it so every answer follows.

llguidance compiles some JSON schemas into a grammar that breaks them (bounds it reads as doubles
and saturates, exclusive bounds at integers, multipleOf coefficients past 32 bits, ``$ref`` loops
that dead-end), and a few crash the process. ``kept_schema`` narrows what can be narrowed without
letting any invalid answer through, and refuses the rest (``Unkeepable``, a 400 through
``constraints._compile``). The measurements behind each rule are below; ``tests/
test_schema_property.py`` drives thousands of generated schemas through the real matcher and
validates every answer.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Iterator, Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

# ---- What llguidance keeps ----------------------------------------------------------------------
#
# llguidance (1.9.1) compiles some JSON schemas into a grammar that breaks them, and a few crash
# the process. Measured here (tests/test_schema_property.py drives thousands of schemas through
# the real matcher and validates every answer):
#
# - It parses the schema with serde_json, whose default number parser computes significand *
#   10^exponent in doubles: a number written with 17 digits (0.30000000000000004) or past 10^22
#   can come back one step off (1 in 6 random doubles did). Integers up to 64 bits it reads
#   exactly. ``serde_read`` is that parser, checked against llguidance's reading of 2,500 doubles.
# - Numeric bounds are doubles to it. For integers it rounds them (ceil/floor) and casts them to
#   64 bits, saturating: {"minimum": 1e20, "maximum": 1e21} answered 9223372036854775807, and a
#   bound past 2^53 moves with the double's rounding (minimum 2^53+1 allowed 2^53). Both bounds at
#   -2^63 or below crashed the process (a stack overflow in its range code). For numbers it
#   writes the range as decimal strings of the doubles' shortest forms.
# - An exclusive bound at an integer, with the other bound less than one away, lets that integer
#   through ({"exclusiveMinimum": 0, "maximum": 0.5} allowed 0; "minimum": -0.5,
#   "exclusiveMaximum": 0 allowed -0).
# - Bounds with 100 or more digits after the point (1e-100) hit its regex nesting limit (1e-80
#   did not); integer parts past about 1e18 fail its range code: both are errors, hence 400s.
# - multipleOf is coef * 10^-exp to it, coef a 32-bit integer found by multiplying the double by
#   10 until it is whole (1.1 is read exactly, 123456.789 is refused); allOf's multipleOf values
#   are combined with a product that wraps past 2^32. Coefficients past 429,496,729 overflow
#   (answers unconstrained, or a crash), and large ones are costly: building a matcher took 0.3 s
#   and 36 MB for 65,521, 7.7 s and 240 MB for 1,000,003, and all memory for 9,999,991; with a
#   range, 9,999 already ran out of its lexer budget mid-answer (999 and 4,999 did not).
# - Integers in const/enum past 64 bits are written as rounded doubles (2^64+1 as
#   18446744073709552000).
# - A $ref loop no value can leave ({"$ref": "#/$defs/a"} with a: {"$ref": "#/$defs/b"}, b: back
#   to a; an object that requires itself) compiles, then dead-ends: only end-of-turn is allowed
#   where the loop starts, so the answer is empty or cut mid-JSON, with finish_reason "stop".
# - Its per-token budgets (Earley items, lexer fuel) can also run out mid-answer: a long forced
#   run (minItems 20,000 of {"type": "null"}; a pattern "^a*$" with minLength 10,000) did. It then
#   allows only end-of-turn, which the engine must not report as a finished answer
#   (``JsonMatcher.error`` says why): no check of the schema foresees every such case.
#
# ``kept_schema`` narrows what can be narrowed without letting any invalid answer through, and
# refuses the rest with the reason: every bound becomes an inclusive one that llguidance reads
# exactly, on the safe side (an exclusive bound the next double past it, 1e-30 for 0; a lower
# bound below -(2^63 - 1024) is raised to it and an upper bound above 2^63 - 1024 lowered to it,
# a lower bound above that or an upper bound below its negative is refused), multipleOf must be
# read exactly and stay small, const/enum numbers must be written as they are, and $ref loops
# need a way out. String lengths, item and property counts llguidance reads
# as 32- or 64-bit integers and refuses past those itself (an error, hence a 400).

_I64_SAFE = float(2**63 - 1024)  # the largest double below 2^63: what llguidance reads exactly
_EXACT = 2**53  # doubles hold every integer below this; the integer rounding is exact
# What an exclusive bound at 0 becomes: far below any number a model writes, far above 1e-100,
# where llguidance's range code reaches its nesting limit.
_TINY = 1e-30
# The largest multipleOf coefficient kept (digits without the point: 0.0025 is 25), for all of a
# schema's multipleOf values together (their least common multiple): its square fits llguidance's
# 32-bit product, and a range with it stayed within llguidance's budgets.
MAX_MULTIPLE_OF = 1000
_SCHEMA_KEYS = (
    "additionalProperties",
    "additionalItems",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
    "items",
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")


class Unkeepable(ValueError):
    """A schema llguidance would not keep; the message says where and why."""


def kept_schema(schema: Any) -> Any:
    """``schema`` as llguidance must compile it for every answer to follow it; ``Unkeepable`` when
    no such schema exists."""
    multiples: list[tuple[Any, str]] = []
    kept = _kept_numbers(schema, "#", multiples)
    _check_multiples(multiples)
    if (loop := dead_loop(kept)) is not None:
        raise Unkeepable(
            f"$ref cycle with no way out at {loop}: no finite JSON value satisfies it (give the "
            "loop a branch without the $ref, such as an optional property or an empty array)"
        )
    return kept


def _children(schema: Mapping) -> Iterator[tuple[str, Any]]:
    """The subschemas directly in ``schema``, each with its JSON-pointer step."""
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            for name, sub in value.items():
                yield f"/{key}/{_escaped(name)}", sub
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                yield f"/{key}/{i}", sub
        elif key in _SCHEMA_KEYS and isinstance(value, Mapping | bool):
            yield f"/{key}", value


def _escaped(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def _kept_numbers(schema: Any, at: str, multiples: list) -> Any:
    """``schema`` with each subschema's numeric bounds as llguidance keeps them."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            out[key] = {
                name: _kept_numbers(sub, f"{at}/{key}/{_escaped(name)}", multiples)
                for name, sub in value.items()
            }
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [
                _kept_numbers(sub, f"{at}/{key}/{i}", multiples) for i, sub in enumerate(value)
            ]
        elif key in _SCHEMA_KEYS and isinstance(value, Mapping):
            out[key] = _kept_numbers(value, f"{at}/{key}", multiples)
        elif key in ("const", "enum"):
            _check_literal(value, f"{at}/{key}")
    _keep_bounds(out, at)
    if _is_number(out.get("multipleOf")):
        multiples.append((out["multipleOf"], at))
    return out


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (isinstance(value, int) or math.isfinite(value))
    )


def _exact(value: int | float) -> Fraction:
    """The number as the schema's JSON writes it (a double as its shortest decimal)."""
    return Fraction(value) if isinstance(value, int) else Fraction(Decimal(repr(value)))


def _check_literal(value: Any, at: str) -> None:
    """Refuse a number in const/enum that llguidance would not write as it is."""
    if isinstance(value, list):
        for item in value:
            _check_literal(item, at)
    elif isinstance(value, Mapping):
        for item in value.values():
            _check_literal(item, at)
    elif isinstance(value, bool) or not isinstance(value, int | float):
        return
    elif not -(2**63) <= value < 2**64 or (isinstance(value, float) and abs(value) >= 2**63):
        # (a float that large: the gateway's JSON parser, orjson, reads integers past 64 bits so)
        raise Unkeepable(
            f"an integer beyond 64 bits ({value:.4g}) in {at}: the local model's JSON "
            "constraint would write it rounded"
        )
    elif isinstance(value, float) and math.isfinite(value) and serde_read(value) != value:
        raise Unkeepable(
            f"the number {value!r} in {at} would be written as {serde_read(value)!r} by the "
            "local model's JSON constraint (it reads numbers of 17 digits or past 1e22 "
            "approximately)"
        )


def _keep_bounds(schema: dict, at: str) -> None:
    """Replace the bounds by inclusive ones llguidance reads exactly (narrower, never wider)."""
    lower = _bound(schema, "minimum", "exclusiveMinimum", 1)
    upper = _bound(schema, "maximum", "exclusiveMaximum", -1)
    for bound, key, side in ((lower, "minimum", 1), (upper, "maximum", -1)):
        if bound is not None:
            value, exclusive, written = bound
            schema.pop(f"exclusive{key[0].upper()}{key[1:]}", None)
            schema[key] = _kept_bound(value, exclusive, side, written, at)
    if lower is not None and upper is not None:
        (low, low_open, _), (high, high_open, _) = lower, upper
        some = _exact(low) < _exact(high) or (low == high and not (low_open or high_open))
        if some and serde_read(schema["minimum"]) > serde_read(schema["maximum"]):
            raise Unkeepable(
                f"the range from {low} to {high} at {at} holds no number the local model's JSON "
                "constraint can write exactly (it reads bounds as 64-bit doubles)"
            )


def _bound(schema: Mapping, inclusive: str, exclusive: str, side: int):
    """The tighter of a schema's inclusive and exclusive bound on one side: (value, exclusive?,
    keyword), or None. ``side`` is 1 for lower bounds, -1 for upper ones."""
    found = []
    if _is_number(schema.get(inclusive)):
        found.append((schema[inclusive], schema.get(exclusive) is True, inclusive))  # draft 4
    if _is_number(schema.get(exclusive)):
        found.append((schema[exclusive], True, exclusive))
    if not found:
        return None
    # the larger lower bound (smaller upper bound); at a tie, the exclusive one
    return max(found, key=lambda b: (side * _exact(b[0]), b[1]))


def _kept_bound(value: int | float, exclusive: bool, side: int, key: str, at: str) -> int | float:
    """The inclusive bound to give llguidance for ``value``: one it reads exactly as a double, as
    that double's shortest decimal and rounded to an integer, on the safe side of ``value``."""
    exact = _exact(value)
    if side * exact > _I64_SAFE:
        raise Unkeepable(
            f"{key} {value} at {at} is beyond ±2^63 (or within 1024 of it): the local model's "
            "JSON constraint writes integers of 64 bits, and numbers no larger"
        )
    if -side * exact > _I64_SAFE:  # beyond every number it writes: no bound, as far as it goes
        return -side * int(_I64_SAFE)
    if not exclusive and abs(value) < _EXACT and serde_read(value) == value:
        return value

    def fits(f: float) -> bool:
        read = serde_read(_written(f))
        gaps = (side * (Fraction(read) - exact), side * (_exact(read) - exact))
        return all(gap > 0 if exclusive else gap >= 0 for gap in gaps)

    bound = side * _TINY if exclusive and value == 0 else float(value)
    while not fits(bound):
        bound = math.nextafter(bound, side * math.inf)
    return _written(bound)


def _written(f: float) -> int | float:
    """A double as JSON llguidance reads back exactly when it is whole (a 64-bit integer)."""
    return int(f) if f.is_integer() and abs(f) < 2**63 else f


def serde_read(value: int | float) -> float:
    """The double llguidance reads for ``value`` as Python writes it in JSON.

    llguidance parses JSON with serde_json, whose default number parser (no ``float_roundtrip``)
    computes significand * 10^exponent in doubles: two roundings, so a double written with 17
    digits (0.30000000000000004) or beyond 10^22 may come back one step off. Integers up to 64
    bits it reads exactly. Checked against llguidance's own reading of 2,500 doubles."""
    if isinstance(value, int):
        return float(value) if -(2**63) <= value < 2**64 else _serde_decimal(str(value))
    return _serde_decimal(json.dumps(value))


def _serde_decimal(text: str) -> float:
    found = re.fullmatch(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?", text)
    if found is None:
        return math.nan
    sign, whole, fraction, exponent = found.groups()
    digits = (whole + (fraction or "")).lstrip("0")
    power = int(exponent or 0) - len(fraction or "")
    significand = 0
    for i, digit in enumerate(digits):
        if significand > (2**64 - 1 - int(digit)) // 10:  # serde drops the digits past 64 bits
            power += len(digits) - i
            break
        significand = significand * 10 + int(digit)
    f = float(significand)
    while abs(power) > 308 and f != 0.0:
        if power > 0:
            return -math.inf if sign else math.inf
        f, power = f / 1e308, power + 308
    if abs(power) <= 308:
        scale = float(f"1e{abs(power)}")
        f = f * scale if power >= 0 else f / scale
    return -f if sign else f


def _check_multiples(multiples: list[tuple[Any, str]]) -> None:
    """Refuse a multipleOf llguidance would read wrong, or whose coefficient (with the others',
    as allOf combines them) is past ``MAX_MULTIPLE_OF``."""
    decimals = []
    for value, at in multiples:
        coef, exp = _llguidance_decimal(value)
        if Fraction(coef, 10**exp) != _exact(value):
            raise Unkeepable(
                f"multipleOf {value} at {at} is not kept exactly by the local model's JSON "
                "constraint (it reads it as a decimal of at most 10 digits)"
            )
        decimals.append((coef, exp))
    if not decimals:
        return
    top = max(exp for _, exp in decimals)
    common = math.lcm(*(coef * 10 ** (top - exp) for coef, exp in decimals))
    if common > MAX_MULTIPLE_OF:
        values = ", ".join(str(value) for value, _ in multiples[:5])
        raise Unkeepable(
            f"multipleOf {values} (at {multiples[0][1]}) needs steps of {common} (digits without "
            f"the decimal point, all multipleOf values together); the local model's JSON "
            f"constraint keeps up to {MAX_MULTIPLE_OF}"
        )


def _llguidance_decimal(value: int | float) -> tuple[int, int]:
    """multipleOf as llguidance reads it: (coef, exp) for coef * 10^-exp; coef 0 when it refuses."""
    f, exp = abs(serde_read(value)), 0
    if not math.isfinite(f):
        return 0, 0
    while f != math.floor(f):
        f, exp = f * 10.0, exp + 1
    if f > 2**32 - 1:
        return 0, 0
    coef = int(f)
    while exp > 0 and coef % 10 == 0:
        coef, exp = coef // 10, exp - 1
    return coef, exp


def dead_loop(schema: Any) -> str | None:
    """The ``$ref`` (as written) of the first loop, from the root, that no finite JSON value can
    leave; None if there is none."""
    if not isinstance(schema, Mapping) or any(
        isinstance(sub, Mapping) and "$id" in sub for sub in _descendants(schema)
    ):
        return None  # nested $id change what a $ref means: llguidance's own checks decide
    return _Loops(schema).first_dead()


def _descendants(schema: Mapping) -> Iterator[Any]:
    stack = [sub for _, sub in _children(schema)]
    while stack:
        sub = stack.pop()
        yield sub
        if isinstance(sub, Mapping):
            stack.extend(s for _, s in _children(sub))


class _Loops:
    """Which subschemas some finite JSON value satisfies, as far as ``$ref`` loops decide it.

    Each subschema is a gate, true once enough of its inputs are: all of what it needs (its
    ``$ref``'s target, allOf's members, one of anyOf's and of oneOf's, the schemas of its required
    properties and of the items minItems asks for, minProperties' properties). Types, bounds,
    patterns and the like count as satisfiable: llguidance refuses what they make unsatisfiable
    itself. The least fixed point leaves false what no finite value satisfies; the greatest one
    leaves false only what fails without any loop (false, a required false property), which
    llguidance also handles. False in the first and true in the second: a loop with no way out.
    """

    def __init__(self, root: Mapping):
        self.root = root
        self.need: list[int] = []
        self.inputs: list[list[tuple[int, int]]] = []  # (input gate, weight)
        self.links: list[list[int]] = []  # the gates of a schema's subschemas (what it reaches)
        self.gates: dict[int, int] = {}  # id(schema) -> its gate
        self.refs: dict[int, tuple[int, Any, str]] = {}  # schema gate -> (ref gate, target, $ref)
        self.kept: list[Any] = []  # keeps every schema given a gate alive (ids stay unique)
        self.true, self.false = self._gate(0), self._gate(1)
        self.start = self._schema(root)
        pending = list(self.refs.values())
        while pending:  # a $ref may point where no subschema was (a gate built now)
            ref_gate, target, _ = pending.pop()
            before = len(self.refs)
            self.inputs[ref_gate].append((self._schema(target), 1))
            pending.extend(list(self.refs.values())[before:])

    def _gate(self, need: int, inputs: list[tuple[int, int]] | None = None) -> int:
        self.need.append(need)
        self.inputs.append(inputs or [])
        self.links.append([])
        return len(self.need) - 1

    def _all(self, gates: list[int]) -> int:
        return self._gate(len(gates), [(g, 1) for g in gates])

    def _any(self, gates: list[int]) -> int:
        return self._gate(1, [(g, 1) for g in gates])

    def _schema(self, schema: Any) -> int:
        if isinstance(schema, bool):
            return self.true if schema else self.false
        if not isinstance(schema, Mapping):
            return self.true
        if id(schema) in self.gates:
            return self.gates[id(schema)]
        gate = self._gate(0)
        self.gates[id(schema)] = gate
        self.kept.append(schema)
        for step, sub in _children(schema):  # definitions are reached by $ref only
            sub_gate = self._schema(sub)
            if not step.startswith(("/$defs/", "/definitions/")):
                self.links[gate].append(sub_gate)
        parts = []
        ref = schema.get("$ref")
        if isinstance(ref, str) and (target := self._resolve(ref)) is not None:
            ref_gate = self._gate(1)
            self.refs[gate] = (ref_gate, target, ref)
            parts.append(ref_gate)
        if isinstance(schema.get("allOf"), list):
            parts.extend(self._schema(sub) for sub in schema["allOf"])
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                parts.append(self._any([self._schema(sub) for sub in schema[key]]))
        parts.append(self._kind(schema))
        self.need[gate] = len(parts)
        self.inputs[gate] = [(part, 1) for part in parts]
        return gate

    def _kind(self, schema: Mapping) -> int:
        """The gate of the value itself: an object's or array's needs, or true."""
        if "const" in schema or "enum" in schema:
            return self.true
        types = schema.get("type", ["object", "array", "string"])
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or any(t not in ("object", "array") for t in types):
            return self.true
        return self._any(
            [self._object(schema) if t == "object" else self._array(schema) for t in types]
        )

    def _object(self, schema: Mapping) -> int:
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        patterns = schema.get("patternProperties")
        patterns = patterns if isinstance(patterns, Mapping) else {}
        required = schema.get("required")
        required = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        extra = schema.get("additionalProperties", True)

        def value_of(name: str) -> int:
            if name in props:
                return self._schema(props[name])
            matching = [self._schema(s) for p, s in patterns.items() if _search(p, name)]
            return self._all(matching) if matching else self._schema(extra)

        parts = [value_of(name) for name in dict.fromkeys(required)]
        least = schema.get("minProperties", 0)
        if isinstance(least, int) and least > len(set(required)):
            names = [(value_of(name), 1) for name in dict.fromkeys([*props, *required])]
            others = [(self._schema(s), least) for s in (*patterns.values(), extra)]
            parts.append(self._gate(least, names + others))
        return self._all(parts)

    def _array(self, schema: Mapping) -> int:
        items = schema.get("items", True)
        prefix = schema.get("prefixItems", items if isinstance(items, list) else [])
        rest = schema.get("additionalItems", True) if isinstance(items, list) else items
        least = schema.get("minItems", 0)
        least = least if isinstance(least, int) else 0
        parts = [self._schema(sub) for sub in prefix[:least]] if isinstance(prefix, list) else []
        if least > len(parts):
            parts.append(self._schema(rest))
        return self._all(parts)

    def _resolve(self, ref: str) -> Any:
        """The subschema a local JSON-pointer ``$ref`` names; None for any other."""
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            return None
        node: Any = self.root
        for step in ref[2:].split("/"):
            step = unquote(step).replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and step in node:
                node = node[step]
            elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
                node = node[int(step)]
            else:
                return None
        return node if isinstance(node, Mapping | bool) else None

    def _fixed_point(self, least: bool) -> list[bool]:
        """Each gate's value at the least (``least``) or greatest fixed point."""
        users: list[list[tuple[int, int]]] = [[] for _ in self.need]
        for gate, inputs in enumerate(self.inputs):
            for source, weight in inputs:
                users[source].append((gate, weight))
        if least:
            value = [need <= 0 for need in self.need]
            score = [0] * len(self.need)
            queue = [g for g, v in enumerate(value) if v]
            while queue:
                for user, weight in users[queue.pop()]:
                    score[user] += weight
                    if not value[user] and score[user] >= self.need[user]:
                        value[user] = True
                        queue.append(user)
            return value
        value = [True] * len(self.need)
        score = [sum(weight for _, weight in inputs) for inputs in self.inputs]
        queue = [g for g, s in enumerate(score) if s < self.need[g]]
        for gate in queue:
            value[gate] = False
        while queue:
            for user, weight in users[queue.pop()]:
                score[user] -= weight
                if value[user] and score[user] < self.need[user]:
                    value[user] = False
                    queue.append(user)
        return value

    def first_dead(self) -> str | None:
        satisfiable, unlooped = self._fixed_point(least=True), self._fixed_point(least=False)
        seen, queue = {self.start}, deque([self.start])
        while queue:  # breadth first from the root: the loop nearest to it
            gate = queue.popleft()
            if gate in self.refs:
                _, target, ref = self.refs[gate]
                target_gate = self._schema(target)
                if not satisfiable[target_gate] and unlooped[target_gate]:
                    return ref
                if target_gate not in seen:
                    seen.add(target_gate)
                    queue.append(target_gate)
            for sub in self.links[gate]:
                if sub not in seen:
                    seen.add(sub)
                    queue.append(sub)
        return None


def _search(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except (re.error, TypeError):
        return False
