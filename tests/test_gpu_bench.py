"""bench/gpu.py, the one command for a lent GPU, works before that day: on the CPU here.

It must start, build a small model, drive the engine in-process and print its whole table; on a
machine with CUDA the same command runs the real thing (the ``gpu`` test, skipped here).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.gpu import ROWS
from tests.servers import ROOT


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| measure"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_gpu_benchmark_runs_on_the_cpu_and_prints_every_row(tmp_path):
    out = tmp_path / "gpu.md"
    result = _run("--device", "cpu", "--tokens", "8", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(result.stdout)
    assert list(rows) == [label for _, label in ROWS]
    assert rows["single-stream decode"][0].endswith("tokens/s (8 tokens, greedy)")
    assert "right after" in rows["transformers generate, one stream (floor)"][0]
    graphs = rows["CUDA graphs (every row above as configured) / forced off"][0]
    assert graphs.startswith("off (not on CUDA (cpu))") and "forced off" in graphs
    assert rows["aggregate, 16 concurrent"][0].endswith("tokens/s")
    assert "seen before" in rows["TTFT of a ~2,000-token prompt"][0]
    assert rows["after release"][0].endswith("against before load)")
    kv = rows["KV pool at its largest (LOCAL_LLM_KV_CACHE_MB)"][0]
    assert kv.endswith("of 2,048 MiB") and not kv.startswith("0 MiB")  # the gateway's budget
    assert out.read_text().strip() == result.stdout.strip()


@pytest.mark.gpu
def test_the_gpu_benchmark_on_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    result = _run("--device", "cuda", "--skip-4bit", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(result.stdout)
    assert "of the bound" in rows["single-stream decode"][0]
    assert rows["CUDA graphs (every row above as configured) / forced off"][0].startswith("on:")
