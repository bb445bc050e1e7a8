"""A pytest plugin: the client compatibility matrix (docs/compatibility.md), from a test run.

Tests marked ``@pytest.mark.compat(client, scenario)`` and parametrized with ``target`` ("local" or
"cloud") each fill one cell: passed, failed, "refused" when the test asserts the gateway's clear
400 for something the local model does not support (``refused="why"`` on the marker, for the local
target), or "not yet" for an expected failure (``xfail``: the reason says what it waits for).

A run that ran every compat test (``uv run pytest``, or ``uv run pytest tests/test_clients.py``)
rewrites the table in docs/compatibility.md between its markers. The table holds no date, so it is
byte-identical when nothing changed: the file shows a diff only when a client's version or a
result did. A partial run (``-k``, a node id, a stop on the first failure) leaves the page alone;
``--compat-matrix PATH`` writes whatever ran into PATH.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "compatibility.md"
JS_MODULES = Path(__file__).resolve().parent / "js" / "node_modules"
CLIENTS = {  # client name in the matrix -> the packages whose versions it shows
    "openai": ["openai"],
    "langchain-openai": ["langchain-openai"],
    "instructor": ["instructor"],
    "pydantic-ai": ["pydantic-ai-slim"],
    "openai-agents": ["openai-agents"],
    "dspy": ["dspy"],
    "smolagents": ["smolagents"],
    "llm": ["llm"],
    "litellm": ["litellm"],
    "openai (npm)": ["npm:openai"],
    "ai (Vercel AI SDK)": ["npm:ai", "npm:@ai-sdk/openai-compatible", "npm:zod"],
}
TARGETS = {"local": "qwen3-4b (local, tiny random model)", "cloud": "gpt-4o-mini (fake upstream)"}
BEGIN, END = "<!-- matrix: begin -->", "<!-- matrix: end -->"

_cells: dict[tuple[str, str], dict[str, str]] = {}
_notes: dict[tuple[str, str], tuple[str, str]] = {}  # (client, scenario) -> (mark, why)
_state = {"expected": {}, "worker": False}  # expected: cell -> its place in its module
_module_cells: dict[str, list[list[str]]] = {}  # module -> every cell its compat tests fill

# Under pytest-xdist the tests run in workers; each worker sends its reports to the controller,
# which writes the page. A report carries its cell and the cells its module would fill in
# ``user_properties`` (what xdist forwards), so the controller needs no collection of its own.


def pytest_addoption(parser):
    parser.addoption(
        "--compat-matrix",
        metavar="PATH",
        help="write the client compatibility matrix of this run into PATH (between its markers), "
        "even from a partial run",
    )


def pytest_configure(config):
    _state["worker"] = hasattr(config, "workerinput")


def pytest_collection_finish(session):
    """Every cell the compat tests of each collected module would fill, to tell a full run."""
    modules = {item.module for item in session.items if item.get_closest_marker("compat")}
    for module in modules:
        tests = [f for name, f in vars(module).items() if name.startswith("test_")]
        _module_cells[module.__name__] = [
            [*mark.args, target]
            for mark in [m for f in tests for m in getattr(f, "pytestmark", [])]
            if mark.name == "compat"
            for target in TARGETS
        ]


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
    note = None
    if report.skipped and hasattr(report, "wasxfail"):
        cell = "not yet ²"
        note = ("²", report.wasxfail.removeprefix("reason: "))
    elif report.skipped:
        cell = "skipped"
    elif report.passed:
        cell = "passed"
    else:
        cell = "**FAILED**"
    if refused and report.passed:
        cell = "refused (400) ¹"
        note = ("¹", refused)
    report.user_properties.append(("compat", [client, scenario, target, cell, note]))
    report.user_properties.append(("compat_module", _module_cells.get(item.module.__name__, [])))


def pytest_runtest_logreport(report):
    if _state["worker"]:
        return  # the controller records it
    props = dict(report.user_properties)
    if "compat" not in props:
        return
    client, scenario, target, cell, note = props["compat"]
    for place, expected in enumerate(props["compat_module"]):
        _state["expected"].setdefault(tuple(expected), place)
    if note:
        _notes[(client, scenario)] = tuple(note)
    previous = _cells.setdefault((client, scenario), {}).get(target)
    if previous is None or previous in ("passed", "refused (400) ¹"):
        _cells[(client, scenario)][target] = cell  # a failure anywhere in the cell stays


def _ran_in_full(session) -> bool:
    """Every cell of every module that ran a compat test was filled, and the run went to its end
    (a ``-k`` or a node id leaves cells of such a module empty; ``-x`` stops the session)."""
    ran = {(client, scenario, t) for (client, scenario), cells in _cells.items() for t in cells}
    return bool(_state["expected"]) and not session.shouldstop and ran >= _state["expected"].keys()


def pytest_sessionfinish(session):
    if _state["worker"]:
        return
    path = session.config.getoption("--compat-matrix")
    if path and _cells:
        _write(Path(path))
    elif not path and _ran_in_full(session):
        _state["written"] = _write(DOC)


def pytest_terminal_summary(terminalreporter):
    if "written" in _state:
        what = "rewritten (a version or a result changed)" if _state["written"] else "unchanged"
        terminalreporter.write_line(f"client matrix in docs/compatibility.md: {what}")


def version(package: str) -> str:
    """A Python distribution's version, or an npm package's from tests/js/node_modules."""
    if package.startswith("npm:"):
        name = package.removeprefix("npm:")
        try:
            meta = json.loads((JS_MODULES / name / "package.json").read_text())
        except FileNotFoundError:
            return f"{name} (not installed)"
        return f"{name} {meta['version']}"
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} (not installed)"


def _write(path: Path) -> bool:
    """Writes the matrix between the markers of ``path``; True if the file changed."""
    rows = ["| client | versions | scenario | " + " | ".join(TARGETS.values()) + " |"]
    rows.append("|---|---|---|" + "---|" * len(TARGETS))
    place = {(c, s): n for (c, s, _), n in reversed(_state["expected"].items())}
    for (client, scenario), cells in sorted(_cells.items(), key=lambda c: place.get(c[0], 1e9)):
        versions = ", ".join(version(p).removeprefix("npm:") for p in CLIENTS.get(client, [client]))
        line = [client, versions, scenario] + [cells.get(t, "not run") for t in TARGETS]
        rows.append("| " + " | ".join(line) + " |")
    notes = [
        f"- {mark} {client}, {scenario}: {why}"
        for (client, scenario), (mark, why) in sorted(
            _notes.items(), key=lambda n: (n[1][0], place.get(n[0], 1e9))
        )
    ]
    table = "\n".join([*rows, "", *notes])
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n{table}\n{END}{tail}"
    if new == text:
        return False
    path.write_text(new)
    return True
