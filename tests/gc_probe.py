"""Start the LiteLLM proxy with a probe on what the cyclic garbage collector runs.

    python tests/gc_probe.py REPORT_FILE [litellm options ...]

A finalizer that sets a context variable while the collector runs can free the context's mapping
under a ``ContextVar.set`` in progress (python/cpython#148891): that is how the gateway used to die
with SIGSEGV. This probe appends one line to REPORT_FILE for every ``ContextVar.set`` or ``reset``
made during a collection by the thread running it (the re-entry that corrupts; another thread that
runs meanwhile, while a finalizer has released the GIL, sets its own context's variables safely),
with the Python frames that made it. It first checks itself on a
finalizer of its own and writes ``self-test ok`` when it saw that one, so an empty report means
"none happened", not "the probe saw nothing".
"""

from __future__ import annotations

import contextvars
import gc
import sys
import threading
import traceback

_collecting: int | None = None  # the thread running a collection, if one runs


def main() -> None:
    report_path, litellm_args = sys.argv[1], sys.argv[2:]
    report = open(report_path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    def on_collection(phase: str, info: dict) -> None:
        global _collecting
        _collecting = threading.get_ident() if phase == "start" else None

    def probe(frame, event: str, arg) -> None:
        if event != "c_call" or _collecting is None or _collecting != threading.get_ident():
            return
        owner = getattr(arg, "__self__", None)
        if isinstance(owner, contextvars.ContextVar) and arg.__name__ in ("set", "reset"):
            where = " <- ".join(
                f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}"
                for f in reversed(traceback.extract_stack(frame, limit=6))
            )
            report.write(f"{arg.__name__} {owner.name} in {threading.current_thread().name}: ")
            report.write(f"{where}\n")

    gc.callbacks.append(on_collection)
    sys.setprofile(probe)
    threading.setprofile(probe)
    _self_test(report)

    from litellm.proxy.proxy_cli import run_server

    sys.argv = ["litellm", *litellm_args]
    run_server()


def _self_test(report) -> None:
    """Finalize a cycle whose ``__del__`` sets a variable; the probe must report it."""
    variable = contextvars.ContextVar("gc_probe_self_test")

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            variable.set(1)

    mark = report.tell()
    Cycle()
    gc.collect()
    report.flush()
    with open(report.name) as written:
        written.seek(mark)
        seen = "gc_probe_self_test" in written.read()
    report.truncate(mark)
    report.seek(mark)
    report.write("self-test ok\n" if seen else "self-test FAILED\n")


if __name__ == "__main__":
    main()
