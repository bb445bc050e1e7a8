"""bench/gpu.py, the one command for a lent GPU, works before that day: on the CPU here.

It must start, build a small model, drive the engine in-process and print its whole table; on a
machine with CUDA the same command runs the real thing (the ``gpu`` test, skipped here). Its run
cannot come back empty: every figure is on disk as soon as it is measured, a column that fails or
passes its budget is recorded in one line and the next one runs, and a preflight stops at once,
in one line, when what the engine imports cannot import. "After release" is measured once the
model is gone.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

from bench.gpu import ROWS, Record, measure_column, run, run_column
from tests.servers import ROOT

LABELS = dict(ROWS)


def _run(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| measure"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _cells(folder: Path) -> list[dict]:
    lines = (folder / "gpu.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "column" in entry]


def test_the_gpu_benchmark_runs_on_the_cpu_and_prints_every_row(tmp_path):
    result = _run("--device", "cpu", "--tokens", "8", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The preflight came first, with the versions it runs on.
    preflight = next(line for line in result.stderr.splitlines() if line.startswith("Machine:"))
    for name in ("torch", "transformers 5.24", "tokenizers", "safetensors", "pydantic 2."):
        assert name in preflight
    rows = _rows(result.stdout)
    assert list(rows) == [label for _, label in ROWS]
    assert rows["device"][0].startswith("CPU")
    assert rows["single-stream decode"][0].endswith("tokens/s (8 tokens, greedy)")
    ids = rows[LABELS["graphs_ids"]][0]
    assert ids.startswith("eager only (8 greedy ids)") and "skipped" in ids
    assert "not on CUDA (cpu)" in ids
    assert "right after" in rows["transformers generate, one stream (floor)"][0]
    graphs = rows["CUDA graphs (every row above as configured) / forced off"][0]
    assert graphs.startswith("off (not on CUDA (cpu))") and "forced off" in graphs
    assert rows["aggregate, 16 concurrent"][0].endswith("tokens/s")
    assert "seen before" in rows["TTFT of a ~2,000-token prompt"][0]
    chunked = rows[LABELS["chunked"]][0]
    assert chunked.startswith("whole: ") and "; in chunks of 256: " in chunked
    assert "NOT CHUNKED" not in chunked and "FAILED" not in chunked
    forced = rows[LABELS["forced"]][0]
    assert forced.startswith("off: ") and "; on: " in forced and "forced tokens kept" in forced
    assert "kept 0 of" not in forced  # the forced drafts were checked, and kept
    assert rows["after release"][0].endswith("against before load)")
    kv = rows["KV pool at its largest (LOCAL_LLM_KV_CACHE_MB)"][0]
    assert kv.endswith("of 2,048 MiB") and not kv.startswith("0 MiB")  # the gateway's budget
    assert rows[LABELS["outcome"]][0].startswith("complete in")
    assert (tmp_path / "gpu.md").read_text().strip() == result.stdout.strip()
    measured = {entry["row"] for entry in _cells(tmp_path)}
    assert measured == set(LABELS) - {"bound"}  # no bandwidth copy on the CPU


def test_a_column_that_raises_is_recorded_in_one_line_and_the_next_one_runs(tmp_path):
    record = Record(tmp_path)
    assert not run_column(record, "raises", "tests.gpu_columns:raises", {}, budget=300)
    assert run_column(record, "next", "tests.gpu_columns:completes", {}, budget=300)
    rows = _rows((tmp_path / "gpu.md").read_text())
    assert rows[LABELS["load"]] == ["1.0 s", "2.0 s"]  # measured before the error: kept
    failed, complete = rows[LABELS["outcome"]]
    assert failed == (
        "FAILED while measuring 'single': RuntimeError: CUDA out of memory. Tried to allocate "
        "2.00 GiB / simulated"
    )
    assert complete.startswith("complete in")
    assert rows[LABELS["single"]] == ["n/a", "50 tokens/s"]


def test_a_column_whose_row_failed_says_so_in_its_outcome(tmp_path):
    record = Record(tmp_path)
    assert not run_column(record, "rows", "tests.gpu_columns:a_row_fails", {}, budget=300)
    [outcome] = _rows((tmp_path / "gpu.md").read_text())[LABELS["outcome"]]
    assert outcome.startswith("ran to its end in ") and outcome.endswith("; FAILED rows: json8")


def test_figures_are_on_disk_as_soon_as_they_are_measured(tmp_path):
    record = Record(tmp_path)
    assert (tmp_path / "gpu.md").exists()  # from the start: a run stopped at once leaves a file
    record.line("Machine: here")
    record.cell("bfloat16", "load", "4.2 s")
    # On disk now, before anything else happens: a kill from outside keeps it.
    assert _rows((tmp_path / "gpu.md").read_text())[LABELS["load"]] == ["4.2 s"]
    assert _cells(tmp_path) == [{"column": "bfloat16", "row": "load", "value": "4.2 s"}]
    # A column whose process dies without a word (the kernel's OOM killer) keeps its figures.
    assert not run_column(record, "dies", "tests.gpu_columns:dies", {}, budget=300)
    rows = _rows((tmp_path / "gpu.md").read_text())
    assert rows[LABELS["load"]] == ["4.2 s", "1.5 s"]
    outcome = rows[LABELS["outcome"]][1]
    assert outcome.startswith("FAILED while measuring 'agg8': its process ended without a word")
    assert "exit code 9" in outcome


def test_a_column_past_its_budget_is_stopped_and_the_next_one_runs(tmp_path):
    record = Record(tmp_path)
    assert not run_column(record, "hangs", "tests.gpu_columns:hangs", {}, budget=0.5)
    assert run_column(record, "next", "tests.gpu_columns:completes", {}, budget=300)
    rows = _rows((tmp_path / "gpu.md").read_text())
    stopped, complete = rows[LABELS["outcome"]]
    assert stopped.startswith("STOPPED: past its budget of 0.5 s")
    assert complete.startswith("complete in")


def test_no_column_starts_once_the_runs_budget_is_spent(tmp_path):
    record = Record(tmp_path)
    columns = [(name, "tests.gpu_columns:completes", {}) for name in ("bfloat16", "4-bit")]
    assert not run(record, columns, deadline=time.monotonic(), column_budget=300)
    rows = _rows((tmp_path / "gpu.md").read_text())
    outcomes = rows[LABELS["outcome"]]
    assert outcomes == ["NOT RUN: 0 s of the run's budget left"] * 2


def test_the_preflight_stops_in_one_clear_line_when_a_carried_package_cannot_import(tmp_path):
    broken = tmp_path / "site" / "safetensors"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise ImportError("safetensors is built for another Python (simulated)")\n'
    )
    env = {**os.environ, "PYTHONPATH": f"{broken.parent}{os.pathsep}{ROOT}"}
    out = tmp_path / "out"
    result = _run("--device", "cpu", "--out", str(out), timeout=300, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    failed = [line for line in result.stderr.splitlines() if "PREFLIGHT FAILED" in line]
    assert len(failed) == 1
    assert failed[0].startswith("PREFLIGHT FAILED: cannot import ")
    assert "safetensors is built for another Python (simulated)" in failed[0]
    assert "Nothing was measured" in failed[0]
    assert failed[0] in (out / "gpu.md").read_text()  # the output folder says so too


class _Watch:
    """``Cells`` for a column run in this process: notes the figures, and whether the model it
    loaded is still alive when "after release" is measured."""

    def __init__(self):
        from transformers import PreTrainedModel

        self.kind = PreTrainedModel
        gc.collect()  # models of earlier tests that only wait for the collector: not this one's
        self.before = {id(o) for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)}
        self.cells: dict[str, str] = {}
        self.models: list[weakref.ref] = []
        self.alive_at_release: list | None = None

    def measuring(self, key: str) -> None:
        pass

    def __call__(self, key: str, value: str) -> None:
        self.cells[key] = value
        if key == "weights":  # just loaded: the models that were not there before
            self.models = [
                weakref.ref(o)
                for o in gc.get_objects()
                if issubclass(type(o), self.kind) and id(o) not in self.before
            ]
        elif key == "released":  # no gc.collect here: a model kept by a cycle counts as alive
            self.alive_at_release = [ref for ref in self.models if ref() is not None]


@pytest.mark.parametrize("broken_row", [False, True], ids=["all-rows", "json8-raises"])
def test_after_release_is_measured_once_the_model_is_freed(tiny_model_dir, monkeypatch, broken_row):
    if broken_row:  # the JSON row raises: recorded in its cell, the next rows still run
        monkeypatch.setattr("bench.gpu.ENDLESS", "{not a schema")
    watch = _Watch()
    measure_column(
        watch, str(tiny_model_dir), device="cpu", quantization="none", dtype="float32", tokens=2
    )
    assert watch.models  # the model loaded (transformers may build more than one object), found
    assert watch.alive_at_release == []  # and gone when the row was measured
    assert watch.cells["released"].endswith("against before load)")
    assert watch.cells["json8"].startswith("FAILED: ") == broken_row
    assert watch.cells["prefix"].endswith("ms seen before")  # the row after it ran


@pytest.mark.gpu
def test_the_gpu_benchmark_on_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    result = _run("--device", "cuda", "--skip-4bit", "--out", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(result.stdout)
    assert "of the bound" in rows["single-stream decode"][0]
    assert rows[LABELS["graphs_ids"]][0].startswith("same ")
    assert rows["CUDA graphs (every row above as configured) / forced off"][0].startswith("on:")
