"""The gateway's local model side by side with `transformers serve --continuous-batching`.

    uv run python scripts/build_tiny_qwen3.py /tmp/mid --layers 12 --hidden 768 --context 4096
    uv run python -m bench.peer --model /tmp/mid --rounds 3

Each round starts each server afresh and measures it, the order alternating from round to round,
so that the machine's drift lands on both; the table shows each measure's median and range over
the rounds, and the ratio of the medians (``n/a`` against a zero).

Both servers load the same checkpoint, with its end-of-turn rows zeroed (a copy made here), so
greedy decoding never ends early on either and every request makes exactly the tokens it asks for:
random weights would otherwise stop at different lengths on each server. The same requests go to
each in turn over HTTP (the gateway through `litellm --config proxy_config.yaml`, transformers
serve on its own port): one client, 4/8/16 concurrent clients, time to first token, a ~2,000-token
prompt streamed and not, the same prompt seen before, four streams' gaps while a ~2,000-token
prompt joins (and its time to first token), and each server's peak memory (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import machine_line, process_memory
from tests.servers import Gateway, free_port

WORDS = "a fox in a misty forest at dawn, cinematic light, soft colours, wide angle, ".split()


def no_end_copy(model: str, out: Path) -> Path:
    """The checkpoint with the end-of-turn tokens' (tied) embedding rows set to zero."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(model, out)
    weights = AutoModelForCausalLM.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    with torch.no_grad():
        for token in ("<|im_end|>", "<|endoftext|>"):
            weights.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = 0
    weights.save_pretrained(out)
    return out


class Server:
    def __init__(self, name: str, base_url: str, model: str, pid: int):
        self.name, self.base_url, self.model, self.pid = name, base_url, model, pid
        self.headers: dict[str, str] = {}

    async def ask(
        self, http, text: str, tokens: int, stream: bool, on_piece=None
    ) -> tuple[float, float, int]:
        """(time to first content, time to the end, completion tokens) of one greedy request;
        streamed, ``on_piece(when)`` is called as each piece of content arrives."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": stream,
        }
        url = f"{self.base_url}/v1/chat/completions"
        started = time.perf_counter()
        if not stream:
            r = await http.post(url, json=body, headers=self.headers)
            r.raise_for_status()
            done = time.perf_counter() - started
            return done, done, r.json()["usage"]["completion_tokens"]
        first, pieces = None, 0
        async with http.stream("POST", url, json=body, headers=self.headers) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        now = time.perf_counter()
                        first = first or now - started
                        pieces += 1
                        if on_piece is not None:
                            on_piece(now)
        return first or 0.0, time.perf_counter() - started, pieces


async def gaps_while_a_prompt_joins(server: Server, http, tokens: int) -> tuple[float, float]:
    """4 greedy streams of ``tokens`` tokens; once each has sent 4 pieces of content, a new
    ~2,000-token prompt (streamed, 1 token). The worst stream's longest gap between two pieces
    over its median gap, from the moment all four stream; and the prompt's time to first token
    (issue 24: chunked prefill)."""
    stamps: list[list[float]] = [[] for _ in range(4)]
    started = asyncio.Event()

    def piece(i: int, when: float) -> None:
        stamps[i].append(when)
        if all(len(s) >= 4 for s in stamps):
            started.set()

    async def stream(i: int) -> None:
        await server.ask(http, prompt(7000 + i), tokens, True, lambda when: piece(i, when))

    streams = [asyncio.create_task(stream(i)) for i in range(4)]
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait([waiting, *streams], return_when=asyncio.FIRST_COMPLETED)
    if not started.is_set():
        raise RuntimeError("a stream ended before all four had started")
    since = max(s[0] for s in stamps)
    ttft, _, _ = await server.ask(http, prompt(9000, words=1500), 1, True)
    await asyncio.gather(*streams)
    worst = 0.0
    for times in stamps:
        between = [b - a for a, b in itertools.pairwise(t for t in times if t >= since)]
        worst = max(worst, max(between) / statistics.median(between))
    return worst, ttft


def prompt(i: int, words: int = 12) -> str:
    return f"request {i}: " + " ".join(WORDS[j % len(WORDS)] for j in range(words))


async def measure(server: Server, tokens: int) -> dict[str, float]:
    out: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=40)) as http:
        await server.ask(http, prompt(-1), 4, False)  # load and warm up
        started = time.perf_counter()
        _, _, made = await server.ask(http, prompt(0), tokens, False)
        out["1 client, tokens/s"] = made / (time.perf_counter() - started)
        for n in (4, 8, 16):
            started = time.perf_counter()
            results = await asyncio.gather(
                *(server.ask(http, prompt(100 * n + i), tokens, False) for i in range(n))
            )
            out[f"{n} clients, tokens/s"] = sum(r[2] for r in results) / (
                time.perf_counter() - started
            )
        ttfts = [(await server.ask(http, prompt(1000 + i), 8, True))[0] for i in range(5)]
        out["time to first token, short prompt (ms)"] = statistics.median(ttfts) * 1000
        long_text = prompt(5000, words=1500)  # about 2,000 tokens
        streamed = await server.ask(http, long_text, 4 * tokens, True)
        plain = await server.ask(http, prompt(5001, words=1500), 4 * tokens, False)
        out["~2,000-token prompt, streamed, s to the end"] = streamed[1]
        out["~2,000-token prompt, not streamed, s"] = plain[1]
        again = await server.ask(http, long_text, 1, True)
        out["the same ~2,000-token prompt again, TTFT (ms)"] = again[0] * 1000
        ratio_, ttft = await gaps_while_a_prompt_joins(server, http, 4 * tokens)
        out["4 streams while a ~2,000-token prompt joins: longest / median gap (x)"] = ratio_
        out["4 streams while a ~2,000-token prompt joins: its TTFT (s)"] = ttft
    out["peak memory (MiB)"] = process_memory(server.pid, "VmHWM") / 2**20
    return out


def start_transformers_serve(model: Path, work: Path) -> tuple[subprocess.Popen, Server]:
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "transformers"),
        "serve",
        str(model),
        "--continuous-batching",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = open(work / "transformers-serve.log", "wb")  # noqa: SIM115 (the server's life)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not _answers(f"{base_url}/health"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"transformers serve did not start: see {log.name}")
        time.sleep(0.5)
    return process, Server(
        "transformers serve --continuous-batching", base_url, str(model), process.pid
    )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory (Qwen3 or Llama)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens a request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each server once a round")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    mine: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = no_end_copy(args.model, work / "model")
        for round_ in range(args.rounds):
            # Alternate which server goes first, so that the machine's drift hits both alike.
            order = [(mine, _ours), (theirs, _theirs)]
            for figures, run in order if round_ % 2 == 0 else order[::-1]:
                place = work / f"{run.__name__.strip('_')}-{round_}"  # a fresh folder each time
                place.mkdir()
                for name, value in run(model, place, args.tokens).items():
                    figures.setdefault(name, []).append(value)
    print(machine_line(args.model, f"greedy, {args.tokens} tokens a request, float32, CPU"))
    print(
        f"{args.rounds} rounds, each server started afresh once a round, the order alternating; "
        "median (min-max) over the rounds; the ratio is of the medians"
    )
    print(
        "| measure | this gateway | transformers serve --continuous-batching | ours / theirs "
        "| better |\n|---|---|---|---|---|"
    )
    for name, values in mine.items():
        value, other = statistics.median(values), statistics.median(theirs[name])
        higher_is_better = "tokens/s" in name
        ours_better = value > other if higher_is_better else value < other
        better = "ours" if ours_better else "theirs"
        print(
            f"| {name} | {spread(values)} | {spread(theirs[name])} | {ratio(value, other)} "
            f"| {better} |"
        )


def _ours(model: Path, work: Path, tokens: int) -> dict[str, float]:
    gw = Gateway(env={"LOCAL_LLM_MODEL": str(model)}, workdir=work).start()
    ours = Server("this gateway (qwen3-4b)", gw.base_url, "qwen3-4b", gw.process.pid)
    ours.headers = {"Authorization": f"Bearer {gw.key}"}
    try:
        return asyncio.run(measure(ours, tokens))
    finally:
        gw.stop()


def _theirs(model: Path, work: Path, tokens: int) -> dict[str, float]:
    process, peer = start_transformers_serve(model, work)
    try:
        return asyncio.run(measure(peer, tokens))
    finally:
        process.terminate()
        process.wait(timeout=30)


def spread(values: list[float]) -> str:
    """The median of ``values`` and their range, as the table shows them."""
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:,.1f}"
    return f"{median:,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def ratio(ours: float, theirs: float) -> str:
    """``ours / theirs`` as the table shows it; a zero on their side (a time to first token too
    short to measure) is no ratio, not a ZeroDivisionError that loses the whole run's figures."""
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


if __name__ == "__main__":
    main()
