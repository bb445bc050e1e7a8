"""Soak: a long, bounded, mixed workload against the real gateway; did it stay up and answer all?

    uv run python -m bench.soak [--requests 20000] [--clients 4] [--model DIR]

Starts the real gateway (``litellm --config proxy_config.yaml`` on a loopback port, with
``PYTHONFAULTHANDLER=1``) with the local model as ``qwen3-4b`` and a fake OpenAI upstream behind
``gpt-4o-mini``, then sends ``--requests`` requests that cycle through these kinds:

- ``stream``, ``json_object``, ``empty`` (``messages: []``, answered 400), ``seeded``
  (``temperature: 1``, ``seed``), ``plain``: the five kinds of issue 11's crash, ``max_tokens`` 8;
- ``json_schema``: a bounded schema; ``hang-up``: a stream the caller closes after its first chunk
  while the generation would go on for 200 tokens; ``cloud`` and ``cloud-stream``: ``gpt-4o-mini``.

Rounds of ``--report-every`` requests alternate between one client (one request at a time, as in
the issue) and ``--clients`` clients at once. After each round it prints the gateway's resident
memory. It exits non-zero if the gateway died, if a request went unanswered (no status within
``--timeout`` seconds, or the connection dropped), if one got a status its kind never gets, or if
memory grew by more than ``--max-growth-mib`` after the first fifth of the run.
Without --model it builds the tiny random-weight Qwen3. Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench._common import MiB, machine_line, mib, model_or_tiny, process_memory
from tests.servers import FakeOpenAI, Gateway
from tests.test_local_state import ENDLESS

CHAT = "/v1/chat/completions"
FOX = [{"role": "user", "content": "a fox"}]
VALUES = {
    "type": "json_schema",
    "json_schema": {
        "name": "values",
        "schema": {
            "type": "object",
            "properties": {
                "values": {
                    "type": "array",
                    "maxItems": 3,
                    "items": {"type": "string", "maxLength": 12},
                }
            },
            "required": ["values"],
            "additionalProperties": False,
        },
    },
}
# kind -> (request body for request number i, the statuses that kind may get)
KINDS = {
    "stream": (lambda i: {"stream": True}, {200}),
    "json_object": (lambda i: {"response_format": {"type": "json_object"}}, {200}),
    "empty": (lambda i: {"messages": []}, {400}),
    "seeded": (lambda i: {"temperature": 1.0, "seed": i}, {200}),
    "plain": (lambda i: {}, {200}),
    "json_schema": (lambda i: {"response_format": VALUES, "max_tokens": 48}, {200}),
    "hang-up": (
        lambda i: {"stream": True, "max_tokens": 200, "response_format": ENDLESS},
        {200},
    ),
    "cloud": (lambda i: {"model": "gpt-4o-mini"}, {200}),
    "cloud-stream": (lambda i: {"model": "gpt-4o-mini", "stream": True}, {200}),
}
ORDER = list(KINDS)


def request_body(kind: str, i: int) -> dict:
    make, _ = KINDS[kind]
    return {"model": "qwen3-4b", "messages": FOX, "max_tokens": 8, **make(i)}


@dataclass
class Tally:
    """What came back: per kind and status, the unanswered, and memory after each round."""

    statuses: Counter = field(default_factory=Counter)  # (kind, status) -> count
    unanswered: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    memory: list[tuple[int, int]] = field(default_factory=list)  # (requests sent, RSS bytes)
    sent: int = 0

    def record(self, kind: str, i: int, status: int | str) -> None:
        self.statuses[(kind, status)] += 1
        if isinstance(status, str):
            self.unanswered.append(f"#{i} {kind}: {status}")
        elif status not in KINDS[kind][1]:
            self.unexpected.append(f"#{i} {kind}: HTTP {status}")


async def send(http: httpx.AsyncClient, kind: str, i: int) -> int | str:
    """The status the gateway answered with, or why there was none."""
    body = request_body(kind, i)
    try:
        if not body.get("stream"):
            return (await http.post(CHAT, json=body)).status_code
        async with http.stream("POST", CHAT, json=body) as response:
            async for line in response.aiter_lines():
                if kind == "hang-up" and line.startswith("data: {"):
                    break  # closing the response here hangs up mid-stream
            return response.status_code
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


async def run_round(gateway: Gateway, tally: Tally, numbers: range, clients: int, timeout: float):
    pending = iter(numbers)

    async def client() -> None:
        headers = {"Authorization": f"Bearer {gateway.key}"}
        async with httpx.AsyncClient(
            base_url=gateway.base_url, headers=headers, timeout=timeout
        ) as http:
            for i in pending:
                kind = ORDER[i % len(ORDER)]
                tally.record(kind, i, await send(http, kind, i))
                tally.sent += 1

    await asyncio.gather(*(client() for _ in range(clients)))


async def soak(
    gateway: Gateway,
    requests: int,
    clients: int = 4,
    report_every: int = 500,
    timeout: float = 60.0,
    progress=print,
) -> Tally:
    """Send ``requests`` mixed requests in rounds; stop early if the gateway process dies."""
    tally = Tally()
    started = time.monotonic()
    for round_number in itertools.count():
        first = round_number * report_every
        if first >= requests or gateway.process.poll() is not None:
            break
        numbers = range(first, min(first + report_every, requests))
        at_once = 1 if round_number % 2 == 0 else clients
        await run_round(gateway, tally, numbers, at_once, timeout)
        if gateway.process.poll() is not None:
            break
        rss = process_memory(gateway.process.pid)
        tally.memory.append((tally.sent, rss))
        progress(
            f"{tally.sent:>7,} requests  {time.monotonic() - started:7.1f} s  "
            f"{at_once} client(s)  RSS {mib(rss)}  unanswered {len(tally.unanswered)}"
        )
    return tally


def memory_growth(tally: Tally) -> int:
    """RSS at the end minus RSS after the first fifth of the run (warm-up left out)."""
    if len(tally.memory) < 2:
        return 0
    baseline = tally.memory[max(0, len(tally.memory) // 5 - 1)][1]
    return tally.memory[-1][1] - baseline


def verdict(gateway: Gateway, tally: Tally, requests: int, max_growth: int) -> list[str]:
    """What went wrong, if anything: one line each."""
    problems = []
    if (code := gateway.process.poll()) is not None:
        fatal = [line for line in gateway.log().splitlines() if "Fatal Python error" in line]
        problems.append(f"the gateway died (exit status {code}) {' '.join(fatal[:1])}".strip())
    if tally.sent < requests:
        problems.append(f"only {tally.sent:,} of {requests:,} requests were sent")
    problems += [f"unanswered: {u}" for u in tally.unanswered[:10]]
    problems += [f"unexpected status: {u}" for u in tally.unexpected[:10]]
    if (growth := memory_growth(tally)) > max_growth:
        problems.append(f"memory grew by {mib(growth)} after warm-up (limit {mib(max_growth)})")
    return problems


def report(tally: Tally, seconds: float) -> str:
    lines = ["| kind | status | requests |", "|---|---|---:|"]
    for (kind, status), count in sorted(tally.statuses.items(), key=lambda kv: str(kv[0])):
        lines.append(f"| {kind} | {status} | {count:,} |")
    lines.append(f"| all | | {tally.sent:,} in {seconds:.0f} s ({tally.sent / seconds:.0f}/s) |")
    lines += ["", "| requests sent | gateway RSS |", "|---:|---:|"]
    lines += [f"| {sent:,} | {mib(rss)} |" for sent, rss in tally.memory]
    lines.append(f"\nGrowth after the first fifth: {mib(memory_growth(tally))}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--report-every", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--max-growth-mib", type=float, default=256.0)
    parser.add_argument("--model", help="checkpoint directory (default: the tiny random Qwen3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = model_or_tiny(args.model, scratch)
        upstream = FakeOpenAI().start()
        env = upstream.gateway_env(model, PYTHONFAULTHANDLER="1")
        gateway = Gateway(env=env, workdir=Path(scratch) / "gateway").start()
        started = time.monotonic()
        try:
            tally = asyncio.run(
                soak(gateway, args.requests, args.clients, args.report_every, args.timeout)
            )
            problems = verdict(gateway, tally, args.requests, int(args.max_growth_mib * MiB))
        finally:
            gateway.stop()
            upstream.stop()
    print(machine_line(args.model, f"{args.clients} clients in every other round"))
    print(report(tally, time.monotonic() - started))
    for problem in problems:
        print(f"FAILED: {problem}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
