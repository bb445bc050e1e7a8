"""Grammar fast-forward on constrained requests, in process (issue 24).

    uv run python -m bench.grammar_forward --model DIR [--requests 10] [--drafts 7]
        [--forced N ...] [--min-forced M ...] [--only vars|tool] [--repeat R]

Two kinds of request, one at a time, to the real engine on the checkpoint, with drafts off and on
(``draft_tokens`` 0 / ``--drafts``), the two in turn for each request (the order alternates, so
neither side always finds the prompt in the prefix cache):

- **vars**: the client's own ``z-explorer vars`` request (``client._prompts.values_request``: its
  system prompt, ``{"values": [...]}`` schema of 5 values, budget and temperature 0.9), for
  ``--requests`` different variables;
- **tool**: a ``make_image`` call with ``tool_choice`` naming it (arguments: a prompt, a style and
  an aspect ratio, two of them enums), greedy, for ``--requests`` different ideas. A checkpoint
  without ``<tool_call>``/``</tool_call>`` tokens (SmolLM2) gets them for this run: a copy of its
  tokenizer in a scratch folder whose unused special tokens 8 and 9 (``<issue_start>``,
  ``<issue_comment>``) are renamed to the markers, the weights linked, not copied. Its chat template
  does not lay out tools: the system prompt describes the function instead.

Greedy answers must be the same every way: the script stops if one differs. ``--forced`` and
``--min-forced`` set ``scheduler.FORCED_TOKENS`` / ``MIN_FORCED`` (the longest forced draft checked
in a pass, the shortest worth a pass); given several values, each pair is one more configuration,
all run in turn for each request (the order rotating), ``--repeat`` times. Prints per kind and
configuration the tokens, seconds and tokens/s of all runs; the median over requests of each
request's best tokens/s of its runs (a shared machine only ever slows a run down); the median and
range over requests of that best against the same request's best with drafts off (run next to
it: the ratio least moved by a machine whose load changes); the forced tokens kept; and the
forward passes after the prefill a request took (one-token steps and passes over a draft: a
count the machine's load does not change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.speculation import PROMPTS

VARIABLES = [
    ("cat_breed", "a __cat_breed__ sleeping on a sunny windowsill"),
    ("time_of_day", "a lighthouse on a cliff at __time_of_day__"),
    ("art_style", "a portrait of an old fisherman, __art_style__"),
    ("weather", "a mountain village in __weather__"),
    ("flower", "a vase of __flower__ on a kitchen table"),
    ("camera_lens", "a street market at night, shot with a __camera_lens__"),
    ("mood", "a forest path in autumn, __mood__ atmosphere"),
    ("city", "a tram crossing a bridge in __city__"),
    ("fabric", "a dress made of __fabric__ on a mannequin"),
    ("creature", "a __creature__ guarding a treasure in a cave"),
]
IDEAS = PROMPTS  # the image ideas of bench/speculation.py
MAKE_IMAGE = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "maxLength": 300},
        "style": {
            "enum": ["photographic", "watercolor", "oil painting", "ink drawing", "3d render"]
        },
        "aspect_ratio": {"enum": ["square", "landscape", "portrait"]},
    },
    "required": ["prompt", "style", "aspect_ratio"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "make_image",
            "description": "Render an image from a detailed prompt.",
            "parameters": MAKE_IMAGE,
        },
    }
]
TOOL_SYSTEM = (
    "You render images with the function make_image(prompt, style, aspect_ratio). Write a "
    "detailed prompt for the user's idea, pick a style (photographic, watercolor, oil painting, "
    "ink drawing, 3d render) and an aspect ratio (square, landscape, portrait)."
)
MARKERS = {8: "<tool_call>", 9: "</tool_call>"}  # SmolLM2's <issue_start>, <issue_comment>


def with_call_markers(model: str, scratch: Path) -> str:
    """``model`` itself if its tokenizer has the call markers, else a scratch copy whose special
    tokens 8 and 9 are renamed to them (weights and config linked)."""
    source = Path(model)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    if any(t["content"] == "<tool_call>" for t in tokenizer["added_tokens"]):
        return model
    out = scratch / "with-call-markers"
    out.mkdir()
    for entry in source.iterdir():
        if entry.name not in ("tokenizer.json",):
            os.symlink(entry.resolve(), out / entry.name)
    vocab = tokenizer["model"]["vocab"]
    for token in tokenizer["added_tokens"]:
        if token["id"] in MARKERS:
            del vocab[token["content"]]
            token["content"] = MARKERS[token["id"]]
            vocab[token["content"]] = token["id"]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    return str(out)


def vars_request(i: int) -> tuple[list, dict]:
    """The client's own ``z-explorer vars`` request for the ``i``-th variable: messages, params."""
    from client._prompts import values_request

    name, context = VARIABLES[i % len(VARIABLES)]
    request = values_request(name, context, 5)
    params = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "response_format": request.response_format,
    }
    return request.messages, params


def tool_request(i: int) -> tuple[list, dict]:
    """A ``make_image`` call for the ``i``-th idea, ``tool_choice`` naming it, greedy."""
    messages = [
        {"role": "system", "content": TOOL_SYSTEM},
        {"role": "user", "content": f"Idea: {IDEAS[i % len(IDEAS)]}"},
    ]
    choice = {"type": "function", "function": {"name": "make_image"}}
    params = {"max_tokens": 200, "temperature": 0, "tools": TOOLS, "tool_choice": choice}
    return messages, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--drafts", type=int, default=7)
    parser.add_argument(
        "--forced", type=int, nargs="*", help="scheduler.FORCED_TOKENS (several: each)"
    )
    parser.add_argument(
        "--min-forced", type=int, nargs="*", help="scheduler.MIN_FORCED (several: each)"
    )
    parser.add_argument("--only", choices=("vars", "tool"), default=None)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each request and setting")
    args = parser.parse_args()

    from custom_handlers.inference import scheduler
    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.settings import LocalModelSettings

    args.min_forced = args.min_forced or [scheduler.MIN_FORCED]
    scratch = tempfile.TemporaryDirectory(prefix="grammar-forward-")
    model = with_call_markers(args.model, Path(scratch.name))
    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=model)))
    engine = local.engine

    passes: list[int] = []  # tokens fed by each pass over a draft (the draft and one)
    verify = engine.outputs.verify

    def counted(row, draft, logits, forced=False):
        passes.append(len(draft) + 1)
        return verify(row, draft, logits, forced)

    engine.outputs.verify = counted

    def run(messages: list, params: dict, config: tuple[int, int, int]):
        drafts, scheduler.FORCED_TOKENS, scheduler.MIN_FORCED = config
        engine.draft_tokens = drafts
        before = (engine.forced_drafted, engine.forced_accepted, engine.accepted)
        passes.clear()
        started = time.perf_counter()
        response = asyncio.run(local.acompletion("x", messages, optional_params=dict(params)))
        seconds = time.perf_counter() - started
        choice = response.choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        answer = (choice.message.content, calls, choice.finish_reason)
        counts = (engine.forced_drafted - before[0], engine.forced_accepted - before[1])
        tokens = response.usage.completion_tokens
        # Forward passes after the prefill (which gives the first token): one-token steps, and
        # passes over a draft (each writes the draft's kept tokens and one more).
        by_drafts = len(passes) + engine.accepted - before[2]
        steps = tokens - 1 - by_drafts + len(passes)
        return tokens, seconds, counts, answer, steps

    kinds = {"vars": vars_request, "tool": tool_request}
    if args.only:
        kinds = {args.only: kinds[args.only]}
    off = (0, scheduler.FORCED_TOKENS, scheduler.MIN_FORCED)
    configs = [off] + [
        (args.drafts, most, least) for most in args.forced or [off[1]] for least in args.min_forced
    ]
    for build in kinds.values():
        run(*build(0), off)  # load, warm up, compile the grammar
    print(
        f"{args.model}: one request at a time; fast-forward off (draft_tokens 0), and on "
        f"(draft_tokens {args.drafts}; forced tokens up to N a pass, from M on), in turn"
    )
    print(
        f"| request | fast-forward | tokens | seconds | tokens/s (all runs) | tokens/s (median of "
        f"requests, best of {args.repeat}) | against off, same request: median (range) | forced "
        "tokens kept | forward passes a request (mean) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, build in kinds.items():
        results: dict[tuple, list[list]] = {config: [] for config in configs}
        for i in range(args.requests):
            messages, params = build(i)
            answers = {}
            for config in configs:
                results[config].append([])
            for repeat in range(args.repeat):
                shift = (i + repeat) % len(configs)  # each configuration in each place in turn
                for config in configs[shift:] + configs[:shift]:
                    result = run(messages, params, config)
                    results[config][-1].append(result)
                    answers.setdefault(config, result[3])
            if params["temperature"] == 0 and len({repr(a) for a in answers.values()}) > 1:
                raise SystemExit(f"{kind} {i}: greedy answers differ: {answers}")
        best_off = [max(r[0] / r[1] for r in runs) for runs in results[off]]
        for config, requests in results.items():
            runs = [r for request in requests for r in request]
            tokens, seconds = sum(r[0] for r in runs), sum(r[1] for r in runs)
            best = [max(r[0] / r[1] for r in request) for request in requests]
            label = f"on (N {config[1]}, M {config[2]})" if config[0] else "off"
            paired = kept_text = "-"
            if config[0]:  # each request against itself off, run next to it
                ratios = sorted(b / o for b, o in zip(best, best_off, strict=True))
                paired = f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"
                checked, kept = sum(r[2][0] for r in runs), sum(r[2][1] for r in runs)
                kept_text = f"{kept} of {checked}"
            print(
                f"| {kind} | {label} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} "
                f"| {statistics.median(best):.1f} | {paired} | {kept_text} "
                f"| {sum(r[4] for r in runs) / len(runs):.1f} |"
            )
    if "tool" in kinds:
        print(f"tool call, first idea: {run(*tool_request(0), configs[-1])[3][1]}")
    scratch.cleanup()


if __name__ == "__main__":
    main()
