"""Prompt-lookup speculation on `z-explorer enhance` requests, in process (issue 24).

    uv run python -m bench.speculation --model DIR [--prompts 10] [--drafts 7] [--penalty]
        [--streams 4 --lookup-rows 1 4]

Sends the client's own enhance request (``client._prompts.enhance_request``: its system prompt,
example, ``max_tokens`` 200 and temperature 0.7) for ``--prompts`` different prompts, one at a
time, to the real engine on the checkpoint, with speculation off and on (``draft_tokens``), the two
in turn for each prompt. Without ``--penalty`` the request's ``presence_penalty`` (1.0) is left
out (``--penalty`` keeps it: the penalties follow the draft position by position). Prints
tokens/s (completion tokens over the request's wall time), per configuration the total and the
median of the prompts, and the drafts' acceptance rate.

With ``--streams N`` the prompts go ``N`` at a time (``N`` different prompts together, in one
batch); tokens/s is then the batch's (its completion tokens over its wall time; with
``--no-eos`` every answer runs to ``max_tokens``, so the batch keeps all its rows to the end), and
``--lookup-rows`` gives the values of ``scheduler.LOOKUP_ROWS`` to run (how many rows of a batch
check a lookup draft in a step), each against speculation off, in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time

PROMPTS = [
    "a fox in a misty forest at dawn",
    "an old lighthouse on a cliff during a storm",
    "a cyberpunk street market at night, neon signs",
    "a watercolor portrait of a cat wearing a crown",
    "a giant tortoise carrying a village on its back",
    "an astronaut playing chess with a robot on the moon",
    "a cozy library inside a hollow tree",
    "a dragon sleeping on a pile of books",
    "a samurai standing in a field of red flowers",
    "a steam train crossing a bridge over a canyon",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--drafts", type=int, default=7)
    parser.add_argument("--penalty", action="store_true", help="keep presence_penalty 1.0")
    parser.add_argument("--streams", type=int, default=1, help="requests sent together")
    parser.add_argument("--lookup-rows", type=int, nargs="*", help="scheduler.LOOKUP_ROWS values")
    parser.add_argument(
        "--no-eos", action="store_true", help="every answer runs to max_tokens (a batch stays full)"
    )
    args = parser.parse_args()

    from client._prompts import enhance_request
    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.settings import LocalModelSettings

    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=args.model)))
    engine = local.engine

    from custom_handlers.inference import scheduler

    if args.no_eos:  # the model's end-of-turn tokens end nothing: each answer is 200 tokens
        loaded = local.holder.get()
        local.holder._loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())

    def params_of(prompt: str):
        request = enhance_request(prompt)
        params = {"max_tokens": request.max_tokens, "temperature": request.temperature}
        if args.penalty and request.presence_penalty is not None:
            params["presence_penalty"] = request.presence_penalty
        return request.messages, params

    async def together(prompts: list[str]) -> list:
        asked = [params_of(prompt) for prompt in prompts]
        return await asyncio.gather(
            *(local.acompletion("x", m, optional_params=p) for m, p in asked)
        )

    def run(prompts: list[str], config: tuple[int, int]) -> tuple[int, float]:
        engine.draft_tokens, scheduler.LOOKUP_ROWS = config
        started = time.perf_counter()
        responses = asyncio.run(together(prompts))
        seconds = time.perf_counter() - started
        return sum(r.usage.completion_tokens for r in responses), seconds

    streams = args.streams
    configs = [(0, 1)] + [(args.drafts, rows) for rows in args.lookup_rows or [1]]
    run(PROMPTS[:streams], configs[0])  # load and warm up
    results: dict[tuple[int, int], list[tuple[int, float]]] = {c: [] for c in configs}
    counts = {c: [0, 0] for c in configs}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    for n, start in enumerate(range(0, len(prompts), streams)):
        group = prompts[start : start + streams]
        shift = n % len(configs)  # the order rotates: each configuration runs first in turn
        for config in configs[shift:] + configs[:shift]:
            before = (engine.drafted, engine.accepted)
            results[config].append(run(group, config))
            counts[config][0] += engine.drafted - before[0]
            counts[config][1] += engine.accepted - before[1]
    print(
        f"{args.model}: {args.prompts} enhance requests, {streams} at a time, temperature 0.7, "
        f"presence_penalty {'1.0' if args.penalty else 'left out'}, drafts of up to {args.drafts}"
    )
    what = "prompts" if streams == 1 else "batches"
    print(
        f"| speculation | tokens | seconds | tokens/s (all) | tokens/s (median of {what}) "
        "| draft tokens checked | kept |"
    )
    print("|---|---|---|---|---|---|---|")
    for (drafts, rows), runs in results.items():
        tokens, seconds = sum(t for t, _ in runs), sum(s for _, s in runs)
        median = statistics.median(t / s for t, s in runs)
        label = "off" if not drafts else f"on (up to {drafts}"
        if drafts:
            label += f", {rows} row{'s' if rows > 1 else ''} a step)" if streams > 1 else ")"
        checked, kept = counts[(drafts, rows)]
        print(
            f"| {label} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {median:.1f} "
            f"| {checked} | {kept} |"
        )


if __name__ == "__main__":
    main()
