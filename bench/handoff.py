"""VRAM hand-off figures: memory before load, after load, after release; release and reload times.

    uv run python -m bench.handoff [--model DIR] [--cycles 3]

Drives the real gateway as Z-Explorer would: a request (loads the model), POST /local/release
(Z-Explorer's ``release_gpu()``), a request again (reloads it), for ``--cycles`` rounds. Memory is
read three ways at each point: the device as a whole (GET /local/state: CUDA free/total, so
"used" includes every process on the GPU), the gateway process's own GPU memory (nvidia-smi,
which includes its CUDA context), and the process's resident memory (RSS). Without a GPU only
RSS and the model's own bytes are shown. Without --model it builds the tiny random-weight Qwen3.
The LOCAL_LLM_* variables of this shell (LOCAL_LLM_DTYPE, ...) reach the gateway.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import MiB, mib, model_or_tiny, print_measures, process_memory
from tests.servers import Gateway

LOCAL = "qwen3-4b"  # proxy_config.yaml's local model: LOCAL_LLM_MODEL, i.e. --model


def _process_gpu_bytes(pid: int) -> int | None:
    """The process's GPU memory as nvidia-smi reports it (CUDA context included), if any."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    used = [int(m) for p, m in (ln.split(",") for ln in out.splitlines() if ln) if int(p) == pid]
    return sum(used) * MiB if used else 0


class Probe:
    def __init__(self, gw: Gateway, client: httpx.Client):
        self.gw, self.client = gw, client

    def state(self) -> dict:
        """qwen3-4b's entry of GET /local/state (its device figures are the whole device's)."""
        answer = self.client.get(f"{self.gw.base_url}/local/state").raise_for_status().json()
        return next(m for m in answer["models"] if m["model"] == LOCAL)

    def snapshot(self) -> dict:
        memory = self.state()["memory"]
        free, total = memory["device_free_bytes"], memory["device_total_bytes"]
        return {
            "device used": None if free is None else total - free,
            "process GPU": _process_gpu_bytes(self.gw.process.pid),
            "allocated": memory["device_allocated_bytes"],
            "RSS": process_memory(self.gw.process.pid),
            "model": memory["model_bytes"],
        }

    def ask(self) -> float:
        body = {
            "model": LOCAL,
            "max_tokens": 1,
            "temperature": 0,
            "messages": [{"role": "user", "content": "a fox"}],
        }
        started = time.perf_counter()
        self.client.post(f"{self.gw.base_url}/v1/chat/completions", json=body).raise_for_status()
        return time.perf_counter() - started

    def release(self) -> tuple[float, dict]:
        started = time.perf_counter()
        r = self.client.post(f"{self.gw.base_url}/local/release").raise_for_status().json()
        return time.perf_counter() - started, r


def _row(label: str, snap: dict) -> tuple[str, str]:
    parts = [f"{name} {mib(value)}" for name, value in snap.items() if value is not None]
    return label, ", ".join(parts)


def run(model: str, cycles: int) -> list[tuple[str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as work:
        settings = {k: v for k, v in os.environ.items() if k.startswith("LOCAL_LLM_")}
        env = {**settings, "LOCAL_LLM_MODEL": model}
        gw = Gateway(env=env, workdir=Path(work)).start()
        try:
            headers = {"Authorization": f"Bearer {gw.key}"}
            with httpx.Client(headers=headers, timeout=600) as client:
                probe = Probe(gw, client)
                rows.append(_row("started, nothing loaded", probe.snapshot()))
                first = probe.ask()
                rows.append(("first request (imports torch, loads), 1 token", f"{first:.2f} s"))
                rows.append(_row("after load", probe.snapshot()))
                for cycle in range(1, cycles + 1):
                    took, answer = probe.release()
                    assert answer["released"] == [LOCAL], answer
                    rows.append((f"release {cycle}: POST /local/release", f"{took * 1000:.0f} ms"))
                    rows.append(_row(f"after release {cycle}", probe.snapshot()))
                    reload = probe.ask()
                    rows.append((f"reload {cycle}: next request, 1 token", f"{reload:.2f} s"))
                    rows.append(_row(f"after reload {cycle}", probe.snapshot()))
                took, _ = probe.release()
                rows.append(("final release", f"{took * 1000:.0f} ms"))
                rows.append(_row("after final release", probe.snapshot()))
        finally:
            gw.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: build the tiny random Qwen3)")
    parser.add_argument("--cycles", type=int, default=3, help="release/reload rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = model_or_tiny(args.model, scratch)
        print_measures(args.model, run(model, args.cycles))


if __name__ == "__main__":
    main()
