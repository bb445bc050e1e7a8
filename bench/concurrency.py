"""Aggregate tokens/s and time to first token at 1, 4, 8 and 32 concurrent clients.

    uv run python -m bench.concurrency [--model DIR] [--tokens 64] [--requests 2]

Through the gateway (continuous batching), against the same model driven straight by transformers
`generate` in this process: one request at a time, and all prompts as one padded batch. Each
client sends --requests streaming requests one after another, each asking --tokens tokens with
temperature 1 and its own seed. Without --model it builds the tiny random-weight Qwen3 first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import machine_line, model_or_tiny
from tests.servers import Gateway

CLIENTS = (1, 4, 8, 32)


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"a fox number {i} in a misty forest, cinematic"}]


async def one_request(http: httpx.AsyncClient, i: int, tokens: int, extra: dict):
    body = {
        "model": "qwen3-4b",
        "messages": prompt(i),
        "max_tokens": tokens,
        "temperature": 1.0,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    started, first, used = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return first, used


async def clients(gw: Gateway, n: int, requests: int, tokens: int, extra: dict):
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(
        base_url=gw.base_url,
        timeout=600,
        limits=limits,
        headers={"Authorization": f"Bearer {gw.key}"},
    ) as http:

        async def client(c: int):
            return [
                await one_request(http, c * requests + r, tokens, extra) for r in range(requests)
            ]

        started = time.perf_counter()
        results = [x for per in await asyncio.gather(*(client(c) for c in range(n))) for x in per]
        wall = time.perf_counter() - started
    ttfts = sorted(t for t, _ in results)
    return sum(u for _, u in results) / wall, _pct(ttfts, 50), _pct(ttfts, 95)


def _pct(values: list[float], p: int) -> float:
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] * 1000


def direct(model_dir: str, n: int, tokens: int) -> tuple[float, float]:
    """tokens/s of transformers generate: n prompts one at a time, then as one padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    texts = [
        tok.apply_chat_template(
            prompt(i), tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for i in range(n)
    ]
    kwargs = dict(
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    with torch.inference_mode():
        model.generate(**tok(texts[:1], return_tensors="pt").to(device), **kwargs)  # warm-up
        started = time.perf_counter()
        for text in texts:
            model.generate(**tok([text], return_tensors="pt").to(device), **kwargs)
        sequential = n * tokens / (time.perf_counter() - started)
        batch = tok(texts, return_tensors="pt", padding=True).to(device)
        started = time.perf_counter()
        model.generate(**batch, **kwargs)
        padded = n * tokens / (time.perf_counter() - started)
    return sequential, padded


def run(model: str, tokens: int, requests: int, work: Path) -> list[str]:
    gw = Gateway(env={"LOCAL_LLM_MODEL": model, "LOCAL_LLM_MAX_BATCH_SIZE": "32"}, workdir=work)
    gw.start()
    rows = []
    try:
        asyncio.run(clients(gw, 1, 1, 4, {}))  # load the model
        for n in CLIENTS:
            rate, p50, p95 = asyncio.run(clients(gw, n, requests, tokens, {}))
            sequential, padded = direct(model, n, tokens)
            rows.append(
                f"| {n} | {rate:.0f} | {p50:.0f} / {p95:.0f} | {sequential:.0f} | {padded:.0f} |"
            )
        schema = {"type": "array", "items": {"type": "string"}, "minItems": 100000}
        fmt = {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "b", "schema": schema},
            }
        }
        rate, p50, p95 = asyncio.run(clients(gw, 8, requests, tokens, fmt))
        rows.append(f"| 8, JSON-constrained | {rate:.0f} | {p50:.0f} / {p95:.0f} | | |")
    finally:
        gw.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_tiny(args.model, tmp)
        rows = run(model, args.tokens, args.requests, Path(tmp))
    print(machine_line(args.model, f"{args.tokens} tokens a request, {args.requests} a client"))
    print(
        "| clients | gateway tokens/s | gateway TTFT p50 / p95 (ms) | generate, one at a time "
        "(tokens/s) | generate, one padded batch (tokens/s) |\n|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
