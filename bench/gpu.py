"""The GPU benchmark: one command for the day a GPU is lent (docs/benchmarks.md, "GPU").

    python -m bench.gpu [--device cuda] [--out DIR]     # on the GPU machine, < 8 minutes
    uv run python -m bench.gpu --device cpu --out DIR  # here: a small model, same table
    python -m bench.gpu --preflight                     # only the versions, and whether they import

It drives the engine in-process (no LiteLLM, no web server: the GPU machine has neither) on
random weights it builds itself (no download): Qwen3-4B's shape in bfloat16 on CUDA, a small
Qwen3 on the CPU. For each variant (bfloat16; bitsandbytes 4-bit when CUDA is there) it measures:

- the device, and one greedy request decoded eagerly and from CUDA graphs: the same token ids
  (on the CPU the graphs are off, so the comparison is skipped and the row says why);
- single-stream decode tokens/s, against the bound the device's memory bandwidth sets (measured
  with a device-to-device copy: each token reads every weight once);
- aggregate tokens/s at 1, 8 and 16 concurrent requests, and the time to first token (TTFT) of
  1, 8 and 16 requests arriving together;
- 8 concurrent JSON-constrained requests (an array that cannot end, so each runs its full length);
- the TTFT of a ~2,000-token prompt, cold and then again (prefix reuse: the second prefills one
  token);
- ``transformers`` ``generate`` on the same weights, one stream, greedy: the in-process floor,
  against the engine's own greedy single stream (both from submit to the last token);
- single-stream and 16-concurrent decoding with CUDA graphs on (the default, every row above) and
  off;
- device memory before load, after load, at peak, and after the model is released (measured once
  every reference to the model is gone).

The run cannot come back empty. A preflight first prints the versions it runs on (torch, CUDA,
transformers, tokenizers, safetensors, pydantic and the rest of the carried set) and stops at
once, with one line saying what, if one of them cannot import. Each column then runs in its own
process, under a time budget (``--column-budget``; the whole run stays within ``--budget``): a
column that raises, runs out of memory, dies or passes its budget is stopped, its last row says
so in one line, and the next column runs. Every figure is written to the output folder as soon
as it is measured (``gpu.md``, the table so far, and ``gpu.jsonl``, one line a figure), so a run
stopped from outside keeps what it measured.

Random weights rarely produce text the test tokenizer can show, so times are taken from the
engine's ``Finish`` and ``Done`` events, and token counts from ``Finish.completion_tokens``. They
also end a turn at random points, so here end-of-turn ends nothing: every request runs its full
length, as ``generate(min_new_tokens=...)`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when used: the preflight must run before any of them
    from custom_handlers.inference.engine import Engine
    from custom_handlers.inference.loader import LoadedModel, ModelHolder
    from custom_handlers.inference.settings import LocalModelSettings

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
ENDLESS = json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 100000})
# Issue 24's grammar fast-forward: items whose keys, quotes and enums' rests the grammar forces.
FORCING = json.dumps(
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "subject": {"type": "string", "maxLength": 8},
                "style": {"enum": ["photographic", "watercolor painting", "ink drawing"]},
            },
            "required": ["subject", "style"],
            "additionalProperties": False,
        },
        "minItems": 100000,
    }
)
IDS_TOKENS = 64  # the graphs-against-eager check's greedy request, at most
MIN_COLUMN_S = 20.0  # a column is not started with less of the run's budget left
EXIT_GRACE_S = 20.0  # a column's process that reported its end and does not exit is killed
# Seconds: the whole run (from the start, the model's build included), and each column at most.
BUDGETS = {"cuda": (450.0, 210.0), "cpu": (1200.0, 600.0)}


@dataclass
class Result:
    seconds: float  # submit to Done
    tokens: int  # completion tokens


def run_jobs(
    engine: Engine, prompts: list[list[int]], tokens: int, grammar=None, temperature: float = 1.0
) -> list[Result]:
    """Submit one job per prompt at once; wait for all. Each job samples (temperature 1, seeded;
    0: greedy)."""
    from custom_handlers.inference.jobs import Done, Failed, Finish, Job, SyncSink
    from custom_handlers.inference.request import SamplingParams

    jobs = [
        Job(p, SamplingParams(temperature=temperature, seed=i), tokens, SyncSink(), grammar)
        for i, p in enumerate(prompts)
    ]
    results: list[Result | Failed | None] = [None] * len(jobs)

    def wait(i: int, job: Job, started: float) -> None:
        count = 0
        while not isinstance(event := job.sink.get(), Done):
            if isinstance(event, Finish):
                count += event.completion_tokens
            elif isinstance(event, Failed):
                results[i] = event
        results[i] = results[i] or Result(time.perf_counter() - started, count)

    started = time.perf_counter()
    threads = []
    for i, job in enumerate(jobs):
        engine.submit(job)
        threads.append(threading.Thread(target=wait, args=(i, job, started)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    if failed := [r for r in results if not isinstance(r, Result)]:
        raise RuntimeError(f"{len(failed)} of {len(jobs)} jobs failed: {failed[0]}")
    return results


def noting_engine(*args: Any, **kwargs: Any) -> Engine:
    """The engine, noting the token ids sampled for the jobs put in its ``noted`` (by ``id``):
    the graphs-against-eager check compares them. Events carry text, not ids."""
    from custom_handlers.inference.engine import Engine

    engine = Engine(*args, **kwargs)
    engine.noted = {}
    advance = engine.outputs.advance

    def noting(rows, tokens, eos):  # every sampled token passes here, the first too
        for row, token in zip(rows, tokens, strict=True):
            ids = engine.noted.get(id(row.job))
            if ids is not None and row.index == 0 and not row.done and not row.job.cancelled:
                ids.append(token)
        advance(rows, tokens, eos)

    engine.outputs.advance = noting
    return engine


class Device:
    """Memory figures and synchronisation for CUDA or the CPU."""

    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.cuda = name == "cuda"
        if self.cuda:
            torch.zeros(1, device="cuda")  # the CUDA context, so "before load" excludes nothing

    def describe(self) -> str:
        torch = self.torch
        if self.cuda:
            total = torch.cuda.mem_get_info()[1]
            return (
                f"{torch.cuda.get_device_name()}, {total / 1024**3:,.1f} GiB, torch "
                f"{torch.__version__} (CUDA {torch.version.cuda})"
            )
        threads = torch.get_num_threads()
        return f"CPU ({platform.machine()}, {threads} threads), torch {torch.__version__}"

    def used(self) -> int:
        """CUDA: bytes in use on the whole device (this process's context included); CPU: RSS."""
        if self.cuda:
            free, total = self.torch.cuda.mem_get_info()
            return total - free
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def bandwidth(self) -> float | None:
        """Bytes/s of a device-to-device copy of 2 GiB (read + write), best of 5."""
        if not self.cuda:
            return None
        torch = self.torch
        source = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
        target = torch.empty_like(source)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            started = time.perf_counter()
            target.copy_(source)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        del source, target
        torch.cuda.empty_cache()
        return 2 * 2 * 1024**3 / best


def build_model(device: str, scratch: Path) -> Path:
    spec = importlib.util.spec_from_file_location("builder", ROOT / "scripts/build_tiny_qwen3.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    if device == "cuda":
        return builder.build(
            scratch / "qwen3-4b-shape", qwen3_4b_shape=True, dtype="bfloat16", context=8192
        )
    return builder.build(scratch / "small-qwen3", layers=4, context=4096)


# ---- one column, in its own process ------------------------------------------------------------


class Cells:
    """Where a column puts its figures, each as soon as it is measured: to the parent process
    (``send``), which writes it to the output folder at once."""

    def __init__(self, send: Callable[[tuple], None]):
        self._send = send

    def __call__(self, key: str, value: str) -> None:
        self._send(("cell", key, value))

    def measuring(self, key: str) -> None:
        """The row measured from now on (a failure or the budget's end names it)."""
        self._send(("measuring", key))


def measure_column(
    cells: Cells, path: str, device: str, quantization: str, dtype: str, tokens: int
) -> None:
    """Load, measure, release: one column of the table. Every reference to the model lives in
    ``_measure_loaded``'s frame, gone when "after release" is measured."""
    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.settings import LocalModelSettings

    cells.measuring("device")
    on = Device(device)
    cells("device", on.describe())
    settings = LocalModelSettings(
        model=path, device=device, dtype=dtype, quantization=quantization, keep_alive=-1
    )
    holder = ModelHolder(lambda: settings)
    engine = noting_engine(
        holder,
        32,
        128,
        keep_alive=-1,
        prefix_cache_bytes=int(settings.prefix_cache_mb * 2**20),  # the gateway's defaults:
        kv_cache_bytes=int(settings.kv_cache_mb * 2**20),  # reuse on, and the KV pool's budget
        prefill_chunk=settings.prefill_chunk,  # unset: the device's default
    )
    on.reset_peak()
    before = on.used()
    _measure_loaded(cells, engine, holder, on, settings, tokens, before)
    cells.measuring("released")
    marker = engine.release()  # the holder's reference, the last one: the engine drops it
    marker.done.wait()
    after_release = on.used()
    cells(
        "released",
        f"{after_release / MiB:,.0f} MiB in use ({(after_release - before) / MiB:+,.0f} MiB "
        "against before load)",
    )


def _measure_loaded(
    cells: Cells,
    engine: Engine,
    holder: ModelHolder,
    device: Device,
    settings: LocalModelSettings,
    tokens: int,
    before: int,
) -> None:
    """Every row but "after release". The model is referenced from here and the holder only.

    A row that raises (an out-of-memory, a constraint that breaks) says so in its cell, and the
    next row runs; only a failed load ends the column."""
    cells.measuring("load")
    started = time.perf_counter()
    loaded = holder.get()
    cells("load", f"{time.perf_counter() - started:.1f} s")
    after_load = device.used()
    cells("weights", f"{loaded.model_bytes / MiB:,.0f} MiB")
    cells("memory", _memory_line(device, before, after_load))
    # Every request runs its full length (random weights end turns at random points).
    loaded = holder._loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())
    prompt = _prompt(loaded, 24)
    single: dict[str, float] = {}  # the single stream's rate, for the bound's row

    def row(key: str, measure: Callable[[], str | None]) -> None:
        cells.measuring(key)
        try:
            if (value := measure()) is not None:
                cells(key, value)
        except Exception as exc:
            traceback.print_exc()
            cells(key, f"FAILED: {type(exc).__name__}: {exc}")

    def ids() -> str:
        run_jobs(engine, [prompt], 8)  # warm-up: first kernels, allocator
        return graphs_against_eager(engine, prompt, min(tokens, IDS_TOKENS))

    def single_stream() -> str:
        [one] = run_jobs(engine, [prompt], tokens, temperature=0)
        [first] = run_jobs(engine, [prompt], 1, temperature=0)
        single["rate"] = (one.tokens - 1) / max(1e-9, one.seconds - first.seconds)
        single["tokens"] = one.tokens
        return f"{single['rate']:,.0f} tokens/s ({one.tokens} tokens, greedy)"

    def bound() -> str | None:
        if (bandwidth := device.bandwidth()) is None:
            return None
        rate = bandwidth / loaded.model_bytes
        if single:
            cells(
                "single",
                f"{single['rate']:,.0f} tokens/s ({single['tokens']:.0f} tokens, greedy), "
                f"{single['rate'] / rate:.0%} of the bound",
            )
        return f"{rate:,.0f} tokens/s ({bandwidth / 1e12:.2f} TB/s copy)"

    def aggregate(clients: int) -> str:
        results = run_jobs(engine, [prompt] * clients, tokens)
        wall = max(r.seconds for r in results)
        return f"{sum(r.tokens for r in results) / wall:,.0f} tokens/s"

    def ttft(clients: int) -> str:
        ttfts = [r.seconds for r in run_jobs(engine, [prompt] * clients, 1)]
        return f"{statistics.median(ttfts) * 1000:,.0f} ms (p50)"

    def json8() -> str:
        grammar = loaded.constraints.grammar(ENDLESS)
        results = run_jobs(engine, [prompt] * 8, tokens, grammar)
        wall = max(r.seconds for r in results)
        return f"{sum(r.tokens for r in results) / wall:,.0f} tokens/s"

    def prefix() -> str:
        long_prompt = _prompt(loaded, min(2000, loaded.context_length - tokens - 8))
        cold = run_jobs(engine, [long_prompt], 1)[0].seconds
        again = run_jobs(engine, [long_prompt], 1)[0].seconds
        return f"{cold * 1000:,.0f} ms cold, {again * 1000:,.0f} ms seen before"

    def generate() -> str:
        floor = _generate_floor(device, loaded, prompt, tokens)
        # Right after, in the same conditions (on the CPU, generate's thread starts a second
        # OpenMP team, which slows every thread's parallel regions from then on: compare like
        # with like).
        [again] = run_jobs(engine, [prompt], tokens, temperature=0)
        ours = again.tokens / again.seconds
        return (
            f"{floor:,.0f} tokens/s ({tokens} tokens, greedy); the engine's single stream right "
            f"after, measured the same way (submit to last token): {ours:,.0f} tokens/s = "
            f"{ours / floor:.2f}x"
        )

    row("graphs_ids", ids)
    row("single", single_stream)
    row("bound", bound)
    for clients in (1, 8, 16):
        row(f"agg{clients}", lambda clients=clients: aggregate(clients))
        row(f"ttft{clients}", lambda clients=clients: ttft(clients))
    row("json8", json8)
    row("prefix", prefix)
    row("generate", generate)
    row("graphs", lambda: _graphs_on_off(engine, prompt, tokens))
    row("block", lambda: _block_cost(device, loaded, prompt, single))
    row("chunked", lambda: _chunked_prefill(engine, loaded, prompt, tokens))
    row("forced", lambda: _forced_drafts(engine, loaded, prompt, tokens))
    row("memory", lambda: _memory_line(device, before, after_load))  # the peak, now
    cells("kv", f"{engine.peak_kv_bytes / MiB:,.0f} MiB of {settings.kv_cache_mb:,.0f} MiB")


def graphs_against_eager(engine: Engine, prompt: list[int], tokens: int) -> str:
    """One greedy request decoded eagerly, then from CUDA graphs: the same token ids? Where the
    graphs are off (the CPU, or turned off by a failure), only the eager ids, and why."""
    engine.use_cuda_graphs(False)
    try:
        eager = _greedy_ids(engine, prompt, tokens)
    finally:
        engine.use_cuda_graphs(True)
    graphs = _greedy_ids(engine, prompt, tokens)
    state = engine.state()["cuda_graphs"]
    if len(eager) != tokens:
        return f"NOT CHECKED: the engine noted {len(eager)} ids of {tokens} (eager)"
    if not state["enabled"]:
        return (
            f"eager only ({len(eager)} greedy ids); the comparison with CUDA graphs is skipped: "
            f"graphs are off here ({state['off_reason']})"
        )
    if graphs == eager:
        return f"same {tokens} ids, eager and from {state['graphs']} CUDA graphs (greedy)"
    at = next((i for i, (a, b) in enumerate(zip(eager, graphs, strict=False)) if a != b), None)
    if at is None:
        return f"DIFFER: {len(graphs)} ids from graphs, {len(eager)} eager"
    return (
        f"DIFFER at token {at + 1} of {tokens} (eager {eager[at]}, graphs {graphs[at]}; the ids "
        "before it agree)"
    )


def _greedy_ids(engine: Engine, prompt: list[int], tokens: int) -> list[int]:
    from custom_handlers.inference.jobs import Done, Failed, Job, SyncSink
    from custom_handlers.inference.request import SamplingParams

    job = Job(prompt, SamplingParams(temperature=0), tokens, SyncSink())
    engine.noted[id(job)] = []
    try:
        engine.submit(job)
        while not isinstance(event := job.sink.get(), Done):
            if isinstance(event, Failed):
                raise RuntimeError(f"the greedy request failed: {event.error}")
        return engine.noted[id(job)]
    finally:
        engine.noted.pop(id(job), None)


def _prompt(loaded: LoadedModel, length: int) -> list[int]:
    """``length`` ordinary token ids of the checkpoint's tokenizer (no special tokens)."""
    words = "a fox in a misty forest at dawn, cinematic light, ".split()
    ids: list[int] = []
    while len(ids) < length:
        ids += loaded.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    return ids[:length]


def _graphs_on_off(engine: Engine, prompt: list[int], tokens: int) -> str:
    """Single-stream and 16-concurrent tokens/s as measured above (graphs as configured), then
    with CUDA graphs off; the graphs captured."""

    def rates() -> tuple[float, float]:
        [one] = run_jobs(engine, [prompt], tokens, temperature=0)
        many = run_jobs(engine, [prompt] * 16, tokens)
        return one.tokens / one.seconds, sum(r.tokens for r in many) / max(r.seconds for r in many)

    on = rates()
    graphs = engine.state()["cuda_graphs"]
    engine.use_cuda_graphs(False)
    try:
        off = rates()
    finally:
        engine.use_cuda_graphs(True)
    label = "on" if graphs["enabled"] else f"off ({graphs['off_reason']})"
    return (
        f"{label}: {on[0]:,.0f} / {on[1]:,.0f} tokens/s (1 / 16 streams), {graphs['graphs']} "
        f"graphs ({graphs['captured']} captures, checked, {graphs['capture_seconds']:.1f} s, "
        f"{graphs['memory_bytes'] / MiB:,.0f} MiB; {graphs['eager_steps']} steps eager while "
        f"their size had none); forced off: {off[0]:,.0f} / {off[1]:,.0f} tokens/s"
    )


def _block_cost(device: Device, loaded: LoadedModel, prompt: list[int], single: dict) -> str:
    """Issue 24: what a pass over 8 tokens of one row costs against a pass over 1, both eager
    (``decode.block_forward``, as speculation runs them), next to the single stream's step; a
    draft of 7 pays when a step keeps more tokens on average than this ratio."""
    from bench.block_cost import block_times

    sync = device.torch.cuda.synchronize if device.cuda else None
    times = block_times(loaded.model, loaded.dtype, prompt, 1, [1, 8], 10, sync)
    one, eight = times[1] * 1000, times[8] * 1000
    step = f"; the single stream's step: {1000 / single['rate']:.2f} ms" if single else ""
    return f"{eight:.2f} ms / {one:.2f} ms = {eight / one:.2f}x{step}"


def _forced_drafts(engine: Engine, loaded: LoadedModel, prompt: list[int], tokens: int) -> str:
    """Issue 24: grammar fast-forward on the device. Greedy requests whose JSON grammar forces
    keys, quotes and the rest of an enum (``FORCING``), 1 and 8 at a time, tokens/s with drafts
    off, then on (``draft_tokens`` 7: forced drafts of up to 15, every row of a batch drafting its
    own), and the forced tokens kept."""
    grammar = loaded.constraints.grammar(FORCING)

    def rates() -> tuple[float, float]:
        [one] = run_jobs(engine, [prompt], tokens, grammar, temperature=0)
        many = run_jobs(engine, [prompt] * 8, tokens, grammar, temperature=0)
        return one.tokens / one.seconds, sum(r.tokens for r in many) / max(r.seconds for r in many)

    setting = engine.draft_tokens
    try:
        engine.draft_tokens = 0
        off = rates()
        engine.draft_tokens = 7
        checked, kept = engine.forced_drafted, engine.forced_accepted
        on = rates()
        checked, kept = engine.forced_drafted - checked, engine.forced_accepted - kept
    finally:
        engine.draft_tokens = setting
    return (
        f"off: {off[0]:,.0f} / {off[1]:,.0f} tokens/s (1 / 8 streams); on: {on[0]:,.0f} / "
        f"{on[1]:,.0f} tokens/s = {on[0] / off[0]:.2f}x / {on[1] / off[1]:.2f}x; forced tokens "
        f"kept {kept:,} of {checked:,}"
    )


def _chunked_prefill(engine: Engine, loaded: LoadedModel, prompt: list[int], tokens: int) -> str:
    """Issue 24: 4 streams decode; a ~2,000-token prompt arrives; the streams' longest gap over
    their median gap, and the prompt's time to first token, with the prompt prefilled whole and
    in chunks of the device's default size (``bench/chunked_prefill.py``'s round)."""
    from bench.chunked_prefill import one_round

    length = min(2000, loaded.context_length - tokens - 8)
    long_ids = _prompt(loaded, length)[:length]
    setting, cells = engine.prefill_chunk, []
    size = engine.scheduler.chunk(loaded)  # the device's default (unless the setting gives one)
    try:
        for chunk, ids in ((0, long_ids), (size, [*long_ids[1:], long_ids[0]])):  # not shared
            joined = engine.chunked_prompts
            r = one_round(engine, prompt, ids, 4, max(tokens, 128), 8, chunk, temperature=1.0)
            if chunk and engine.chunked_prompts == joined:
                cells.append("NOT CHUNKED (packed attention off? see the log)")
                continue
            cells.append(
                f"{r.longest * 1000:,.0f} / {r.median * 1000:,.1f} ms = {r.ratio:.1f}x, "
                f"TTFT {r.ttft * 1000:,.0f} ms"
            )
    finally:
        engine.prefill_chunk = setting
    return f"whole: {cells[0]}; in chunks of {size}: {cells[1]}"


def _generate_floor(device: Device, loaded: LoadedModel, prompt: list[int], tokens: int) -> float:
    torch = device.torch
    input_ids = torch.tensor([prompt], device=loaded.model.device)
    with torch.inference_mode():
        loaded.model.generate(input_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        if device.cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = loaded.model.generate(
            input_ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
        if device.cuda:
            torch.cuda.synchronize()
    return (out.shape[1] - len(prompt)) / (time.perf_counter() - started)


def _memory_line(device: Device, before: int, after_load: int) -> str:
    line = f"{before / MiB:,.0f} MiB before load, {after_load / MiB:,.0f} MiB after"
    if (peak := device.peak()) is not None:
        line += f", peak allocated {peak / MiB:,.0f} MiB"
    return line


# ---- the table, on disk as it fills ------------------------------------------------------------

ROWS = [
    ("device", "device"),
    ("load", "load time"),
    ("weights", "weights in memory"),
    ("graphs_ids", "one greedy request, CUDA graphs against eager: same ids"),
    ("single", "single-stream decode"),
    ("bound", "memory-bandwidth bound, single stream"),
    ("agg1", "aggregate, 1 request"),
    ("agg8", "aggregate, 8 concurrent"),
    ("agg16", "aggregate, 16 concurrent"),
    ("ttft1", "TTFT, 1 request"),
    ("ttft8", "TTFT, 8 arriving together"),
    ("ttft16", "TTFT, 16 arriving together"),
    ("json8", "8 concurrent, JSON-constrained"),
    ("prefix", "TTFT of a ~2,000-token prompt"),
    ("graphs", "CUDA graphs (every row above as configured) / forced off"),
    ("block", "one row, a step of 8 tokens (a draft of 7) against 1, eager (speculation's cost)"),
    ("chunked", "4 streams while a ~2,000-token prompt joins: longest / median gap, its TTFT"),
    ("forced", "JSON with forced keys, greedy: drafts off / on (grammar fast-forward)"),
    ("generate", "transformers generate, one stream (floor)"),
    ("memory", "device memory (CPU: process RSS)"),
    ("kv", "KV pool at its largest (LOCAL_LLM_KV_CACHE_MB)"),
    ("released", "after release"),
    ("outcome", "column: complete, or where it stopped"),
]


def one_line(text: str, limit: int = 400) -> str:
    """``text`` fit for one table cell: one line, no ``|``, at most ``limit`` characters."""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table(columns: dict[str, dict[str, str]]) -> str:
    names = list(columns)
    lines = [f"| measure | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for key, label in ROWS:
        cells = [columns[n].get(key, "n/a") for n in names]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


class Record:
    """The run's figures, on disk from the first: ``gpu.md`` (the header lines and the table so
    far, replaced whole at each figure) and ``gpu.jsonl`` (one JSON line a figure, appended).
    Without a folder, the figures are only printed."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.lines: list[str] = []
        self.columns: dict[str, dict[str, str]] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "gpu.jsonl").write_text("")
            self._write()

    def line(self, text: str) -> None:
        """A line above the table (versions, the model, the time in all)."""
        self.lines.append(text)
        self._log({"line": text})
        print(text, file=sys.stderr, flush=True)

    def column(self, name: str) -> None:
        self.columns.setdefault(name, {})
        self._write()

    def cell(self, column: str, key: str, value: str) -> None:
        value = one_line(value)
        self.columns.setdefault(column, {})[key] = value
        self._log({"column": column, "row": key, "value": value})
        print(f"[{column}] {key}: {value}", file=sys.stderr, flush=True)

    def text(self) -> str:
        parts = list(self.lines)
        if self.columns:
            parts += ["", table(self.columns)]
        return "\n".join(parts)

    def _log(self, entry: dict) -> None:
        if self.folder is not None:
            with open(self.folder / "gpu.jsonl", "a") as log:
                log.write(json.dumps(entry) + "\n")
        self._write()

    def _write(self) -> None:
        if self.folder is None:
            return
        partial = self.folder / "gpu.md.partial"
        partial.write_text(self.text() + "\n")
        os.replace(partial, self.folder / "gpu.md")  # whole at any moment, even if killed


def _column_process(conn, target: str, kwargs: dict) -> None:
    """A column's process: runs ``target`` ("module:function", called with ``Cells`` and
    ``kwargs``), then says "done", or "error" with the exception in one line."""
    cells = Cells(conn.send)
    try:
        module, name = target.split(":")
        getattr(importlib.import_module(module), name)(cells, **kwargs)
    except BaseException as exc:
        traceback.print_exc()
        conn.send(("error", one_line(f"{type(exc).__name__}: {exc}")))
        conn.close()
        sys.stderr.flush()
        os._exit(1)  # the engine's thread may be stuck in the failure: do not wait for it
    conn.send(("done",))
    conn.close()


def run_column(record: Record, name: str, target: str, kwargs: dict, budget: float) -> bool:
    """Run one column in a process of its own, at most ``budget`` seconds; each figure goes to
    ``record`` as it comes. Its outcome is the column's last row, in one line: complete, failed
    (the error, and the row it was measuring), or stopped at its budget. Whether it completed.

    A process per column: an error, an out-of-memory or a kill takes nothing else with it; the
    next column starts on a device the last one has left (its memory freed with its process)."""
    record.column(name)
    context = multiprocessing.get_context("spawn")  # never fork a process that has used CUDA
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_column_process, args=(sender, target, kwargs), daemon=True)
    started = time.monotonic()
    process.start()
    sender.close()  # the child's end only: its exit then ends the pipe
    measuring: str | None = None
    outcome: str | None = None
    complete = False

    def where() -> str:
        return f" while measuring {measuring!r}" if measuring else ""

    try:
        while outcome is None:
            left = started + budget - time.monotonic()
            if left <= 0:
                outcome = f"STOPPED: past its budget of {budget:g} s{where()}"
                break
            if not receiver.poll(min(left, 1.0)):
                continue
            try:
                kind, *rest = receiver.recv()
            except EOFError:
                process.join(EXIT_GRACE_S)
                code = process.exitcode
                how = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
                outcome = f"FAILED{where()}: its process ended without a word ({how})"
                break
            if kind == "cell":
                record.cell(name, *rest)
            elif kind == "measuring":
                measuring = rest[0]
            elif kind == "error":
                outcome = f"FAILED{where()}: {rest[0]}"
            elif kind == "done":
                seconds = time.monotonic() - started
                cells = record.columns[name]
                failed = [key for key, value in cells.items() if value.startswith("FAILED")]
                complete = not failed
                outcome = f"complete in {seconds:.0f} s"
                if failed:
                    outcome = f"ran to its end in {seconds:.0f} s; FAILED rows: {', '.join(failed)}"
    finally:
        if outcome is not None and not outcome.startswith("STOPPED"):
            process.join(EXIT_GRACE_S)  # it said its last word: let it exit
        if process.is_alive():  # past its budget, stuck on its way out, or we were interrupted
            process.kill()
        process.join()
        receiver.close()
    record.cell(name, "outcome", outcome)
    return complete


# ---- preflight ---------------------------------------------------------------------------------

# (module, distribution): what the engine imports on the GPU machine; the carried wheels cover
# what the machine lacks or has too old (scripts/gpu_wheels.sh).
PREFLIGHT = [
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"),
    ("huggingface_hub", "huggingface-hub"),
    ("regex", "regex"),
    ("typing_extensions", "typing-extensions"),
    ("pydantic", "pydantic"),
    ("pydantic_core", "pydantic-core"),
    ("pydantic_settings", "pydantic-settings"),
    ("dotenv", "python-dotenv"),
    ("llguidance", "llguidance"),
    ("custom_handlers.inference.engine", None),  # the engine itself, on all of the above
]
MIN_TRANSFORMERS = (5, 24)  # the engine needs 5.24's cache argument (the machine has 5.17)


class PreflightError(Exception):
    pass


def preflight(record: Record) -> None:
    """Import what the engine needs, one module after another, and put each one's version (and,
    on the GPU machine, whether it was carried) in ``record``. Raises ``PreflightError`` (one
    line) at the first that cannot import. bitsandbytes is only found here, not imported: its
    import starts CUDA, which this process leaves to the columns' processes."""
    carried = os.environ.get("GPU_CARRIED_SITE")  # set by bench/gpu_device.sh

    def origin(file: str | None) -> str:
        if not carried or not file:
            return ""
        inside = str(Path(file).resolve()).startswith(str(Path(carried).resolve()))
        return " (carried)" if inside else " (machine)"

    found: list[str] = []
    for module_name, distribution in PREFLIGHT:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            record.line("Versions so far: " + (", ".join(found) or "none"))
            raise PreflightError(
                f"PREFLIGHT FAILED: cannot import {module_name}: "
                f"{one_line(f'{type(exc).__name__}: {exc}', 600)}. Nothing was measured: the "
                "carried wheels (scripts/gpu_wheels.sh) must cover what this machine lacks or has "
                "too old."
            ) from None
        if distribution is None:
            continue
        found.append(f"{distribution} {_version(distribution, module)}{origin(module.__file__)}")
    import torch
    import transformers

    torch_line = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
    torch_line += f" (available: {torch.cuda.is_available()})"
    spec = importlib.util.find_spec("bitsandbytes")
    bnb = "bitsandbytes not installed"
    if spec:
        bnb = f"bitsandbytes {_version('bitsandbytes')}{origin(spec.origin)}"
    record.line(
        f"Machine: {platform.machine()}, Python {platform.python_version()}; {torch_line}; "
        + ", ".join(found[1:])
        + f"; {bnb} (imported by the 4-bit column only)"
    )
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRANSFORMERS:
        raise PreflightError(
            f"PREFLIGHT FAILED: transformers {transformers.__version__} is too old for the engine "
            f"(it needs {'.'.join(map(str, MIN_TRANSFORMERS))}): are the carried wheels "
            "installed and first on PYTHONPATH? Nothing was measured."
        )


def _version(distribution: str, module: Any = None) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


# ---- the run -----------------------------------------------------------------------------------


def columns_to_run(device: str, path: str, tokens: int, skip_4bit: bool) -> list[tuple[str, dict]]:
    dtype = "bfloat16" if device == "cuda" else "float32"
    variants = [(dtype, dict(quantization="none", dtype=dtype))]
    if device == "cuda" and not skip_4bit:
        variants.append(("bitsandbytes 4-bit", dict(quantization="4bit", dtype="bfloat16")))
    return [
        (name, dict(path=path, device=device, tokens=tokens, **variant))
        for name, variant in variants
    ]


def run(
    record: Record,
    columns: list[tuple[str, str, dict]],
    deadline: float,
    column_budget: float,
) -> bool:
    """Each (name, target, kwargs) column in turn, each within ``column_budget`` seconds and all
    before ``deadline`` (monotonic); whether every one completed."""
    complete = True
    for name, target, kwargs in columns:
        left = deadline - time.monotonic()
        if left < MIN_COLUMN_S:
            record.column(name)
            record.cell(name, "outcome", f"NOT RUN: {max(0, left):.0f} s of the run's budget left")
            complete = False
            continue
        if kwargs.get("quantization") == "4bit" and not importlib.util.find_spec("bitsandbytes"):
            record.column(name)
            record.cell(name, "outcome", "NOT RUN: bitsandbytes is not installed")
            complete = False
            continue
        complete &= run_column(record, name, target, kwargs, min(column_budget, left))
    return complete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--model", help="a checkpoint directory instead of building one")
    parser.add_argument("--tokens", type=int, help="tokens per request (256 on CUDA, 32 on CPU)")
    parser.add_argument("--skip-4bit", action="store_true")
    parser.add_argument("--out", help="a folder: gpu.md and gpu.jsonl, written as figures come")
    parser.add_argument("--preflight", action="store_true", help="only the preflight")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (CUDA: 450)")
    parser.add_argument("--column-budget", type=float, help="seconds a column (CUDA: 210)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    record = Record(Path(args.out) if args.out else None)
    try:
        preflight(record)
    except PreflightError as exc:
        record.line(str(exc))
        return 2
    if args.preflight:
        return 0
    import torch

    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    budget, column_budget = BUDGETS[name]
    deadline = started + (args.budget or budget)
    tokens = args.tokens or (256 if name == "cuda" else 32)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = Path(args.model) if args.model else build_model(name, Path(scratch))
        except Exception as exc:
            traceback.print_exc()
            record.line(f"MODEL BUILD FAILED: {one_line(f'{type(exc).__name__}: {exc}')}")
            return 1
        if args.model:
            what = "the checkpoint given (--model)"
        else:
            what = f"{'Qwen3-4B shape' if name == 'cuda' else 'small Qwen3'}, random weights"
        record.line(
            f"Model: {what}, {tokens} tokens a request; "
            f"ready after {time.monotonic() - started:.0f} s: {path}"
        )
        columns = [
            (column, "bench.gpu:measure_column", kwargs)
            for column, kwargs in columns_to_run(name, str(path), tokens, args.skip_4bit)
        ]
        complete = run(record, columns, deadline, args.column_budget or column_budget)
    record.line(f"{time.monotonic() - started:.0f} s in all")
    print(record.text(), flush=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
