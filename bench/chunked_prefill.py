"""Chunked prefill: the gaps of running streams while a long prompt joins, in process (issue 24).

    uv run python -m bench.chunked_prefill --model DIR [--rounds 3] [--chunk 256 ...] [--streams 4]

The real ``Engine``, in process. Per round: ``--streams`` requests decode (sampled, temperature
0.7, up to ``--max-tokens`` tokens); once each has written ``--warm`` tokens, a prompt of about
``--prompt-tokens`` tokens arrives (a different text each time; the prefix cache is off). Each
round runs chunked prefill off (``prefill_chunk`` 0: the prompt is prefilled whole between two
steps, as before issue 24) and with each ``--chunk``, in alternating order. For every stream,
the gaps between its tokens from the moment all streams run (the last one's first token) to its
end, as the engine hands each token on (before any transport): their median and the longest;
and the long prompt's time to first token. Prints a table: the medians over rounds of the
streams' median gap, of the longest gap, of the worst ratio longest / median, and of the time
to first token.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import statistics
import threading
import time
from dataclasses import dataclass

SENTENCES = [
    "The harbor town woke slowly under a grey sky while fishermen mended their nets.",
    "A narrow street climbed the hill past bakeries, a clock tower and a shuttered inn.",
    "In the square, children chased pigeons around a fountain shaped like a whale.",
    "Far above, gulls circled the lighthouse whose lamp had been dark for years.",
    "An old painter set up her easel by the pier and mixed a careful shade of blue.",
    "Merchants argued over the price of salt, rope, lantern oil and dried apricots.",
]


def long_prompt(tokenizer, tokens: int, round_: int) -> list[int]:
    """A chat prompt of about ``tokens`` tokens, different for each round."""
    text, i = f"Round {round_}. Summarise this story in one sentence.\n", round_
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += f"{SENTENCES[i % len(SENTENCES)]} ({i}) "
        i += 7
    return _chat(tokenizer, text)


def _chat(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


@dataclass
class Round:
    median: float  # the streams' median gap (the median of their medians), seconds
    longest: float  # the longest gap of any stream
    ratio: float  # the worst stream's longest gap over its own median
    ttft: float  # the long prompt's time to first token
    prompt: int  # its tokens


def one_round(
    engine,
    stream_prompt: list[int],
    long_ids: list[int],
    streams: int,
    tokens: int,
    warm: int,
    chunk: int,
    temperature: float = 0.7,
) -> Round:
    """``streams`` jobs decode ``tokens`` tokens each; once each has ``warm``, a job with the
    prompt ``long_ids`` arrives; chunked prefill set to ``chunk`` (0: off). The gaps between the
    tokens of each stream are when the engine hands each token on (``Outputs.advance``)."""
    from custom_handlers.inference.jobs import Done, Failed, Job, SyncSink
    from custom_handlers.inference.request import SamplingParams

    times: dict[int, list[float]] = {}  # id(job) -> when each of its tokens was handed on
    lock = threading.Lock()
    advance = engine.outputs.advance

    def timed_advance(rows, chosen, eos):
        now = time.perf_counter()
        with lock:
            for row in rows:
                if not row.done:
                    times.setdefault(id(row.job), []).append(now)
        advance(rows, chosen, eos)

    def job(prompt: list[int], most: int, seed: int) -> Job:
        sampling = SamplingParams(temperature=temperature, seed=seed)
        return Job(prompt, sampling, most, SyncSink())

    def drain(job: Job) -> None:
        while not isinstance(event := job.sink.get(), Done):
            if isinstance(event, Failed):
                raise RuntimeError(f"a request failed: {event.error}")

    engine.prefill_chunk = chunk
    engine.outputs.advance = timed_advance
    try:
        running = [job(stream_prompt, tokens, seed) for seed in range(streams)]
        with concurrent.futures.ThreadPoolExecutor(streams + 1) as pool:
            waiting = [pool.submit(drain, engine.submit(j)) for j in running]
            deadline = time.monotonic() + 600
            while not all(len(times.get(id(j), [])) >= warm for j in running):
                if time.monotonic() > deadline or any(w.done() for w in waiting):
                    raise RuntimeError("the streams did not start, or ended before the prompt")
                time.sleep(0.002)
            started = max(times[id(j)][0] for j in running)  # the last stream's first token
            long = job(long_ids, 1, streams)
            sent = time.perf_counter()
            waiting.append(pool.submit(drain, engine.submit(long)))
            for w in waiting:
                w.result()
    finally:
        del engine.outputs.advance
    gaps = []
    for j in running:  # from when all streams run (the others' prefills before are not counted)
        stamps = [t for t in times[id(j)] if t >= started]
        between = [b - a for a, b in itertools.pairwise(stamps)]
        gaps.append((statistics.median(between), max(between)))
    return Round(
        median=statistics.median(g for g, _ in gaps),
        longest=max(g for _, g in gaps),
        ratio=max(g / m for m, g in gaps),
        ttft=times[id(long)][0] - sent,
        prompt=len(long_ids),
    )


def table(results: dict[int, list[Round]]) -> list[str]:
    lines = [
        "| prefill | streams' median gap | longest gap | longest / median (worst stream) "
        "| long prompt's time to first token (rounds' range) |",
        "|---|---|---|---|---|",
    ]
    for chunk, rounds in results.items():
        label = f"in chunks of {chunk}" if chunk else "whole (chunks off)"
        median = statistics.median(r.median for r in rounds) * 1000
        longest = statistics.median(r.longest for r in rounds) * 1000
        ratio = statistics.median(r.ratio for r in rounds)
        ttft = statistics.median(r.ttft for r in rounds)
        spread = f"{min(r.ttft for r in rounds):.2f}-{max(r.ttft for r in rounds):.2f}"
        lines.append(
            f"| {label} | {median:.0f} ms | {longest:.0f} ms | {ratio:.1f}x | {ttft:.2f} s "
            f"({spread}) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each configuration")
    parser.add_argument("--chunk", type=int, nargs="+", default=[256])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--warm", type=int, default=8, help="tokens each stream writes first")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    args = parser.parse_args()

    from custom_handlers.inference.engine import Engine
    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.settings import LocalModelSettings

    settings = LocalModelSettings(model=args.model, prefix_cache_mb=0)
    engine = Engine(ModelHolder(lambda: settings), prefix_cache_bytes=0)
    tokenizer = engine._holder.get().tokenizer
    story = _chat(tokenizer, "Tell me a long story about a lighthouse keeper.")
    chunks = [0, *args.chunk]
    one_round(engine, story, story, 1, 8, 2, 0)  # load and warm up
    results: dict[int, list[Round]] = {chunk: [] for chunk in chunks}
    for round_ in range(args.rounds):
        for chunk in chunks if round_ % 2 == 0 else chunks[::-1]:
            ids = long_prompt(tokenizer, args.prompt_tokens, len(results[chunk]) + 10 * chunk)
            r = one_round(engine, story, ids, args.streams, args.max_tokens, args.warm, chunk)
            results[chunk].append(r)
            print(
                f"round {round_ + 1} chunk {chunk}: prompt {r.prompt} tokens, median gap "
                f"{r.median * 1000:.0f} ms, longest {r.longest * 1000:.0f} ms ({r.ratio:.1f}x), "
                f"time to first token {r.ttft:.2f} s",
                flush=True,
            )
    print(
        f"\n{args.model}: {args.streams} streams decoding (temperature 0.7, up to "
        f"{args.max_tokens} tokens), a prompt of about {args.prompt_tokens} tokens arriving; "
        f"medians over {args.rounds} rounds each"
    )
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
