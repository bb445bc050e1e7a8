"""Two local models in one gateway, one loaded at a time: what a swap costs, what memory it returns,
and what ``preload: true`` saves the first request.

    uv run python -m bench.swap [--rounds 3] [--model-a DIR --model-b DIR]

Without models it builds two random-weight Qwen3 checkpoints of different sizes (12 layers x 768,
the issue's mid-size model, and 6 x 512). Through the real gateway (``litellm --config``), with
``LOCAL_LLM_MAX_LOADED_MODELS=1``:

- swap: a streamed request for the model that is not loaded, while the other one is idle: time to
  its first token (unload + load + prefill) against the same request once that model is loaded;
  the load's own time as ``/local/state`` reports it; the gateway's resident memory (VmRSS) with A
  loaded, then with B loaded, and after ``POST /local/release``;
- first request: a fresh gateway whose model is marked ``preload: true`` (waited for until loaded)
  against a fresh gateway without it (the request imports torch and loads the model).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench._common import mib, print_measures, process_memory
from tests.conftest import _load_builder
from tests.servers import CONFIG, Gateway

PROMPT = [{"role": "user", "content": "a fox in the snow at dawn, drawn in ink"}]


def write_config(path: Path, models: dict[str, tuple[str, dict]]) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["model_list"] = [
        {
            "model_name": name,
            "litellm_params": {"model": f"zlocal/{source}", "num_retries": 0},
            "model_info": {"disable_background_health_check": True, "keep_alive": -1, **info},
        }
        for name, (source, info) in models.items()
    ]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Target:
    def __init__(self, workdir: Path, models: dict[str, tuple[str, dict]]):
        workdir.mkdir(parents=True, exist_ok=True)
        config = write_config(workdir / "proxy_config.yaml", models)
        self.gw = Gateway(env={"LOCAL_LLM_MAX_LOADED_MODELS": "1"}, workdir=workdir, config=config)
        self.gw.start()
        self.http = httpx.Client(
            base_url=self.gw.base_url,
            headers={"Authorization": f"Bearer {self.gw.key}"},
            timeout=600,
        )

    def first_token(self, model: str) -> float:
        """Seconds to the first streamed token of a short request (the answer read to its end)."""
        body = {"model": model, "messages": PROMPT, "max_tokens": 8, "stream": True, "seed": 1}
        started, first = time.perf_counter(), None
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if first is None and '"content"' in line:
                    first = time.perf_counter() - started
        return first

    def models(self) -> dict[str, dict]:
        return {m["model"]: m for m in self.http.get("/local/state").json()["models"]}

    def loaded(self) -> list[str]:
        return [name for name, m in self.models().items() if m["loaded"]]

    def rss(self) -> int:
        return process_memory(self.gw.process.pid)

    def stop(self) -> None:
        self.http.close()
        self.gw.stop()


def swaps(models: dict[str, tuple[str, dict]], scratch: Path, rounds: int) -> list:
    target = Target(scratch / "swap", models)
    try:
        target.first_token("a")  # imports torch, loads a
        warm_a = statistics.median(target.first_token("a") for _ in range(3))
        rows, swap_b, swap_a, load_b, load_a, rss_a, rss_b = [], [], [], [], [], [], []
        for _ in range(rounds):
            rss_a.append(target.rss())
            swap_b.append(target.first_token("b"))
            assert target.loaded() == ["b"]
            load_b.append(target.models()["b"]["load_seconds"])
            rss_b.append(target.rss())
            swap_a.append(target.first_token("a"))
            assert target.loaded() == ["a"]
            load_a.append(target.models()["a"]["load_seconds"])
        target.first_token("b")  # a swap: b is loaded from here on
        warm_b = statistics.median(target.first_token("b") for _ in range(3))
        before_release = target.rss()
        released = target.http.post("/local/release").json()["released"]
        after_release = target.rss()
        med = statistics.median
        rows += [
            ("time to first token, a loaded (median of 3)", f"{warm_a * 1000:.0f} ms"),
            ("time to first token, b loaded (median of 3)", f"{warm_b * 1000:.0f} ms"),
            (
                f"swap a -> b: time to first token (median of {rounds})",
                f"{med(swap_b):.2f} s (b's load: {med(load_b):.2f} s)",
            ),
            (
                f"swap b -> a: time to first token (median of {rounds})",
                f"{med(swap_a):.2f} s (a's load: {med(load_a):.2f} s)",
            ),
            ("gateway RSS with a loaded (median)", mib(int(med(rss_a)))),
            ("gateway RSS with b loaded, after the swap (median)", mib(int(med(rss_b)))),
            (
                f"gateway RSS before / after POST /local/release (released {released})",
                f"{mib(before_release)} / {mib(after_release)}",
            ),
        ]
        return rows
    finally:
        target.stop()


def first_requests(source: str, scratch: Path) -> list:
    cold = Target(scratch / "cold", {"a": (source, {})})
    try:
        cold_ttft = cold.first_token("a")
    finally:
        cold.stop()
    warm = Target(scratch / "preloaded", {"a": (source, {"preload": True})})
    try:
        started = time.perf_counter()
        while warm.loaded() != ["a"]:
            time.sleep(0.05)
        waited = time.perf_counter() - started
        preloaded_ttft = warm.first_token("a")
    finally:
        warm.stop()
    return [
        ("first request's time to first token, cold (imports torch, loads)", f"{cold_ttft:.2f} s"),
        (
            "first request's time to first token, preload: true",
            f"{preloaded_ttft * 1000:.0f} ms (loaded {waited:.1f} s after the gateway answered)",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-a", help="checkpoint directory (default: built, 12 x 768)")
    parser.add_argument("--model-b", help="checkpoint directory (default: built, 6 x 512)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        builder = _load_builder()
        a = args.model_a or str(builder.build(scratch / "a", layers=12, hidden=768, seed=1))
        b = args.model_b or str(builder.build(scratch / "b", layers=6, hidden=512, seed=2))
        models = {"a": (a, {}), "b": (b, {})}
        rows = swaps(models, scratch, args.rounds) + first_requests(a, scratch)
    details = "a: 12 layers x 768 (fp32), b: 6 layers x 512 (fp32)"
    if args.model_a or args.model_b:
        details = f"a: {a}, b: {b}"
    print_measures(None, rows, f"{details}; CPU; LOCAL_LLM_MAX_LOADED_MODELS=1")


if __name__ == "__main__":
    main()
