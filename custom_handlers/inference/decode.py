"""One decoding step of the running batch: eager, or replayed from a captured CUDA graph.

An eager step launches every kernel of the model from Python, hundreds a step: for a 4B model on a
fast GPU the launches, not the GPU, set the pace. A CUDA graph records the step's kernels once and
replays them with one launch. A graph replays fixed shapes at fixed addresses, so here:

- **The KV pool is reserved whole and never moves.** With graphs, the engine allocates the KV
  budget at load as one block per layer (``KVBatch.reserve``); the pool's shape (slots x columns)
  is a view of it. Graphs are kept per shape: when the shape changes (a row needs more columns)
  the graphs of the old one stay valid and serve again when it comes back. Only a new block (after
  a failed step, or unloading) drops them: they point into the old one.
- **A bounded set of sizes per shape.** A graph runs ``B`` rows (the powers of two below the
  pool's slots, and the slots) over ``W`` columns (256, 512, 1024, ... below the pool's columns,
  and the columns): for 16 slots of 768 columns, 5 x 3 graphs. A step uses the smallest that holds
  it; rows ``rows .. B-1`` are padding: token 0 at position 0, in slots no row uses, attending only
  to their own column 0; their logits are dropped.
- **Captured when it costs nothing**: all the sizes of the pool's shape right after load (before
  the first request is prefilled), and the sizes of a new shape at the engine's next idle moment,
  one at a time, stopping as soon as a request arrives. A step whose graph is not captured yet
  runs eagerly: no running stream stalls for a capture.
- **Inputs are copied into static buffers** (token ids and positions: a copy on the device, the
  engine keeps them there between steps, see ``Runner.decode``); the attention mask is computed
  inside the graph from the positions, and each row writes its new key and value at its position
  (``kvbatch.Step``).
- **Each graph is checked when captured.** The eager step that warms it up (needed before any
  capture) runs on the same inputs; the graph's replay, into logits first set to NaN (a replay
  that computes nothing cannot pass), must give the same logits (relative error below ``AGREE``).
  On a mismatch or an error the model decodes eagerly from then on, and the log says why in one
  line; an out-of-memory error only skips that size, tried again at the next idle moment (at most
  ``TRIES`` times). ``cuda_graphs: false`` (``LOCAL_LLM_CUDA_GRAPHS``) turns graphs off.
- **On the model's own device and stream.** Warm-up, capture and replay run with the model's
  device current (``cuda:1`` included) on one side stream per model, made once: cuBLAS keeps a
  workspace per stream, and two models capturing at once never share torch's default capture
  stream. Unloading frees the graphs and those workspaces (``release``).
- **torch < 2.12** (pytorch#180395): a capture that fails inside ``cudaStreamEndCapture`` leaves
  the allocator believing a capture is still running, and every later ``empty_cache`` (torch's own
  at the next capture included) fails an internal assert. After any failed capture the decoder
  ends the pool's allocation itself (``CudaApi.end_capture``; a no-op where nothing was left
  open).

Why by hand: transformers' graphs come with ``torch.compile`` (``cache_implementation="static"``),
whose compilation takes minutes for a 4B model and whose static cache is one batch of fixed rows
that requests cannot join or leave; vLLM's runner is not a library. What is captured here is the
model's own forward on our slot pool, unchanged.

On the CPU the ``"static"`` mode runs the graph path's padded, bucketed step without capturing
(what the tests check: token for token the answers of eager decoding), and the ``"cuda"`` mode
runs with a stand-in for ``CudaApi`` (tests/fake_cuda.py) that records streams, devices and
captures and replays the recorded operations.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from typing import Any

from custom_handlers.inference.kvbatch import COLUMN_STEP, KVBatch, Step

log = logging.getLogger("custom_handlers.engine")

AGREE = 1e-2  # largest relative difference (L2) between a graph's logits and an eager step's
TRIES = 3  # captures of one size that ran out of memory before that size is left eager


class GraphMismatch(RuntimeError):
    pass


def decode_forward(model: Any, batch: KVBatch, ids: Any, positions: Any, width: int) -> Any:
    """Logits ``[rows, vocab]`` of one step: ``ids`` and ``positions`` are ``[rows, 1]``."""
    import torch

    rows = ids.shape[0]
    device = ids.device
    write_at = positions[:, 0]
    columns = torch.arange(width, device=device)
    mask = (columns[None, :] <= positions)[:, None, None, :]  # [rows, 1, 1, width]: bool
    batch.step = Step(rows, width, torch.arange(rows, device=device), write_at)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    return model(**inputs, cache=batch.cache, use_cache=True).logits[:, -1]


def block_forward(
    model: Any, batch: KVBatch, ids: Any, positions: Any, counts: list[int], width: int
) -> Any:
    """Logits ``[rows, T, vocab]`` of a step in which row ``i`` takes its first ``counts[i]``
    inputs of ``ids`` ``[rows, T]`` (at ``positions`` ``[rows, T]``, consecutive from the row's
    length), the rest padding: a prefill chunk, forced tokens or a draft to verify, next to rows
    taking one token. Each token taken attends to its row's columns up to its own position (the
    tokens before it in the block included: their keys are written first); a padding input sits
    at its row's last position taken and writes nothing, and its logits mean nothing. Eager: the
    tokens taken set the shapes of the writes."""
    import torch

    rows, block = ids.shape
    device = ids.device
    taken = (
        torch.arange(block, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    )
    last = (torch.tensor(counts, device=device) - 1).clamp_min(0)
    at = torch.where(taken, positions, positions.gather(1, last[:, None]))
    row_index, column = taken.nonzero(as_tuple=True)
    write_at = at[row_index, column]
    columns = torch.arange(width, device=device)
    mask = (columns[None, None, :] <= at[:, :, None])[:, None]  # [rows, 1, T, width]: bool
    batch.step = Step(rows, width, row_index, write_at, taken)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": at}
    return model(**inputs, cache=batch.cache, use_cache=True).logits


def row_sizes(slots: int) -> list[int]:
    """The row counts graphs are captured for in a pool of ``slots`` slots."""
    return [1 << k for k in range(slots.bit_length()) if 1 << k < slots] + [slots]


def widths(columns: int) -> list[int]:
    """The widths graphs are captured for in a pool of ``columns`` columns."""
    steps = [COLUMN_STEP << k for k in range(columns.bit_length()) if COLUMN_STEP << k < columns]
    return [*steps, columns]


def _smallest(sizes: list[int], at_least: int) -> int:
    return next(size for size in sizes if size >= at_least)


def _out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"  # torch's, CUDA's, without importing torch


class CudaApi:
    """The CUDA calls of the graph path, in one place: a CPU test stands in for it
    (tests/fake_cuda.py) and runs the rest of this file's CUDA logic as it is."""

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def new_stream(self, device: Any) -> Any:
        return self._torch.cuda.Stream(device=device)

    def on_stream(self, stream: Any) -> Any:
        return self._torch.cuda.stream(stream)

    def on_device(self, device: Any) -> Any:
        return self._torch.cuda.device(device)

    def current_stream(self, device: Any) -> Any:
        return self._torch.cuda.current_stream(device)

    def new_pool(self) -> Any:
        return self._torch.cuda.graph_pool_handle()

    def new_graph(self) -> Any:
        return self._torch.cuda.CUDAGraph()

    def capturing(self, graph: Any, pool: Any, stream: Any) -> Any:
        # thread_local: another thread's CUDA work (a model loading) does not break it
        cuda = self._torch.cuda
        return cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local")

    def end_capture(self, device: Any, pool: Any) -> bool:
        """After a failed capture: end the allocator's capture into ``pool`` if the failure left
        it open (torch < 2.12, pytorch#180395); False where nothing was open."""
        index = self._torch.device(device).index or 0
        try:
            self._torch._C._cuda_endAllocateToPool(index, pool)
        except RuntimeError:  # "not currently recording to mempool_id": the state was fine
            return False
        return True

    def reserved_bytes(self, device: Any) -> int:
        return self._torch.cuda.memory_reserved(device)

    def clear_workspaces(self) -> None:
        """Free cuBLAS's per-stream workspaces (``empty_cache`` does not)."""
        self._torch._C._cuda_clearCublasWorkspaces()


class _Graph:
    """One captured step (``graph`` None: the static mode, which runs ``step`` again)."""

    def __init__(self, step, graph: Any = None, logits: Any = None):
        self.step, self.graph, self.logits = step, graph, logits
        self.rows = step.args[2].shape[0]  # decode_forward's ids: the rows it runs

    def run(self) -> Any:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.logits


class Decoder:
    """Decoding steps for one loaded model: ``mode`` is "cuda" (captured graphs), "static" (the
    graph path without capturing, for the CPU tests) or "eager"."""

    def __init__(
        self,
        model: Any,
        mode: str,
        label: str,
        off_reason: str | None = None,
        cuda: CudaApi | None = None,
    ):
        self._model = weakref.ref(model)  # not kept alive by this: unloading frees it
        self.mode = mode
        self.label = label  # the model, in the log line that turns graphs off
        self.off_reason = off_reason  # why graphs are not used (a setting, the device, an error)
        self._cuda = (cuda or CudaApi()) if mode == "cuda" else None
        self._device: Any = getattr(model, "device", None)  # current while capturing, replaying
        self._stream: Any = None  # this model's capture stream, made once
        self._graphs: dict[tuple[int, int, int, int], _Graph] = {}  # slots, columns, rows, width
        self._short_of_memory: dict[tuple[int, int, int, int], int] = {}  # failed tries per size
        self._pool_id = 0  # the KV pool the graphs and buffers are for
        self._io: Any = None  # [2, slots, 1] int64: token ids, positions
        self._memory: Any = None  # the graphs' memory pool (CUDA)
        self._graph_bytes = 0  # device memory the captures took (CUDA)
        self.captured = 0  # graphs captured since load (recaptures included)
        self.capture_seconds = 0.0  # spent capturing and checking them
        self.eager_steps = 0  # steps whose size had no graph yet (decoded eagerly)

    def is_for(self, model: Any) -> bool:
        return self._model() is model

    @property
    def graphs(self) -> bool:
        return self.mode != "eager"

    def state(self) -> dict[str, object]:
        graphs = list(self._graphs.values())  # the engine thread may change it meanwhile
        if self.mode == "cuda":
            memory = self._graph_bytes
        else:
            memory = sum(g.logits.nbytes for g in graphs if g.logits is not None)
        return {
            "enabled": self.graphs,
            "graphs": len(graphs),
            "captured": self.captured,
            "capture_seconds": round(self.capture_seconds, 3),
            "memory_bytes": memory,
            "eager_steps": self.eager_steps,
            "off_reason": self.off_reason,
        }

    def step(self, model: Any, batch: KVBatch, inputs: Any, longest: int) -> Any:
        """Logits ``[rows, vocab]`` of the next step: ``inputs`` ``[2, rows]`` (int64, on the
        model's device) holds each row's token id and its position; ``longest`` is the largest
        position plus one (from the host's lengths: reading it from ``inputs`` would wait)."""
        if self.graphs:
            try:
                logits = self._replayed(batch, inputs, longest)
            except Exception as exc:  # any failure of the graph path: eager from now on
                self._turn_off(f"{type(exc).__name__}: {exc}")
            else:
                if logits is not None:
                    return logits
                self.eager_steps += 1  # not captured yet: the next idle moment does
        return self._eager(model, batch, inputs, longest)

    def _eager(self, model: Any, batch: KVBatch, inputs: Any, longest: int) -> Any:
        return decode_forward(model, batch, inputs[0, :, None], inputs[1, :, None], longest)

    def _key(self, batch: KVBatch, rows: int, longest: int) -> tuple[int, int, int, int]:
        slots, columns = batch.slots, batch.columns
        return (
            slots,
            columns,
            _smallest(row_sizes(slots), rows),
            _smallest(widths(columns), longest),
        )

    def _follow_pool(self, batch: KVBatch) -> None:
        """A new pool (new tensors): graphs and buffers pointed at the old one."""
        if batch.pool_id == self._pool_id:
            return
        self.drop()
        slots = max(batch.slots, batch.budget.max_slots if batch.budget else 0)
        self._io = _zeros_like_ids((2, slots, 1), batch.keys[0].device)
        self._pool_id = batch.pool_id

    def _replayed(self, batch: KVBatch, inputs: Any, longest: int) -> Any:
        """The step replayed from its graph; None when its size has none yet."""
        self._follow_pool(batch)
        rows = inputs.shape[1]
        graph = self._graphs.get(self._key(batch, rows, longest))
        if graph is None:
            return None
        size = graph.rows
        self._io[:, :rows, 0].copy_(inputs)  # on the device: no copy from the host
        if size > rows:
            self._io[:, rows:size].zero_()  # padding rows: token 0 at position 0
        if self._cuda is None:
            return graph.run()[:rows]
        with self._cuda.on_device(self._device):
            return graph.run()[:rows]

    def capture_missing(self, model: Any, batch: KVBatch, stop=lambda: False) -> int:
        """Capture the graphs of the pool's present shape that are not captured yet, while no row
        runs (at load, at an idle moment), one by one until ``stop()``; how many were captured.
        A size that runs out of memory is skipped (tried again next time, ``TRIES`` at most);
        any other failure turns graphs off."""
        if not self.graphs or batch.rows or not batch.keys:
            return 0
        self._follow_pool(batch)
        slots, columns = batch.slots, batch.columns
        done, started = 0, time.perf_counter()
        for size in row_sizes(slots):
            for width in widths(columns):
                key = (slots, columns, size, width)
                if key in self._graphs or self._short_of_memory.get(key, 0) >= TRIES:
                    continue
                if stop():
                    return done
                try:
                    self._graphs[key] = self._capture(model, batch, size, width)
                except Exception as exc:
                    if not _out_of_memory(exc):
                        self._turn_off(f"{type(exc).__name__}: {exc}")
                        return done
                    tries = self._short_of_memory[key] = self._short_of_memory.get(key, 0) + 1
                    log.warning(
                        "CUDA graph for %s (rows %d, columns %d) not captured: out of GPU memory "
                        "(try %d of %d); such steps decode eagerly",
                        self.label,
                        size,
                        width,
                        tries,
                        TRIES,
                    )
                    continue
                done += 1
        if done:
            log.info(
                "CUDA graphs for %s: %d captured for %d slots x %d columns in %.2f s, each "
                "agreeing with an eager step (%d in all)",
                self.label,
                done,
                slots,
                columns,
                time.perf_counter() - started,
                len(self._graphs),
            )
        return done

    def _capture(self, model: Any, batch: KVBatch, size: int, width: int) -> _Graph:
        """Capture the step for ``size`` rows over ``width`` columns (inputs: token 0 at position
        0, in slots no row uses) and check it against the eager step that warms it up."""
        started = time.perf_counter()
        self._io[:, :size].zero_()
        step = functools.partial(
            decode_forward, model, batch, self._io[0, :size], self._io[1, :size], width
        )
        try:
            if self._cuda is None:  # static: the step itself, run again at each replay
                expected = step().clone()
                graph = _Graph(step)
                graph.logits = graph.run()
            else:
                with self._cuda.on_device(self._device):
                    expected, graph = self._record(step)
            self.captured += 1
            problem = disagreement(graph.logits, expected)  # waits for the device
        finally:
            self.capture_seconds += time.perf_counter() - started
        if problem:
            raise GraphMismatch(f"a captured step (rows {size}, columns {width}) {problem}")
        return graph

    def _record(self, step) -> tuple[Any, _Graph]:
        """Warm ``step`` up on this model's side stream (lazy initialisations must not be
        captured; its logits are what the graph must give), capture it, replay it once."""
        cuda, device = self._cuda, self._device
        if self._stream is None:
            self._stream = cuda.new_stream(device)
        stream, current = self._stream, cuda.current_stream(device)
        stream.wait_stream(current)
        with cuda.on_stream(stream):
            expected = step().clone()
        current.wait_stream(stream)
        if self._memory is None:
            self._memory = cuda.new_pool()
        before = cuda.reserved_bytes(device)
        cuda_graph = cuda.new_graph()
        try:
            with cuda.capturing(cuda_graph, self._memory, stream):
                logits = step()
        except BaseException:
            cuda.end_capture(device, self._memory)  # torch < 2.12 may have left it open
            raise
        finally:
            self._graph_bytes += max(0, cuda.reserved_bytes(device) - before)
        logits.fill_(float("nan"))  # a replay that computes nothing cannot pass the check
        cuda_graph.replay()
        return expected, _Graph(step, cuda_graph, logits)

    def drop(self) -> None:
        """Forget the graphs and their memory (captured again at the next idle moment)."""
        self._graphs.clear()
        self._short_of_memory.clear()
        self._io = self._memory = None
        self._pool_id = self._graph_bytes = 0

    def release(self) -> None:
        """The model is unloaded: graphs, buffers, the side stream and cuBLAS's workspaces go."""
        self.drop()
        self._stream = None
        if self._cuda is not None:
            self._cuda.clear_workspaces()

    def _turn_off(self, reason: str) -> None:
        self.mode, self.off_reason = "eager", reason
        self.drop()
        log.warning("CUDA graphs off for %s, decoding runs eager: %s", self.label, reason)


def _zeros_like_ids(shape: tuple[int, ...], device: Any) -> Any:
    import torch

    return torch.zeros(shape, dtype=torch.long, device=device)


def disagreement(got: Any, expected: Any) -> str | None:
    """Why ``got`` is not the logits ``expected``; None when they agree."""
    got, expected = got.float(), expected.float()
    if not bool(got.isfinite().all()):
        return "gave non-finite logits"
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
    if error > AGREE:
        return f"differs from an eager step by {error:.1e} (relative, at most {AGREE:g})"
    return None
