"""Reduced reproduction of the gateway's segmentation fault (python/cpython#148891).

    uv run python scripts/hamt_reentry.py          # dies with SIGSEGV at once (exit 139)
    uv run python scripts/hamt_reentry.py --read   # the finalizer only reads: runs clean

An object in a reference cycle whose ``__del__`` sets a context variable (as LiteLLM 1.108.7's
``CustomStreamWrapper.__del__`` does) is finalized by the cyclic garbage collector. A collection can
start inside the allocation ``ContextVar.set`` makes while it copies the context's mapping; the
finalizer's own ``set`` then replaces that mapping and frees it under the first one. No LiteLLM,
no uvloop, no threads: a low collection threshold only makes it happen in the first iterations
instead of after a few thousand requests. ``custom_handlers.gateway.litellm_patches`` is the fix.
"""

from __future__ import annotations

import argparse
import contextvars
import gc

VARIABLES = [contextvars.ContextVar(f"v{i}") for i in range(40)]
TRACE_ID = contextvars.ContextVar("trace_id", default=None)


class AbandonedStream:
    """Stands in for LiteLLM's stream wrapper: in a cycle, with a finalizer touching the context."""

    read_only = False

    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it

    def __del__(self) -> None:
        if self.read_only:
            TRACE_ID.get()
        else:
            TRACE_ID.set(object())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--read", action="store_true", help="the finalizer only reads (control)")
    parser.add_argument("--iterations", type=int, default=1_000_000)
    args = parser.parse_args()
    AbandonedStream.read_only = args.read
    gc.set_threshold(5)

    def work() -> None:
        for i in range(args.iterations):
            AbandonedStream()
            VARIABLES[i % len(VARIABLES)].set(i)

    contextvars.copy_context().run(work)
    print(f"no crash in {args.iterations} iterations")


if __name__ == "__main__":
    main()
