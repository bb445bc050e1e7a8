"""A pytest plugin: the client compatibility matrix (docs/compatibility.md), from a test run.

Tests marked ``@pytest.mark.compat(client, scenario)`` and parametrized with ``target`` ("local" or
"cloud") each fill one cell: passed, failed, or "refused" when the test asserts the gateway's clear
400 for something the local model does not support (``refused="why"`` on the marker, for the local
target). ``uv run pytest tests/test_clients.py --compat-matrix docs/compatibility.md`` rewrites
the page's table from what ran.
"""

from __future__ import annotations

import datetime
import importlib.metadata
from pathlib import Path

import pytest

CLIENTS = {  # client name in the matrix -> the package whose version it shows
    "openai": "openai",
    "langchain-openai": "langchain-openai",
    "instructor": "instructor",
    "pydantic-ai": "pydantic-ai-slim",
}
TARGETS = {"local": "qwen3-4b (local, tiny random model)", "cloud": "gpt-4o-mini (fake upstream)"}
BEGIN, END = "<!-- matrix: begin -->", "<!-- matrix: end -->"

_cells: dict[tuple[str, str], dict[str, str]] = {}
_reasons: dict[tuple[str, str], str] = {}


def pytest_addoption(parser):
    parser.addoption(
        "--compat-matrix",
        metavar="PATH",
        help="write the client compatibility matrix of this run into PATH (between its markers)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    mark = item.get_closest_marker("compat")
    callspec = getattr(item, "callspec", None)
    if mark is None or callspec is None or "target" not in callspec.params:
        return
    if report.when != "call" and report.passed:
        return
    client, scenario = mark.args
    target = callspec.params["target"]
    refused = mark.kwargs.get("refused") if target == "local" else None
    cell = "skipped" if report.skipped else "passed" if report.passed else "**FAILED**"
    if refused and report.passed:
        cell = "refused (400) ¹"
        _reasons[(client, scenario)] = refused
    previous = _cells.setdefault((client, scenario), {}).get(target)
    if previous is None or previous.startswith("passed") or previous.startswith("refused"):
        _cells[(client, scenario)][target] = cell  # a failure anywhere in the cell stays


def pytest_sessionfinish(session):
    path = session.config.getoption("--compat-matrix")
    if path and _cells:
        _write(Path(path))


def _write(path: Path) -> None:
    rows = ["| client | scenario | " + " | ".join(TARGETS.values()) + " |"]
    rows.append("|---|---|" + "---|" * len(TARGETS))
    for (client, scenario), cells in _cells.items():
        version = importlib.metadata.version(CLIENTS.get(client, client))
        line = [f"{client} {version}", scenario] + [cells.get(t, "not run") for t in TARGETS]
        rows.append("| " + " | ".join(line) + " |")
    notes = [
        f"¹ {client}, {scenario}: {why}" for (client, scenario), why in sorted(_reasons.items())
    ]
    stamp = datetime.date.today().isoformat()
    table = "\n".join([f"Produced by a test run on {stamp}.", "", *rows, "", *notes])
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
