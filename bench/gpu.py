"""The GPU benchmark: one command for the day a GPU is lent (docs/benchmarks.md, "GPU").

    python -m bench.gpu [--device cuda] [--out results.md]     # on the GPU machine, < 8 minutes
    uv run python -m bench.gpu --device cpu                    # here: a small model, same table

It drives the engine in-process (no LiteLLM, no web server: the GPU machine has neither) on
random weights it builds itself (no download): Qwen3-4B's shape in bfloat16 on CUDA, a small
Qwen3 on the CPU. For each variant (bfloat16; bitsandbytes 4-bit when CUDA and bitsandbytes are
there) it measures:

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
- device memory before load, after load, at peak, and after the model is released.

Random weights rarely produce text the test tokenizer can show, so times are taken from the
engine's ``Finish`` and ``Done`` events, and token counts from ``Finish.completion_tokens``. They
also end a turn at random points, so here end-of-turn ends nothing: every request runs its full
length, as ``generate(min_new_tokens=...)`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from custom_handlers.inference.engine import Done, Engine, Failed, Finish, Job, SyncSink
from custom_handlers.inference.loader import LoadedModel, ModelHolder
from custom_handlers.inference.request import SamplingParams
from custom_handlers.inference.settings import LocalModelSettings

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
ENDLESS = json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": 100000})


@dataclass
class Result:
    seconds: float  # submit to Done
    tokens: int  # completion tokens


def run_jobs(
    engine: Engine, prompts: list[list[int]], tokens: int, grammar=None, temperature: float = 1.0
) -> list[Result]:
    """Submit one job per prompt at once; wait for all. Each job samples (temperature 1, seeded;
    0: greedy)."""
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


class Device:
    """Memory figures and synchronisation for CUDA or the CPU."""

    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.cuda = name == "cuda"
        if self.cuda:
            torch.zeros(1, device="cuda")  # the CUDA context, so "before load" excludes nothing

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


def measure_variant(
    path: Path, device: Device, quantization: str, dtype: str, tokens: int
) -> dict[str, str]:
    """Load, measure, release; one column of the table."""
    name = "cuda" if device.cuda else "cpu"
    settings = LocalModelSettings(
        model=str(path), device=name, dtype=dtype, quantization=quantization, keep_alive=-1
    )
    holder = ModelHolder(lambda: settings)
    prefix_bytes = int(settings.prefix_cache_mb * 2**20)  # the gateway's defaults: reuse on,
    kv_bytes = int(settings.kv_cache_mb * 2**20)  # and the KV pool's budget
    engine = Engine(
        holder, 32, 128, keep_alive=-1, prefix_cache_bytes=prefix_bytes, kv_cache_bytes=kv_bytes
    )
    device.reset_peak()
    before = device.used()
    started = time.perf_counter()
    loaded = holder.get()
    load_seconds = time.perf_counter() - started
    after_load = device.used()
    # Every request runs its full length (random weights end turns at random points).
    loaded = holder._loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())
    prompt = _prompt(loaded, 24)
    run_jobs(engine, [prompt], 8)  # warm-up: first kernels, allocator
    column = {"load": f"{load_seconds:.1f} s", "weights": f"{loaded.model_bytes / MiB:,.0f} MiB"}

    [single] = run_jobs(engine, [prompt], tokens, temperature=0)
    [first] = run_jobs(engine, [prompt], 1, temperature=0)
    decode = (single.tokens - 1) / max(1e-9, single.seconds - first.seconds)
    column["single"] = f"{decode:,.0f} tokens/s ({single.tokens} tokens, greedy)"
    if (bandwidth := device.bandwidth()) is not None:
        bound = bandwidth / loaded.model_bytes
        column["bound"] = f"{bound:,.0f} tokens/s ({bandwidth / 1e12:.2f} TB/s copy)"
        column["single"] += f", {decode / bound:.0%} of the bound"
    for clients in (1, 8, 16):
        results = run_jobs(engine, [prompt] * clients, tokens)
        wall = max(r.seconds for r in results)
        column[f"agg{clients}"] = f"{sum(r.tokens for r in results) / wall:,.0f} tokens/s"
        ttfts = [r.seconds for r in run_jobs(engine, [prompt] * clients, 1)]
        column[f"ttft{clients}"] = f"{statistics.median(ttfts) * 1000:,.0f} ms (p50)"
    grammar = loaded.constraints.grammar(ENDLESS)
    results = run_jobs(engine, [prompt] * 8, tokens, grammar)
    wall = max(r.seconds for r in results)
    column["json8"] = f"{sum(r.tokens for r in results) / wall:,.0f} tokens/s"
    long_prompt = _prompt(loaded, min(2000, loaded.context_length - tokens - 8))
    cold = run_jobs(engine, [long_prompt], 1)[0].seconds
    again = run_jobs(engine, [long_prompt], 1)[0].seconds
    column["prefix"] = f"{cold * 1000:,.0f} ms cold, {again * 1000:,.0f} ms seen before"
    floor = _generate_floor(device, loaded, prompt, tokens)
    # Right after, in the same conditions (on the CPU, generate's thread starts a second OpenMP
    # team, which slows every thread's parallel regions from then on: compare like with like).
    [again] = run_jobs(engine, [prompt], tokens, temperature=0)
    ours = again.tokens / again.seconds
    column["generate"] = (
        f"{floor:,.0f} tokens/s ({tokens} tokens, greedy); the engine's single stream right "
        f"after, measured the same way (submit to last token): {ours:,.0f} tokens/s = "
        f"{ours / floor:.2f}x"
    )
    column["graphs"] = _graphs_on_off(engine, device, prompt, tokens)
    column["memory"] = _memory_line(device, before, after_load)
    column["kv"] = f"{engine.peak_kv_bytes / MiB:,.0f} MiB of {settings.kv_cache_mb:,.0f} MiB"
    marker = engine.release()
    marker.done.wait()
    after_release = device.used()
    column["released"] = (
        f"{after_release / MiB:,.0f} MiB in use ({(after_release - before) / MiB:+,.0f} MiB "
        "against before load)"
    )
    return column


def _prompt(loaded: LoadedModel, length: int) -> list[int]:
    """``length`` ordinary token ids of the checkpoint's tokenizer (no special tokens)."""
    words = "a fox in a misty forest at dawn, cinematic light, ".split()
    ids: list[int] = []
    while len(ids) < length:
        ids += loaded.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    return ids[:length]


def _graphs_on_off(engine: Engine, device: Device, prompt: list[int], tokens: int) -> str:
    """Single-stream and 16-concurrent tokens/s as measured above (graphs as configured), then
    with CUDA graphs off; the graphs captured."""

    def rates() -> tuple[float, float]:
        [one] = run_jobs(engine, [prompt], tokens, temperature=0)
        many = run_jobs(engine, [prompt] * 16, tokens)
        return one.tokens / one.seconds, sum(r.tokens for r in many) / max(r.seconds for r in many)

    on = rates()
    graphs = engine.state()["cuda_graphs"]
    engine.use_cuda_graphs(False)
    off = rates()
    engine.use_cuda_graphs(True)
    label = "on" if graphs["enabled"] else f"off ({graphs['off_reason']})"
    return (
        f"{label}: {on[0]:,.0f} / {on[1]:,.0f} tokens/s (1 / 16 streams), {graphs['graphs']} "
        f"graphs captured and checked in {graphs['capture_seconds']:.1f} s; forced off: "
        f"{off[0]:,.0f} / {off[1]:,.0f} tokens/s"
    )


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


ROWS = [
    ("load", "load time"),
    ("weights", "weights in memory"),
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
    ("generate", "transformers generate, one stream (floor)"),
    ("memory", "device memory (CPU: process RSS)"),
    ("kv", "KV pool at its largest (LOCAL_LLM_KV_CACHE_MB)"),
    ("released", "after release"),
]


def table(columns: dict[str, dict[str, str]]) -> str:
    names = list(columns)
    lines = [f"| measure | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for key, label in ROWS:
        cells = [columns[n].get(key, "n/a") for n in names]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def environment(device: Device) -> str:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if device.cuda else "none"
    return (
        f"Machine: {platform.machine()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}; GPU: {gpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--model", help="a checkpoint directory instead of building one")
    parser.add_argument("--tokens", type=int, help="tokens per request (256 on CUDA, 32 on CPU)")
    parser.add_argument("--skip-4bit", action="store_true")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    import torch

    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = Device(name)
    tokens = args.tokens or (256 if device.cuda else 32)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(args.model) if args.model else build_model(name, Path(scratch))
        built = time.perf_counter() - started
        print(f"model ready in {built:.0f} s: {path}", file=sys.stderr, flush=True)
        dtype = "bfloat16" if device.cuda else "float32"
        columns = {dtype: measure_variant(path, device, "none", dtype, tokens)}
        if device.cuda and not args.skip_4bit:
            if importlib.util.find_spec("bitsandbytes") is None:
                columns["4-bit"] = {"load": "bitsandbytes is not installed"}
            else:
                columns["bitsandbytes 4-bit"] = measure_variant(
                    path, device, "4bit", "bfloat16", tokens
                )
    text = "\n".join(
        [
            environment(device),
            f"Model: {'Qwen3-4B shape' if device.cuda else 'small Qwen3'}, random weights, "
            f"{tokens} tokens a request; {time.perf_counter() - started:.0f} s in all "
            f"(building the model {built:.0f} s)",
            "",
            table(columns),
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
