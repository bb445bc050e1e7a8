"""What streaming a long answer through the gateway costs over the same answer not streamed.

    uv run python -m bench.streaming [--tokens 512] [--rounds 7] [--model DIR]

One real gateway (``litellm --config proxy_config.yaml`` on loopback), one client, the same local
request each time: a JSON array that cannot end (so every answer is exactly ``--tokens`` long),
temperature 1 with a fixed seed. Rounds alternate streamed and not streamed; the table gives the
median time to the last byte of each, tokens/s, and the streamed / non-streamed ratio. Issue 14's
target: streaming costs no more than 5 % over non-streaming.
Without --model it builds the tiny random-weight Qwen3. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import model_or_tiny, print_measures
from tests.servers import Gateway
from tests.test_local_state import ENDLESS

CHAT = "/v1/chat/completions"


def timed(http: httpx.Client, body: dict) -> tuple[float, int]:
    """Seconds to the last byte, and the completion tokens the answer reports."""
    started = time.perf_counter()
    if not body.get("stream"):
        response = http.post(CHAT, json=body)
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]
    tokens = 0
    with http.stream("POST", CHAT, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if '"usage"' in line and '"completion_tokens"' in line:
                tokens = int(line.split('"completion_tokens":')[1].split(",")[0].strip(" }"))
    return time.perf_counter() - started, tokens


def run(model: str, tokens: int, rounds: int) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as scratch:
        gateway = Gateway(env={"LOCAL_LLM_MODEL": model}, workdir=Path(scratch)).start()
        headers = {"Authorization": f"Bearer {gateway.key}"}
        body = {
            "model": "qwen3-4b",
            "messages": [{"role": "user", "content": "a fox"}],
            "max_tokens": tokens,
            "temperature": 1.0,
            "seed": 1,
            "response_format": ENDLESS,
        }
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        times: dict[bool, list[float]] = {False: [], True: []}
        try:
            with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=600) as http:
                timed(http, {**body, "max_tokens": 8})  # load the model, warm up
                for _ in range(rounds):
                    for stream in (False, True):
                        seconds, made = timed(http, streamed if stream else body)
                        if made != tokens:
                            raise RuntimeError(f"an answer had {made} tokens, not {tokens}")
                        times[stream].append(seconds)
        finally:
            gateway.stop()
    plain, stream = (statistics.median(times[s]) for s in (False, True))
    rows = [("not streamed", plain), ("streamed", stream)]
    measures = [
        (f"{name}, to the last byte (median)", f"{t:.3f} s ({tokens / t:,.0f} tokens/s)")
        for name, t in rows
    ]
    return [*measures, ("streamed / not streamed", f"{stream / plain:.3f}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the tiny random Qwen3)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = model_or_tiny(args.model, scratch)
        rows = run(model, args.tokens, args.rounds)
    details = f"{args.tokens} tokens an answer, {args.rounds} rounds of each, alternating"
    print_measures(args.model, rows, details)


if __name__ == "__main__":
    main()
