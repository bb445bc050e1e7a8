"""What every benchmark script shares: the model to use, process memory, how a result is printed."""

from __future__ import annotations

import platform
from pathlib import Path

from tests.conftest import _load_builder

MiB = 1024 * 1024


def process_memory(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process, in bytes, from /proc: VmRSS resident now, VmHWM its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def mib(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / MiB:,.0f} MiB" if value >= 10 * MiB else f"{value / 1024:,.0f} KiB"


def model_or_tiny(model: str | None, scratch: str) -> str:
    """``model`` when given, else the tiny random-weight Qwen3, built in ``scratch``."""
    return model or str(_load_builder().build(Path(scratch) / "tiny"))


def machine_line(model: str | None, details: str = "") -> str:
    line = (
        f"Machine: {platform.machine()}, Python {platform.python_version()}; "
        f"model: {model or 'tiny random Qwen3'}"
    )
    return f"{line}; {details}\n" if details else f"{line}\n"


def print_measures(model: str | None, rows: list[tuple[str, str]], details: str = "") -> None:
    """The machine, then a Markdown table of (measure, value) rows."""
    print(machine_line(model, details))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
