"""What the sampling controls cost: the sampling step with and without rows that ask for penalties,
and end-to-end tokens/s of a batch where no row asks, this tree against another (main).

    uv run python -m bench.penalties micro [--vocab 151936] [--rows 16] [--device cpu]
    uv run python -m bench.penalties e2e --other /work/main [--rounds 5]

``micro`` times ``Engine._choose``'s work on random logits ``[rows, vocab]``: the sampling alone
(no row asks), then with a quarter and with all of the rows asking for presence, frequency and
repetition penalties, logit_bias and min_p (their counts already 200 tokens deep). ``e2e`` runs
the tiny random Qwen3 in-process, 8 greedy requests of 128 tokens at once, none asking for a
penalty, in a fresh process per round, alternating this tree and ``--other``: the same code path
must cost the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def micro(vocab: int, rows: int, device: str, steps: int) -> None:
    import torch

    from custom_handlers.inference.penalties import PenaltyCounts, RowPenalties
    from custom_handlers.inference.sampling import RowSampling, sample

    torch.manual_seed(0)

    def rows_of(asking: int) -> tuple[list[RowSampling], PenaltyCounts]:
        out, pool = [], PenaltyCounts()
        for i in range(rows):
            generator = torch.Generator(device=device).manual_seed(i)
            penalties = None
            if i < asking:
                bias = tuple((t, -5.0) for t in range(10))
                penalties = RowPenalties(0.5, 0.3, 1.1, bias, list(range(100, 400)))
            out.append(RowSampling(False, 0.7, 0.8, 20, generator, 0.05 * (i < asking), penalties))
        history = torch.randint(0, vocab, (200, rows)).tolist()
        pool.apply(torch.zeros(rows, vocab, device=device), [r.penalties for r in out])
        for tokens in history:
            pool.count([r.penalties for r in out], tokens)
        return out, pool

    def step(logits, sampled: list[RowSampling], pool: PenaltyCounts) -> None:
        penalties = [r.penalties for r in sampled]
        if any(p is not None for p in penalties):  # what Engine._choose does
            pool.apply(logits, penalties)
        tokens = sample(logits, sampled)
        if any(p is not None for p in penalties):
            pool.count(penalties, tokens)

    base = torch.randn(rows, vocab, device=device)
    cases = {"no row asks": 0, f"{rows // 4} of {rows} rows ask": rows // 4, "every row asks": rows}
    built = {name: rows_of(asking) for name, asking in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(steps):  # alternate the cases, step by step
        for name, (sampled, pool) in built.items():
            logits = base.clone()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            step(logits, sampled, pool)  # .tolist() in sample() waits for the device
            times[name].append(time.perf_counter() - started)
    counts_cost(vocab, rows, device, steps)
    print(f"sampling step, rows {rows}, vocabulary {vocab:,}, {device}, {steps} steps each")
    print("| case | median ms | p10-p90 ms | counts held |\n|---|---|---|---|")
    for name, values in times.items():
        values.sort()
        p10, p90 = values[len(values) // 10], values[len(values) * 9 // 10]
        held = built[name][1].nbytes / 2**20
        print(
            f"| {name} | {statistics.median(values) * 1e3:.2f} | {p10 * 1e3:.2f}-{p90 * 1e3:.2f} "
            f"| {held:.1f} MiB |"
        )


def counts_cost(vocab: int, rows: int, device: str, steps: int) -> None:
    """The counts one step needs, two ways: read from the dense per-slot tensor kept up to date
    (what PenaltyCounts does: a gather, then one index_put_ after sampling), or rebuilt from each
    row's list of generated ids (zeros, a host-to-device copy of the ids, a scatter_add_)."""
    import torch

    print(f"counts for {rows} rows, vocabulary {vocab:,}, {device}, {steps} steps each")
    print("| answer so far | dense: gather + update ms | rebuilt from id lists ms |")
    print("|---|---|---|")
    dense = torch.zeros(rows, vocab, device=device)
    slots = torch.arange(rows, device=device)
    for length in (200, 2000):
        lists = torch.randint(0, vocab, (rows, length)).tolist()
        took = {"dense": [], "sparse": []}
        for _ in range(steps):
            started = time.perf_counter()
            counts = dense[slots]
            tokens = torch.randint(0, vocab, (rows,), device=device)
            dense.index_put_((slots, tokens), torch.ones(rows, device=device), accumulate=True)
            float(counts[0, 0])  # waits for the device
            took["dense"].append(time.perf_counter() - started)
            started = time.perf_counter()
            ids = torch.tensor(lists, device=device)
            counts = torch.zeros(rows, vocab, device=device)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
            float(counts[0, 0])
            took["sparse"].append(time.perf_counter() - started)
        dense_ms = statistics.median(took["dense"]) * 1e3
        sparse_ms = statistics.median(took["sparse"]) * 1e3
        print(f"| {length} tokens | {dense_ms:.2f} | {sparse_ms:.2f} |")
    print()


def e2e_round(model: str) -> float:
    """One round in this process: tokens/s of 8 greedy requests of 128 tokens at once."""
    import asyncio

    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.settings import LocalModelSettings

    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=model)))
    fox = [{"role": "user", "content": "a fox in a misty forest"}]

    async def burst(max_tokens: int) -> int:
        params = {"temperature": 0, "max_tokens": max_tokens}
        asks = [
            local.acompletion(
                "x",
                [{"role": "user", "content": f"{i} {fox[0]['content']}"}],
                optional_params=dict(params),
            )
            for i in range(8)
        ]
        return sum(r.usage.completion_tokens for r in await asyncio.gather(*asks))

    asyncio.run(burst(4))  # load and warm up
    started = time.perf_counter()
    tokens = asyncio.run(burst(128))
    rate = tokens / (time.perf_counter() - started)
    local.engine.release().done.wait(30)
    return rate


def e2e(other: str, rounds: int) -> None:
    from tests.conftest import _load_builder

    scratch = Path(tempfile.mkdtemp(prefix="bench-penalties-"))
    model = str(_load_builder().build(scratch / "tiny"))
    trees = {"this tree": str(ROOT), "other": other}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
            # This file by its path; custom_handlers from ``tree`` (first on the path).
            code = (
                "import importlib.util, json, sys; "
                "spec = importlib.util.spec_from_file_location('bench_penalties', sys.argv[1]); "
                "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                "print(json.dumps(m.e2e_round(sys.argv[2])))"
            )
            out = subprocess.run(
                [sys.executable, "-c", code, __file__, model],
                env=env,
                cwd=tree,
                capture_output=True,
                text=True,
                check=True,
            )
            rates[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"tiny random Qwen3, 8 greedy requests x 128 tokens at once, no row asking; {rounds} "
        f"rounds alternated; other = {other}"
    )
    print("| tree | median tokens/s | min-max |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f}-{max(values):.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--vocab", type=int, default=151_936)
    m.add_argument("--rows", type=int, default=16)
    m.add_argument("--device", default="cpu")
    m.add_argument("--steps", type=int, default=50)
    e = sub.add_parser("e2e")
    e.add_argument("--other", required=True, help="another checkout (main) to compare with")
    e.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.what == "micro":
        micro(args.vocab, args.rows, args.device, args.steps)
    else:
        e2e(args.other, args.rounds)
