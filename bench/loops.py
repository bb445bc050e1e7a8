"""Does a small real model that starts to loop stop early? The client's enhance request, before and
after its sampling settings, on a local checkpoint driven in-process (no gateway: the handler and
engine the gateway runs).

    uv run python -m bench.loops --model /tmp/smollm2 --seeds 8

For each setting and seed: completion tokens, finish reason, and how much of the answer repeats
(the share of its word 4-grams seen earlier in it). Also a greedy answer with and without
``repetition_penalty: 1.5``. See docs/benchmarks.md, "Sampling controls on a real model".
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from client._llm import chat_options
from client._prompts import enhance_request
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings

IDEA = "a fox in a misty forest"
# The client's enhance request before issue 21: temperature 0.7, max_tokens 320, nothing else.
BEFORE = {"temperature": 0.7, "max_tokens": 320}


def repeated_share(text: str, n: int = 4) -> float:
    """The share of the text's word n-grams that already appeared earlier in it."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


async def one(local: LocalLLM, messages: list, params: dict) -> tuple[int, str, float, str, float]:
    started = time.perf_counter()
    r = await local.acompletion("x", messages, optional_params=dict(params))
    seconds = time.perf_counter() - started
    text = r.choices[0].message.content or ""
    finish = r.choices[0].finish_reason
    return r.usage.completion_tokens, finish, repeated_share(text), text, seconds


def settings_of(request) -> dict:
    """What the client sends for ``request``, less the model and messages."""
    options = chat_options(request, "local")
    options.pop("model"), options.pop("messages")
    return options


async def main(model: str, seeds: int, show: bool) -> None:
    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=model)))
    request = enhance_request(IDEA)
    after = settings_of(request)
    print(f"model: {model}; idea: {IDEA!r}")
    print(f"before: {BEFORE}\nafter (the client's): {after}\n")
    print("| settings | seed | tokens | finish | repeated 4-grams |")
    print("|---|---|---|---|---|")
    summary: dict[str, list] = {}
    settings = {"before": BEFORE, "after": after}
    asks = [(name, seed) for seed in range(seeds) for name in settings]
    # Every answer decoded in one batch (rows are independent: each its own seed and penalties).
    answers = await asyncio.gather(
        *[one(local, request.messages, {**settings[name], "seed": seed}) for name, seed in asks]
    )
    for (name, seed), (tokens, finish, share, text, _) in zip(asks, answers, strict=True):
        summary.setdefault(name, []).append((tokens, finish, share))
        print(f"| {name} | {seed} | {tokens} | {finish} | {share:.0%} |")
        if show:
            print(f"\n> {text!r}\n")
    print()
    for name, rows in summary.items():
        tokens = [t for t, _, _ in rows]
        cut = sum(f == "length" for _, f, _ in rows)
        share = statistics.mean(s for _, _, s in rows)
        print(
            f"{name}: median {statistics.median(tokens):.0f} tokens (min {min(tokens)}, max "
            f"{max(tokens)}), {cut}/{len(rows)} cut by max_tokens, mean repeated 4-grams "
            f"{share:.0%}"
        )
    print()
    for penalty in (None, 1.5):
        params = {"temperature": 0, "max_tokens": 120}
        if penalty is not None:
            params["repetition_penalty"] = penalty
        tokens, finish, share, text, _ = await one(local, request.messages, params)
        print(f"greedy, repetition_penalty {penalty}: {tokens} tokens, {finish}, {share:.0%}")
        print(f"> {text[:300]!r}")
    local.engine.release().done.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local checkpoint directory")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--show", action="store_true", help="print every answer")
    args = parser.parse_args()
    asyncio.run(main(args.model, args.seeds, args.show))
