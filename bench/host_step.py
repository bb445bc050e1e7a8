"""The engine's own time per decoding step, outside the forward pass (issue 23, item 4).

    uv run python -m bench.host_step [--against main] [--rounds 4] [--steps 400] [--profile]
                                     [--sampling-vocab 151936] [--seeded] [--unseeded]

Runs the real ``Engine`` in-process on the tiny random Qwen3 (scripts/build_tiny_qwen3.py), 16
requests decoding together with the checkpoint's sampling defaults (temperature 0.7, top_p 0.8,
top_k 20; no penalty, constraint or logprobs; end-of-turn ends nothing, so the 16 rows stay), in
the graph path's "static" mode (as on CUDA: the forward is what a graph would replay). For each
decoding step it takes:

- ``step``: ``Engine._step`` from entry to return (inputs to the device, the forward, sampling,
  the chosen ids back, each row's text pipeline and events);
- ``forward``: ``decode.decode_forward`` within it (the model's forward and its mask: what a CUDA
  graph replays);
- ``host``: ``step - forward``, the engine's own work, and ``loop``: the same from one step's
  start to the next one's (the thread's whole loop: joining, leaving, the step).

Each round is a fresh process; rounds alternate this tree and ``--against`` (a git revision whose
``custom_handlers`` is taken with ``git archive``), and the table gives each tree's median and
p90 over its rounds' steady steps (16 rows, the first 20 steps of a round left out), with the
rounds' spread. ``--profile`` prints where this tree's host time goes (cProfile of the engine
thread's steps, forward excluded by subtraction: read the cumulative column; with
``HOST_STEP_SORT=tottime`` in the environment, sorted by each function's own time);
``--sampling-vocab`` also times the sampling alone, on random logits of that vocabulary;
``--seeded`` compares the trees' answers to seeded requests (``SEEDED``), alone and in one batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = 16
UNSEEDED = False  # --unseeded: the 16 requests carry no seed (most requests; one noise draw)
SKIP = 20  # first steps of a round left out (joining, first captures, warm-up)


def one_round(model: str, steps: int, profile: bool = False) -> dict:
    """One round in this process: per steady step, step / forward / loop times in seconds."""
    import asyncio
    import cProfile
    import dataclasses
    import io
    import pstats

    import torch

    from custom_handlers.inference import decode
    from custom_handlers.inference.jobs import Done, Job
    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.request import SamplingParams
    from custom_handlers.inference.settings import LocalModelSettings

    torch.set_num_threads(1)
    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=model, max_batch_size=ROWS)))
    local.engine.draft_tokens = 0  # one-token steps only: drafts make steps of several tokens
    engine = local.engine
    engine.graph_mode = "static"
    loaded = local.holder.get()
    local.holder._loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())
    spent = {"forward": 0.0, "choose": 0.0, "advance": 0.0}  # within the step running
    records, profiler = [], cProfile.Profile() if profile else None
    real_step = engine._step

    def timed(name: str, function):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started

        return run

    def timed_step() -> None:
        rows = len(engine.scheduler.rows)
        spent.update(forward=0.0, choose=0.0, advance=0.0)
        if profiler is not None:
            profiler.enable()
        started = time.perf_counter()
        real_step()
        ended = time.perf_counter()
        if profiler is not None:
            profiler.disable()
        records.append((rows, started, ended - started, dict(spent)))

    # decode_forward: what a CUDA graph replays; choose: sampling and the chosen ids back;
    # advance: each row's text pipeline, stop strings, events.
    decode.decode_forward = timed("forward", decode.decode_forward)
    engine.outputs.choose = timed("choose", engine.outputs.choose)
    engine.outputs.advance = timed("advance", engine.outputs.advance)
    engine._step = timed_step

    class Quiet:  # events are dropped: no reader thread competes with the engine's
        def __init__(self) -> None:
            self.done = False

        def put(self, event) -> None:
            self.done = self.done or isinstance(event, Done)

    prompts = [loaded.tokenizer.encode(f"a fox number {i} " * (1 + i)) for i in range(ROWS)]
    unseeded = os.environ.get("HOST_STEP_UNSEEDED") == "1"  # --unseeded: requests without a seed
    jobs = [
        Job(p, SamplingParams(seed=None if unseeded else i), steps + SKIP, Quiet())
        for i, p in enumerate(prompts)
    ]
    # Hold the engine until all have been queued: they join together.
    for job in jobs:
        engine.scheduler.jobs.put(job)
    engine._ensure_thread()
    deadline = time.monotonic() + 600
    while not all(job.sink.done for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    asyncio.run(local.release())
    steady = [r for r in records if r[0] == ROWS][SKIP:]
    out = {
        "step": [r[2] for r in steady],
        **{name: [r[3][name] for r in steady] for name in spent},
        "loop": [b[1] - a[1] - a[3]["forward"] for a, b in itertools.pairwise(steady)],
    }
    out["code"] = decode.__file__  # which tree's custom_handlers ran
    if profiler is not None:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)  # HOST_STEP_SORT=tottime: by own time
        stats.sort_stats(os.environ.get("HOST_STEP_SORT", "cumulative")).print_stats(30)
        out["profile"] = text.getvalue()
    return out


def sampling_round(vocab: int, steps: int = 30) -> dict:
    """Sampling alone, 16 rows with the checkpoint's defaults on random logits ``[16, vocab]``:
    the tree's steady path (a kept ``BatchSampling`` where the tree has one, else ``sample``)."""
    import torch

    from custom_handlers.inference import sampling

    torch.set_num_threads(1)
    rows = [
        sampling.RowSampling(False, 0.7, 0.8, 20, torch.Generator().manual_seed(i))
        for i in range(ROWS)
    ]
    if os.environ.get("HOST_STEP_UNSEEDED") == "1":  # a tree whose rows know they have no seed
        for row in rows:
            if hasattr(row, "seeded"):
                row.seeded = False
    logits = torch.randn(ROWS, vocab)
    if hasattr(sampling, "BatchSampling"):
        kept = sampling.BatchSampling(rows)
        choose = lambda: kept.choose(logits).tolist()  # noqa: E731
    else:
        choose = lambda: sampling.sample(logits, rows)  # noqa: E731
    times = []
    with torch.inference_mode():
        for _ in range(steps + 3):
            started = time.perf_counter()
            choose()
            times.append(time.perf_counter() - started)
    return {"sampling": times[3:]}


SEEDED = [  # seeded requests for --seeded: each sampling path, with greedy and penalised rows
    {"seed": 1, "max_tokens": 40},  # the checkpoint's defaults: top_k 20, a topk of 20
    {"seed": 2, "max_tokens": 40, "top_k": 0, "top_p": 0.9},  # no top_k: the whole vocabulary
    {"seed": 3, "max_tokens": 40, "temperature": 1.2, "min_p": 0.05, "top_k": 50},
    {"seed": 4, "max_tokens": 40, "temperature": 1.0, "top_p": 1.0, "n": 3},
    {"seed": 5, "max_tokens": 40, "top_k": 5},
    {"temperature": 0, "max_tokens": 40},
    {"seed": 6, "max_tokens": 40, "presence_penalty": 1.0, "top_k": 30},
]


def seeded_round(model: str) -> dict:
    """The answers to ``SEEDED``, one after another and then all together (one batch)."""
    import asyncio

    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.settings import LocalModelSettings

    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=model)))

    def ask(i: int, body: dict):
        messages = [{"role": "user", "content": f"a fox number {i} " * (i + 1)}]
        return local.acompletion("x", messages, optional_params=dict(body))

    async def run(together: bool) -> list:
        if together:
            out = await asyncio.gather(*(ask(i, b) for i, b in enumerate(SEEDED)))
        else:
            out = [await ask(i, b) for i, b in enumerate(SEEDED)]
        return [[(c.message.content, c.finish_reason) for c in r.choices] for r in out]

    return {"alone": asyncio.run(run(False)), "together": asyncio.run(run(True))}


def _tree_of(revision: str) -> str:
    """``custom_handlers`` of ``revision``, extracted to a temporary folder."""
    folder = tempfile.mkdtemp(prefix=f"host-step-{revision.replace('/', '-')}-")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "custom_handlers"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def _run_round(tree: str, model: str, steps: int, profile: bool, vocab: int = 0) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": tree,  # its custom_handlers first on the path
        "OMP_NUM_THREADS": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "HOST_STEP_UNSEEDED": "1" if UNSEEDED else "0",
    }
    code = (
        "import importlib.util, json, sys; "
        "spec = importlib.util.spec_from_file_location('bench_host_step', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "vocab = int(sys.argv[5]); "
        "print(json.dumps(m.sampling_round(vocab) if vocab > 0 else m.seeded_round(sys.argv[2]) "
        "if vocab < 0 else m.one_round(sys.argv[2], int(sys.argv[3]), sys.argv[4] == '1')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, __file__, model, str(steps), str(int(profile)), str(vocab)],
        env=env,
        cwd=tree,  # first on the path too (python -c puts the working directory first)
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="main", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400, help="decoding steps per round")
    parser.add_argument("--profile", action="store_true", help="where this tree's time goes")
    parser.add_argument(
        "--sampling-vocab",
        type=int,
        default=0,
        help="also time the sampling alone on random logits of this vocabulary (151936: Qwen3)",
    )
    parser.add_argument(
        "--seeded", action="store_true", help="also compare the trees' answers to seeded requests"
    )
    parser.add_argument(
        "--unseeded", action="store_true", help="the 16 requests without a seed (else seeds 0-15)"
    )
    args = parser.parse_args()
    global UNSEEDED
    UNSEEDED = args.unseeded
    from tests.conftest import _load_builder

    model = str(_load_builder().build(Path(tempfile.mkdtemp(prefix="host-step-")) / "tiny"))
    trees = {"this tree": str(ROOT)}
    if args.against:
        trees[args.against] = _tree_of(args.against)
    rounds: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            rounds[name].append(_run_round(tree, model, args.steps, False))
    print(
        f"Engine._step, {ROWS} sampled rows (checkpoint defaults), tiny random Qwen3, CPU, one "
        f"thread; {args.rounds} rounds alternated, {args.steps} steps each (first {SKIP} left out)"
        f"; requests {'without a seed' if UNSEEDED else 'seeded'}"
    )
    print(
        "| tree | host ms median (rounds' medians) | host ms p90 | loop ms | step ms | forward ms "
        "| sampling ms | text ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    keys = ("step", "forward", "loop", "choose", "advance")
    for name, results in rounds.items():
        every = {key: [v for r in results for v in r[key]] for key in keys}
        host = [s - f for s, f in zip(every["step"], every["forward"], strict=True)]
        per_round = [
            statistics.median(s - f for s, f in zip(r["step"], r["forward"], strict=True)) * 1e3
            for r in results
        ]
        print(
            f"| {name} | {_ms(host, 0.5):.3f} ({min(per_round):.3f}-{max(per_round):.3f}) "
            f"| {_ms(host, 0.9):.3f} | {_ms(every['loop'], 0.5):.3f} "
            f"| {_ms(every['step'], 0.5):.3f} | {_ms(every['forward'], 0.5):.3f} "
            f"| {_ms(every['choose'], 0.5):.3f} | {_ms(every['advance'], 0.5):.3f} |"
        )
    print("Code:", {name: results[0]["code"] for name, results in rounds.items()})
    if args.sampling_vocab:
        vocab = args.sampling_vocab
        print(f"\nSampling alone, {ROWS} rows, vocabulary {vocab:,}, CPU, one thread:")
        print("| tree | median ms | p10-p90 ms |\n|---|---|---|")
        for name, tree in trees.items():
            times = _run_round(tree, model, 0, False, vocab)["sampling"]
            spread = f"{_ms(times, 0.1):.2f}-{_ms(times, 0.9):.2f}"
            print(f"| {name} | {_ms(times, 0.5):.2f} | {spread} |")
    if args.seeded:
        answers = {name: _run_round(tree, model, 0, False, -1) for name, tree in trees.items()}
        first = next(iter(answers.values()))
        for name, got in list(answers.items())[1:]:
            same = {when: got[when] == first[when] for when in ("alone", "together")}
            print(f"\nSeeded answers ({len(SEEDED)} requests), this tree against {name}: {same}")
        print(
            "Alone and together the same on each tree:",
            [a["alone"] == a["together"] for a in answers.values()],
        )
    if args.profile:
        print(_run_round(str(ROOT), model, args.steps, True)["profile"])


if __name__ == "__main__":
    main()
