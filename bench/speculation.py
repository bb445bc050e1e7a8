"""Prompt-lookup speculation on `z-explorer enhance` requests, in process (issue 24).

    uv run python -m bench.speculation --model DIR [--prompts 10] [--drafts 7] [--penalty]

Sends the client's own enhance request (``client._prompts.enhance_request``: its system prompt,
example, ``max_tokens`` 200 and temperature 0.7) for ``--prompts`` different prompts, one at a
time, to the real engine on the checkpoint, with speculation off and on (``draft_tokens``), the two
in turn for each prompt. Without ``--penalty`` the request's ``presence_penalty`` (1.0) is left
out (``--penalty`` keeps it: the penalties follow the draft position by position). Prints
tokens/s (completion tokens over the request's wall time), per configuration the total and the
median of the prompts, and the drafts' acceptance rate.
"""

from __future__ import annotations

import argparse
import asyncio
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
    args = parser.parse_args()

    from client._prompts import enhance_request
    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.settings import LocalModelSettings

    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=args.model)))
    engine = local.engine

    def run(prompt: str, drafts: int) -> tuple[int, float]:
        request = enhance_request(prompt)
        params = {"max_tokens": request.max_tokens, "temperature": request.temperature}
        if args.penalty and request.presence_penalty is not None:
            params["presence_penalty"] = request.presence_penalty
        engine.draft_tokens = drafts
        started = time.perf_counter()
        response = asyncio.run(local.acompletion("x", request.messages, optional_params=params))
        return response.usage.completion_tokens, time.perf_counter() - started

    run(PROMPTS[0], 0)  # load and warm up
    results: dict[int, list[tuple[int, float]]] = {0: [], args.drafts: []}
    checked = kept = 0
    for prompt in PROMPTS[: args.prompts]:
        for drafts in (0, args.drafts) if len(results[0]) % 2 == 0 else (args.drafts, 0):
            before = (engine.drafted, engine.accepted)
            results[drafts].append(run(prompt, drafts))
            checked += engine.drafted - before[0]
            kept += engine.accepted - before[1]
    print(
        f"{args.model}: {args.prompts} enhance requests one at a time, temperature 0.7, "
        f"presence_penalty {'1.0' if args.penalty else 'left out'}, drafts of up to {args.drafts}"
    )
    print("| speculation | tokens | seconds | tokens/s (all) | tokens/s (median of prompts) |")
    print("|---|---|---|---|---|")
    for drafts, runs in results.items():
        tokens, seconds = sum(t for t, _ in runs), sum(s for _, s in runs)
        median = statistics.median(t / s for t, s in runs)
        label = f"on (up to {drafts})" if drafts else "off"
        print(f"| {label} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {median:.1f} |")
    rate = kept / checked if checked else 0.0
    print(f"draft tokens checked {checked}, kept {kept} (acceptance {rate:.2f})")


if __name__ == "__main__":
    main()
