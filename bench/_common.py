"""What every benchmark script shares: the model to use and how a result is printed."""

from __future__ import annotations

import platform
from pathlib import Path

from tests.conftest import _load_builder


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
