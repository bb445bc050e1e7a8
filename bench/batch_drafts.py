"""Drafts for rows in a batch: requests sent together, drafts off and on, in process (issue 24).

    uv run python -m bench.batch_drafts --model DIR [--streams 4] [--batches 3] [--kinds tool vars]

Sends ``--streams`` different requests of a kind together (one batch), ``--batches`` times with
different requests, to the real engine on the checkpoint, with drafts off (``draft_tokens`` 0)
and on (``--drafts``), in turn (the order alternating). Kinds (bench/grammar_forward.py's
requests):

- **tool**: a ``make_image`` call with ``tool_choice`` naming it, greedy: every row of the batch
  drafts the tokens its grammar forces. The answers must be the same off and on (the script stops
  otherwise).
- **vars**: the client's ``z-explorer vars`` request (JSON schema, temperature 0.9).

Prints per kind and setting the batch's tokens/s (its completion tokens over its wall time): all
batches, and the median of the batches; and the draft tokens checked and kept.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.grammar_forward import tool_request, vars_request, with_call_markers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--drafts", type=int, default=7)
    parser.add_argument("--kinds", nargs="*", default=["tool", "vars"], choices=["tool", "vars"])
    args = parser.parse_args()

    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.settings import LocalModelSettings

    scratch = tempfile.TemporaryDirectory(prefix="batch-drafts-")
    model = with_call_markers(args.model, Path(scratch.name))
    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=model)))
    engine = local.engine

    async def together(requests: list[tuple[list, dict]]) -> list:
        return await asyncio.gather(
            *(local.acompletion("x", m, optional_params=dict(p)) for m, p in requests)
        )

    def run(requests, drafts: int) -> tuple[int, float, list]:
        engine.draft_tokens = drafts
        started = time.perf_counter()
        responses = asyncio.run(together(requests))
        seconds = time.perf_counter() - started
        answers = [
            (
                r.choices[0].message.content,
                [
                    (c.function.name, c.function.arguments)
                    for c in r.choices[0].message.tool_calls or ()
                ],
            )
            for r in responses
        ]
        return sum(r.usage.completion_tokens for r in responses), seconds, answers

    print(
        f"{args.model}: {args.streams} requests together, {args.batches} batches a kind; drafts "
        f"off (draft_tokens 0) and on ({args.drafts}), in turn"
    )
    print(
        "| request | drafts | tokens | seconds | tokens/s (all) | tokens/s (median of batches) "
        "| draft tokens checked | kept |"
    )
    print("|---|---|---|---|---|---|---|---|")
    builders = {"tool": tool_request, "vars": vars_request}
    for kind in args.kinds:
        build = builders[kind]
        run([build(i) for i in range(args.streams)], 0)  # load, warm up, compile the grammar
        results: dict[int, list] = {0: [], args.drafts: []}
        counts = {0: [0, 0], args.drafts: [0, 0]}
        for b in range(args.batches):
            requests = [build(b * args.streams + i) for i in range(args.streams)]
            answers = {}
            for drafts in (0, args.drafts) if b % 2 == 0 else (args.drafts, 0):
                before = (engine.drafted, engine.accepted)
                tokens, seconds, answers[drafts] = run(requests, drafts)
                results[drafts].append((tokens, seconds))
                counts[drafts][0] += engine.drafted - before[0]
                counts[drafts][1] += engine.accepted - before[1]
            if kind == "tool" and answers[0] != answers[args.drafts]:
                raise SystemExit(f"batch {b}: greedy answers differ with drafts: {answers}")
        for drafts, runs in results.items():
            tokens, seconds = sum(t for t, _ in runs), sum(s for _, s in runs)
            median = statistics.median(t / s for t, s in runs)
            label = f"on (up to {args.drafts})" if drafts else "off"
            checked, kept = counts[drafts]
            print(
                f"| {kind} | {label} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} "
                f"| {median:.1f} | {checked} | {kept} |"
            )
    scratch.cleanup()


if __name__ == "__main__":
    main()
