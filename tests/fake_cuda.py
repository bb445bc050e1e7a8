"""A stand-in for ``decode.CudaApi`` on the CPU: the graph path's CUDA logic, run as it is.

What it records: every stream made (and for which device), the device current and the stream
used at each capture and replay, the memory pool given, the allocator's capture state, and the
cuBLAS workspaces cleared. What it does: a "capture" records the aten operations the step runs
(a ``TorchDispatchMode``), refusing, as CUDA does, a host sync inside it; a "replay" runs those
operations again on the same tensors, writing each result where the capture's was, as a CUDA
graph replays its kernels on the same addresses. So a replayed step computes from the static
inputs and the KV pool as they are at replay, and a wrong capture (a buffer that moved, an input
outside the static buffers) shows as wrong logits.

It also models torch < 2.12's allocator bug (pytorch#180395): with ``leaves_capture_open``, a
failed capture leaves its pool "capturing", and ``empty_cache`` (which torch's own ``graph``
context calls on entry) then fails an internal assert until ``end_capture`` ends it.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class CaptureFailed(RuntimeError):
    pass


@dataclass
class FakeStream:
    device: Any
    waits: int = 0

    def wait_stream(self, other: Any) -> None:
        self.waits += 1


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            raise RuntimeError("operation not permitted when stream is capturing (a host sync)")
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out


@dataclass
class FakeGraph:
    api: FakeCuda
    ops: list = field(default_factory=list)
    replays: int = 0

    def replay(self) -> None:
        self.api.replays.append((self.api.device, self))
        self.replays += 1
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_leaves(out), tree_leaves(new), strict=True):
                if _is_tensor(old) and fresh is not old and _elsewhere(fresh, old):
                    old.copy_(fresh)


class FakeCuda:
    """Records what the graph path asks of CUDA; see the module's docstring."""

    def __init__(self, leaves_capture_open: bool = False) -> None:
        self.leaves_capture_open = leaves_capture_open
        self.device: Any = None  # the current device (None: never set)
        self.streams: list[FakeStream] = []
        self.stream: FakeStream | None = None  # the current stream (None: the default one)
        self.captures: list[dict] = []  # one per capture: device, stream, pool
        self.replays: list[tuple[Any, FakeGraph]] = []
        self.pools = 0
        self.open_captures: set = set()  # pools the allocator believes are being captured
        self.ended: list = []  # end_capture calls that ended something
        self.workspaces_cleared = 0
        self.fail_next: list[BaseException] = []  # raised by the next captures, in order
        self.reserved = 0
        self.lock = threading.Lock()

    # ---- decode.CudaApi --------------------------------------------------------------------

    def new_stream(self, device: Any) -> FakeStream:
        stream = FakeStream(device)
        self.streams.append(stream)
        return stream

    @contextlib.contextmanager
    def on_stream(self, stream: FakeStream):
        before, self.stream = self.stream, stream
        try:
            yield
        finally:
            self.stream = before

    @contextlib.contextmanager
    def on_device(self, device: Any):
        before, self.device = self.device, torch.device(device)
        try:
            yield
        finally:
            self.device = before

    def current_stream(self, device: Any) -> FakeStream:
        return self.stream or FakeStream(device)

    def new_pool(self) -> tuple[int, int]:
        self.pools += 1
        return (0, self.pools)

    def new_graph(self) -> FakeGraph:
        return FakeGraph(self)

    @contextlib.contextmanager
    def capturing(self, graph: FakeGraph, pool: Any, stream: Any):
        self.empty_cache()  # torch.cuda.graph's __enter__ does
        self.captures.append({"device": self.device, "stream": stream, "pool": pool})
        self.open_captures.add(pool)
        with self.on_stream(stream), _Recorder(graph.ops):
            yield
        failure = self.fail_next.pop(0) if self.fail_next else None
        if failure is not None:  # as cudaStreamEndCapture failing
            if not self.leaves_capture_open:
                self.open_captures.discard(pool)
            raise failure
        self.open_captures.discard(pool)
        self.reserved += sum(
            t.nbytes for _, _, _, out in graph.ops for t in tree_leaves(out) if _is_tensor(t)
        )

    def end_capture(self, device: Any, pool: Any) -> bool:
        if pool not in self.open_captures:
            return False
        self.open_captures.discard(pool)
        self.ended.append(pool)
        return True

    def reserved_bytes(self, device: Any) -> int:
        return self.reserved

    def clear_workspaces(self) -> None:
        self.workspaces_cleared += 1

    # ---- the allocator ---------------------------------------------------------------------

    def empty_cache(self) -> None:
        if self.open_captures:
            raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED")


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _elsewhere(fresh: torch.Tensor, old: torch.Tensor) -> bool:
    """The replayed result is not already where the captured one is (a view of the same data)."""
    return fresh.data_ptr() != old.data_ptr() or fresh.stride() != old.stride()
