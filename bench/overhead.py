"""What the gateway adds to a one-token request: our handler against a trivial echo handler.

    uv run python -m bench.overhead [--runs 50]

One gateway serves both (the project's proxy_config.yaml plus an `echo` model backed by
bench/echo_handler.py). For each, the same one-token request is timed through the proxy and
in-process (no proxy); the difference is what the gateway adds. Streamed, the time to the first
chunk is timed through the proxy too. The model's own forward pass over
the same prompt is timed too, to show what our handler adds in-process around it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench._common import model_or_tiny, print_measures
from bench.echo_handler import echo
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM, _encode_prompt
from custom_handlers.inference.request import parse_chat_request
from custom_handlers.inference.settings import LocalModelSettings
from tests.servers import CONFIG, ROOT, Gateway

ASK = [{"role": "user", "content": "a fox in a forest"}]


def bench_config(directory: Path) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["model_list"].append(
        {
            "model_name": "echo",
            "litellm_params": {"model": "zecho/echo"},
            "model_info": {"disable_background_health_check": True},
        }
    )
    config["litellm_settings"]["custom_provider_map"].append(
        {"provider": "zecho", "custom_handler": "bench.echo_handler.echo"}
    )
    path = directory / "bench_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def through_proxy(gw: Gateway, model: str, runs: int, stream: bool = False) -> float:
    """Median ms of a one-token request; ``stream``: to the first streamed chunk."""
    body = {"model": model, "messages": ASK, "max_tokens": 1, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {gw.key}"}

    def once(http: httpx.Client) -> None:
        if not stream:
            http.post("/v1/chat/completions", json=body).raise_for_status()
            return
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            next(line for line in response.iter_lines() if line.startswith("data: {"))

    with httpx.Client(base_url=gw.base_url, headers=headers, timeout=300) as http:
        for _ in range(5):
            once(http)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            once(http)
            times.append(time.perf_counter() - started)
    return median_ms(times)


async def in_process(handler, runs: int) -> float:
    params = {"max_tokens": 1, "temperature": 0}
    for _ in range(5):
        await handler.acompletion("x", ASK, optional_params=params)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await handler.acompletion("x", ASK, optional_params=params)
        times.append(time.perf_counter() - started)
    return median_ms(times)


def forward_pass(handler: LocalLLM, runs: int) -> float:
    import torch
    from transformers import DynamicCache

    loaded = handler.holder.get()
    ids = _encode_prompt(loaded, parse_chat_request(ASK, {}))
    input_ids = torch.tensor([ids])
    times = []
    with torch.inference_mode():
        for _ in range(runs + 5):
            started = time.perf_counter()
            cache = DynamicCache(config=loaded.model.config)  # as the engine's prefill does
            loaded.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - started)
    return median_ms(times[5:])


def run(model: str, runs: int) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as work:
        gw = Gateway(
            env={"LOCAL_LLM_MODEL": model, "PYTHONPATH": str(ROOT)},
            workdir=Path(work),
            config=bench_config(Path(work)),
        )
        gw.start()
        try:
            proxy_echo = through_proxy(gw, "echo", runs)
            proxy_ours = through_proxy(gw, "qwen3-4b", runs)
            stream_echo = through_proxy(gw, "echo", runs, stream=True)
            stream_ours = through_proxy(gw, "qwen3-4b", runs, stream=True)
        finally:
            gw.stop()
    handler = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=model)))
    local_echo = asyncio.run(in_process(echo, runs))
    local_ours = asyncio.run(in_process(handler, runs))
    forward = forward_pass(handler, runs)
    return [
        (
            "echo handler: through the gateway / in-process",
            f"{proxy_echo:.1f} / {local_echo:.2f} ms",
        ),
        (
            "our handler, 1 token: through the gateway / in-process",
            f"{proxy_ours:.1f} / {local_ours:.1f} ms",
        ),
        (
            "streamed, to the first chunk: echo / our handler",
            f"{stream_echo:.1f} / {stream_ours:.1f} ms",
        ),
        ("gateway-added latency: echo", f"{proxy_echo - local_echo:.1f} ms"),
        ("gateway-added latency: our handler", f"{proxy_ours - local_ours:.1f} ms"),
        ("model forward pass over the prompt (prefill)", f"{forward:.1f} ms"),
        ("our handler in-process minus the forward pass", f"{local_ours - forward:.1f} ms"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_or_tiny(args.model, tmp)
        rows = run(model, args.runs)
    print_measures(args.model, rows, f"medians of {args.runs}")


if __name__ == "__main__":
    main()
