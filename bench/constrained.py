"""JSON-constrained decoding cost on the local model: first request, repeat, tokens/s.

    uv run python -m bench.constrained [--model DIR] [--tokens 256] [--runs 5]

Drives the handler in-process (no proxy: the proxy's cost is the same with or without a schema).
Without --model it builds the tiny random-weight Qwen3 first. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from bench._common import model_or_tiny, print_measures
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings

ASK = [{"role": "user", "content": "list values"}]
FIRST = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "minItems": 3,
            "maxItems": 3,
        }
    },
    "required": ["values"],
}
# Cannot finish within the budget: every request runs to max_tokens, like the free one.
ENDLESS = {"type": "array", "items": {"type": "string"}, "minItems": 100000}


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


async def _timed(handler: LocalLLM, **params) -> tuple[float, int]:
    started = time.perf_counter()
    response = await handler.acompletion("bench", ASK, optional_params=params)
    return time.perf_counter() - started, response.usage.completion_tokens


async def run(model: str, tokens: int, runs: int) -> list[tuple[str, str]]:
    handler = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=model)))
    await _timed(handler, max_tokens=1)  # load the model; not measured
    await asyncio.sleep(1)  # let the background warm-up of the constraint tokenizer finish
    rows = []
    first, n = await _timed(handler, max_tokens=64, seed=0, response_format=_format(FIRST))
    rows.append(
        (
            f"first constrained request after start (new schema), {n} tokens",
            f"{first * 1000:.0f} ms",
        )
    )
    repeat = [
        await _timed(handler, max_tokens=64, seed=0, response_format=_format(FIRST))
        for _ in range(runs)
    ]
    rows.append(
        (
            f"the same request again, median of {runs}",
            f"{statistics.median(t for t, _ in repeat) * 1000:.0f} ms",
        )
    )
    free = [await _timed(handler, max_tokens=n, seed=0) for _ in range(runs)]
    rows.append(
        (
            f"unconstrained request of {n} tokens, median of {runs}",
            f"{statistics.median(t for t, _ in free) * 1000:.0f} ms",
        )
    )
    constraints = handler.holder.get().constraints
    schema = json.dumps({**FIRST, "title": "never seen"}, sort_keys=True)
    started = time.perf_counter()
    constraints.grammar(schema)
    compiled = time.perf_counter() - started
    started = time.perf_counter()
    constraints.grammar(schema)
    cached = time.perf_counter() - started
    rows.append(
        ("schema preparation: new / cached", f"{compiled * 1000:.2f} ms / {cached * 1e6:.1f} µs")
    )
    for label, extra in (
        ("unconstrained", {}),
        ("constrained", {"response_format": _format(ENDLESS)}),
    ):
        rates = []
        for seed in range(runs):
            elapsed, n = await _timed(
                handler, max_tokens=tokens, seed=seed, temperature=1.0, **extra
            )
            rates.append(n / elapsed)
        rows.append(
            (
                f"decode tokens/s, {label}, {tokens} tokens, median of {runs}",
                f"{statistics.median(rates):.0f}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_tiny(args.model, tmp)
        rows = asyncio.run(run(model, args.tokens, args.runs))
    print_measures(args.model, rows)
    print("\nschemas:", json.dumps(FIRST), json.dumps(ENDLESS))


if __name__ == "__main__":
    main()
