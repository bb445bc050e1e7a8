"""Columns for bench/gpu.py's runner that fail the ways a GPU column can: raise (a 4-bit load that
breaks, an out-of-memory), die without a word (killed), or hang past their budget. Each runs in a
process of its own, as bench/gpu.py's columns do, so they live in this small module the spawned
process can import (no pytest, no torch).
"""

from __future__ import annotations

import os
import threading


def completes(cells, **_) -> None:
    cells.measuring("load")
    cells("load", "2.0 s")
    cells.measuring("single")
    cells("single", "50 tokens/s")


def raises(cells, **_) -> None:
    cells.measuring("load")
    cells("load", "1.0 s")
    cells.measuring("single")
    raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB | simulated")


def dies(cells, **_) -> None:
    cells.measuring("load")
    cells("load", "1.5 s")
    cells.measuring("agg8")
    os._exit(9)  # as the kernel's out-of-memory killer would end it: no exception, no word


def hangs(cells, **_) -> None:
    cells.measuring("load")
    cells("load", "3.0 s")
    cells.measuring("agg16")
    threading.Event().wait()  # never set: only the budget ends it


def a_row_fails(cells, **_) -> None:
    cells.measuring("json8")
    cells("json8", "FAILED: ValueError: the constraint broke (simulated)")
    cells.measuring("prefix")
    cells("prefix", "12 ms cold, 3 ms seen before")
