"""Faults and bad actors, measured: callers that hang up, and hostile inputs.

    uv run python -m bench.faults [--model DIR] [--rounds 5]

1. Hang-ups. The latency of a short request (16 tokens): on an idle gateway; sent right after
   4 callers hung up on long non-streaming requests and 4 closed their long streams; and, for
   contrast, sent while 8 long requests keep running (what it would meet if a hang-up did not
   stop the generation). Also how long the batch took to empty after the hang-ups, and how many
   tokens each abandoned generation had made of its 1900 (from the engine's log).
2. Hostile inputs (``tests/test_security.OVERSIZED``, a body nested 5000 levels, a 40 MiB body),
   sent twice over: status and time of each answer and the gateway's resident memory after it
   (first pass), then its resident and peak (VmHWM) memory after each pass.
3. The event loop: the longest wait for ``/health/liveliness`` (pinged every 20 ms) while one
   request at the gateway's limits is answered (``STALLERS``: bodies of 900,000 messages and of
   2.3 million metadata keys, bodies just under ``GATEWAY_MAX_JSON_ITEMS``, answers as large as
   ``n``, ``max_tokens`` and ``top_logprobs`` allow), and the resident memory after each.

Without --model it builds the tiny random-weight Qwen3. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import mib, model_or_tiny, print_measures, process_memory
from tests.servers import Gateway
from tests.test_local_state import ENDLESS
from tests.test_security import OVERSIZED

CHAT = "/v1/chat/completions"
FOX = [{"role": "user", "content": "a fox"}]
# A JSON array that cannot end: the request runs to exactly max_tokens unless stopped.
SHORT = {"model": "qwen3-4b", "messages": FOX, "max_tokens": 16, "response_format": ENDLESS}
LONG = {**SHORT, "max_tokens": 1900, "temperature": 1.0}


async def timed(http: httpx.AsyncClient, body: dict) -> float:
    started = time.perf_counter()
    (await http.post(CHAT, json=body)).raise_for_status()
    return time.perf_counter() - started


async def hang_up_non_streaming(http: httpx.AsyncClient) -> None:
    try:
        await http.post(CHAT, json=LONG, timeout=0.5)
    except httpx.TimeoutException:
        return  # the caller gave up: the connection is closed
    raise RuntimeError("a long request finished before the caller hung up")


async def hang_up_stream(http: httpx.AsyncClient) -> None:
    async with http.stream("POST", CHAT, json={**LONG, "stream": True}) as r:
        chunks = 0
        async for line in r.aiter_lines():
            chunks += line.startswith("data: {")
            if chunks == 2:
                return  # leaving the block closes the connection mid-stream


async def running(http: httpx.AsyncClient) -> int:
    """Requests generating now, over every local model."""
    models = (await http.get("/local/state")).json()["models"]
    return sum(m["requests"]["running"] for m in models)


async def hang_up_round(http: httpx.AsyncClient) -> tuple[float, float]:
    """Latency of a short request sent right after 8 hang-ups; seconds until the batch was empty."""
    await asyncio.gather(
        *(hang_up_non_streaming(http) for _ in range(4)), *(hang_up_stream(http) for _ in range(4))
    )
    hung_up = time.perf_counter()
    latency = await timed(http, SHORT)
    while await running(http) > 0 and time.perf_counter() - hung_up < 60:
        await asyncio.sleep(0.01)
    return latency, time.perf_counter() - hung_up


async def busy_round(http: httpx.AsyncClient) -> float:
    """Latency of a short request while 8 long requests run (they are then abandoned)."""
    long = [asyncio.create_task(http.post(CHAT, json=LONG)) for _ in range(8)]
    while await running(http) < 8:
        await asyncio.sleep(0.01)
    latency = await timed(http, SHORT)
    for task in long:
        task.cancel()
    await asyncio.gather(*long, return_exceptions=True)
    while await running(http) > 0:
        await asyncio.sleep(0.05)
    return latency


async def hang_ups(gw: Gateway, rounds: int) -> list[tuple[str, str]]:
    headers = {"Authorization": f"Bearer {gw.key}"}
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(
        base_url=gw.base_url, headers=headers, timeout=120, limits=limits
    ) as http:
        await timed(http, SHORT)  # loads the model
        idle = [await timed(http, SHORT) for _ in range(rounds * 2)]
        cancelled_before = len(gw.cancelled_counts())
        after = [await hang_up_round(http) for _ in range(rounds)]
        made = gw.cancelled_counts()[cancelled_before:]
        busy = [await busy_round(http) for _ in range(rounds)]
    return [
        (
            f"tokens made by the {len(made)} abandoned generations, of {LONG['max_tokens']} each",
            f"median {statistics.median(made):.0f}, max {max(made)}",
        ),
        ("short request (16 tokens), idle gateway, median", _ms(idle)),
        ("same, sent right after 8 callers hung up, median", _ms([a for a, _ in after])),
        ("hang-ups -> batch empty (GET /local/state), median", _ms([e for _, e in after])),
        ("same short request while 8 long requests run, median", _ms(busy)),
    ]


def _ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.0f} ms (max {max(seconds) * 1000:.0f})"


def hostile(gw: Gateway) -> list[tuple[str, str]]:
    pid = gw.process.pid
    headers = {"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json"}
    nested = b'{"model": "qwen3-4b", "messages": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    huge = b'{"model": "qwen3-4b", "messages": [{"role": "user", "content": "' + b"a" * (40 << 20)
    raw = {"body nested 5000 levels": nested, "40 MiB body": huge + b'"}]}'}
    bodies = {name: {"json": {"model": "qwen3-4b", **f}} for name, (f, _) in OVERSIZED.items()}
    bodies |= {name: {"content": content} for name, content in raw.items()}
    rows = [("resident / peak memory before", _memory(pid))]
    with httpx.Client(base_url=gw.base_url, headers=headers, timeout=120) as http:
        for attempt in (1, 2):
            for name, body in bodies.items():
                started = time.perf_counter()
                r = http.post(CHAT, **body)
                took = (time.perf_counter() - started) * 1000
                if attempt == 1:
                    rows.append((name, f"{r.status_code} in {took:.0f} ms; resident {_rss(pid)}"))
            rows.append((f"resident / peak memory after pass {attempt}", _memory(pid)))
        r = http.post(CHAT, json={**SHORT, "max_tokens": 2})
        rows.append(("a normal request afterwards", str(r.status_code)))
    return rows


def _rss(pid: int) -> str:
    return mib(process_memory(pid))


def _memory(pid: int) -> str:
    return f"{_rss(pid)} / {mib(process_memory(pid, 'VmHWM'))}"


FOX_MESSAGE = {"role": "user", "content": "fox"}
# Name -> body: at the limits a request may reach (tests/test_surface.py sends them too).
STALLERS = {
    "900,000 messages (26 MiB)": {"messages": [FOX_MESSAGE] * 900_000, "max_tokens": 2},
    "2.3 million metadata keys (27 MiB)": {
        "messages": FOX,
        "max_tokens": 2,
        "metadata": {f"k{i}": 1 for i in range(2_300_000)},
    },
    "90,000 messages (under GATEWAY_MAX_JSON_ITEMS)": {
        "messages": [FOX_MESSAGE] * 90_000,
        "max_tokens": 2,
    },
    "240,000 metadata keys (under it)": {
        "messages": FOX,
        "max_tokens": 2,
        "metadata": {f"k{i}": 1 for i in range(240_000)},
    },
    "n 8, max_tokens 1000, top_logprobs 20": {
        "messages": FOX,
        "n": 8,
        "max_tokens": 1000,
        "logprobs": True,
        "top_logprobs": 20,
    },
    "max_tokens 780, top_logprobs 20 (the largest answer allowed)": {
        "messages": FOX,
        "max_tokens": 780,
        "logprobs": True,
        "top_logprobs": 20,
        "response_format": ENDLESS,
    },
}


async def loop_held(gw: Gateway, body: dict, key: str | None) -> tuple[int, float]:
    """(status of the request, longest /health/liveliness wait while it was answered).

    The body is encoded before it is sent, so the client's own encoding (seconds for 900,000
    messages) does not delay its pings."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = json.dumps({"model": "qwen3-4b", **body}).encode()
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=300) as http:
        request = asyncio.create_task(http.post(CHAT, content=content, headers=headers))
        longest = 0.0
        while not request.done():
            started = time.perf_counter()
            await http.get("/health/liveliness")
            longest = max(longest, time.perf_counter() - started)
            await asyncio.sleep(0.02)
        return (await request).status_code, longest


def event_loop(gw: Gateway) -> list[tuple[str, str]]:
    pid = gw.process.pid
    rows = [("resident memory before", _rss(pid))]
    cases = [(name, body, gw.key) for name, body in STALLERS.items()]
    unkeyed = STALLERS["90,000 messages (under GATEWAY_MAX_JSON_ITEMS)"]
    cases.append(("90,000 messages without a key", unkeyed, None))
    for name, body, key in cases:
        status, longest = asyncio.run(loop_held(gw, body, key))
        rows.append(
            (
                f"longest liveliness wait: {name}",
                f"{longest * 1000:.0f} ms (the request: {status}); resident {_rss(pid)}",
            )
        )
    return rows


def run(model: str, rounds: int) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as work:
        gw = Gateway(env={"LOCAL_LLM_MODEL": model}, workdir=Path(work)).start()
        try:
            return asyncio.run(hang_ups(gw, rounds)) + hostile(gw) + event_loop(gw)
        finally:
            gw.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: build the tiny random Qwen3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each hang-up measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = model_or_tiny(args.model, scratch)
        print_measures(args.model, run(model, args.rounds))


if __name__ == "__main__":
    main()
