"""Gateway start-up, first-request and decode figures for the local model, through the real proxy.

    uv run python -m bench.gateway_smoke [--model DIR] [--runs 20] [--tokens 256]

Without --model it builds the tiny random-weight Qwen3 (scripts/build_tiny_qwen3.py) first.
Prints a Markdown table; figures go into docs/benchmarks.md with the command and the machine.
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


def _post(gw: Gateway, body: dict, client: httpx.Client) -> tuple[float, dict]:
    started = time.perf_counter()
    r = client.post(f"{gw.base_url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - started, r.json()


def _ttft(gw: Gateway, body: dict, client: httpx.Client) -> float:
    started = time.perf_counter()
    with client.stream(
        "POST", f"{gw.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=600
    ) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                return time.perf_counter() - started
    raise RuntimeError("stream ended without content")


def run(model: str, runs: int, tokens: int) -> list[tuple[str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as work:
        gw = Gateway(env={"LOCAL_LLM_MODEL": model}, workdir=Path(work))
        started = time.perf_counter()
        gw.start()
        rows.append(
            ("gateway start -> /health/liveliness", f"{time.perf_counter() - started:.1f} s")
        )
        try:
            headers = {"Authorization": f"Bearer {gw.key}"}
            with httpx.Client(headers=headers) as client:
                one = {
                    "model": "qwen3-4b",
                    "max_tokens": 1,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": "a fox"}],
                }
                first, _ = _post(gw, one, client)
                rows.append(("first request (loads the model), 1 token", f"{first:.2f} s"))
                warm = [_post(gw, one, client)[0] for _ in range(runs)]
                rows.append(
                    (
                        f"warm 1-token request, median of {runs}",
                        f"{statistics.median(warm) * 1000:.1f} ms",
                    )
                )
                ttft = [_ttft(gw, {**one, "max_tokens": 8}, client) for _ in range(runs)]
                rows.append(
                    (
                        f"time to first streamed token, median of {runs}",
                        f"{statistics.median(ttft) * 1000:.1f} ms",
                    )
                )
                rates = []
                for seed in range(3):
                    body = {**one, "max_tokens": tokens, "temperature": 1.0, "seed": seed}
                    elapsed, answer = _post(gw, body, client)
                    rates.append(answer["usage"]["completion_tokens"] / elapsed)
                rows.append(
                    (
                        f"decode, one client, up to {tokens} tokens (best of 3)",
                        f"{max(rates):.0f} tokens/s",
                    )
                )
        finally:
            gw.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: build the tiny test model)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_tiny(args.model, tmp)
        rows = run(model, args.runs, args.tokens)
    print_measures(args.model, rows)


if __name__ == "__main__":
    main()
