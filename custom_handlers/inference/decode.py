"""One decoding step of the running batch: eager, or replayed from a captured CUDA graph.

An eager step launches every kernel of the model from Python, hundreds a step: for a 4B model on a
fast GPU the launches, not the GPU, set the pace. A CUDA graph records the step's kernels once and
replays them with one launch. A graph replays fixed shapes at fixed addresses, so here:

- **Shapes are bucketed.** A graph runs ``B`` rows (the power of two at or above the batch's rows,
  at most the pool's slots) over ``W`` columns (the longest row rounded up to ``COLUMN_STEP``).
  Rows ``rows .. B-1`` are padding: token 0 at position 0, in slots no row uses, attending only to
  their own column 0; their logits are dropped. Graphs are captured the first time their
  ``(B, W)`` is needed, all in one memory pool.
- **Inputs are copied into static buffers** (token ids and positions: a copy on the device, the
  engine keeps them there between steps, see ``Engine._step``); the attention mask is computed
  inside the graph from the positions, and each row writes its new key and value at its position
  (``kvbatch.Step``).
- **The KV pool stays put.** Graphs point into it, so the engine keeps the pool while the model is
  loaded (``KVBatch.keep_pool``); when the pool grows (a copy into new tensors) every graph is
  dropped and captured again as needed. Unloading the model frees the pool and the graphs.
- **Each graph is checked when captured.** The eager step that warms it up (needed before any
  capture) runs on the same inputs; the graph's replay must give the same logits (relative error
  below ``AGREE``). On any error or mismatch the model decodes eagerly from then on, and the log
  says why in one line. ``cuda_graphs: false`` (``LOCAL_LLM_CUDA_GRAPHS``) turns graphs off.

Why by hand: transformers' graphs come with ``torch.compile`` (``cache_implementation="static"``),
whose compilation takes minutes for a 4B model and whose static cache is one batch of fixed rows
that requests cannot join or leave; vLLM's runner is not a library. What is captured here is the
model's own forward on our slot pool, unchanged.

On the CPU the ``"static"`` mode runs the graph path's padded, bucketed step without capturing
(what the tests check: token for token the answers of eager decoding).
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from typing import Any

from custom_handlers.inference.kvbatch import KVBatch, Step, columns_for, power_of_two

log = logging.getLogger("custom_handlers.engine")

AGREE = 1e-2  # largest relative difference (L2) between a graph's logits and an eager step's


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


class _Graph:
    """One captured step (``graph`` None: the static mode, which runs ``step`` again)."""

    def __init__(self, step, graph: Any = None, logits: Any = None):
        self.step, self.graph, self.logits = step, graph, logits

    def run(self) -> Any:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.logits


class Decoder:
    """Decoding steps for one loaded model: ``mode`` is "cuda" (captured graphs), "static" (the
    graph path without capturing, for the CPU tests) or "eager"."""

    def __init__(self, model: Any, mode: str, label: str, off_reason: str | None = None):
        self._model = weakref.ref(model)  # not kept alive by this: unloading frees it
        self.mode = mode
        self.label = label  # the model, in the log line that turns graphs off
        self.off_reason = off_reason  # why graphs are not used (a setting, the device, an error)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool_id = 0  # the KV pool the graphs and buffers are for
        self._io: Any = None  # [2, slots, 1] int64: token ids, positions
        self._memory: Any = None  # the graphs' memory pool (CUDA)
        self.captured = 0  # graphs captured since load (recaptures included)
        self.capture_seconds = 0.0  # spent capturing and checking them (first steps of a bucket)

    def is_for(self, model: Any) -> bool:
        return self._model() is model

    @property
    def graphs(self) -> bool:
        return self.mode != "eager"

    def state(self) -> dict[str, object]:
        return {
            "enabled": self.graphs,
            "graphs": len(self._graphs),
            "capture_seconds": round(self.capture_seconds, 3),
            "off_reason": self.off_reason,
        }

    def step(self, model: Any, batch: KVBatch, inputs: Any, longest: int) -> Any:
        """Logits ``[rows, vocab]`` of the next step: ``inputs`` ``[2, rows]`` (int64, on the
        model's device) holds each row's token id and its position; ``longest`` is the largest
        position plus one (from the host's lengths: reading it from ``inputs`` would wait)."""
        if self.graphs:
            try:
                return self._replayed(model, batch, inputs, longest)
            except Exception as exc:  # any failure of the graph path: eager from now on
                self._turn_off(f"{type(exc).__name__}: {exc}")
        return self._eager(model, batch, inputs, longest)

    def _eager(self, model: Any, batch: KVBatch, inputs: Any, longest: int) -> Any:
        return decode_forward(model, batch, inputs[0, :, None], inputs[1, :, None], longest)

    def _replayed(self, model: Any, batch: KVBatch, inputs: Any, longest: int):
        import torch

        if batch.pool_id != self._pool_id:  # a new pool: graphs and buffers pointed at the old one
            self.drop()
            device = batch.keys[0].device
            self._io = torch.zeros((2, batch.slots, 1), dtype=torch.long, device=device)
            self._pool_id = batch.pool_id
        rows = inputs.shape[1]
        size = min(power_of_two(rows), batch.slots)
        width = min(batch.columns, columns_for(longest))
        self._io[:, :rows, 0].copy_(inputs)  # on the device: no copy from the host
        if size > rows:
            self._io[:, rows:size].zero_()  # padding rows: token 0 at position 0
        graph = self._graphs.get((size, width))
        if graph is None:
            graph = self._graphs[size, width] = self._capture(model, batch, size, width)
            return graph.logits[:rows]
        return graph.run()[:rows]

    def _capture(self, model: Any, batch: KVBatch, size: int, width: int) -> _Graph:
        """Capture the step for ``size`` rows over ``width`` columns, check it, and leave this
        step's logits in ``_Graph.logits``."""
        import torch

        started = time.perf_counter()
        step = functools.partial(
            decode_forward, model, batch, self._io[0, :size], self._io[1, :size], width
        )
        if self.mode == "static":
            expected, graph = step(), _Graph(step)
            graph.logits = graph.run()
        else:
            # Warm up on a side stream (lazy initialisations must not be captured); this eager
            # step is also what the graph must agree with. Both write the same keys and values.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                expected = step().clone()
            torch.cuda.current_stream().wait_stream(stream)
            if self._memory is None:
                self._memory = torch.cuda.graph_pool_handle()
            cuda_graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA work (a model loading) does not break it
            with torch.cuda.graph(cuda_graph, pool=self._memory, capture_error_mode="thread_local"):
                logits = step()
            graph = _Graph(step, cuda_graph, logits)
            cuda_graph.replay()
        self.captured += 1
        problem = disagreement(graph.logits, expected)  # waits for the device
        self.capture_seconds += time.perf_counter() - started
        if problem:
            raise GraphMismatch(f"a captured step (rows {size}, columns {width}) {problem}")
        if self.captured == 1:  # the check at load: one line saying graphs are in use
            log.info(
                "CUDA graphs on for %s: the first (rows %d, columns %d) agrees with an eager step "
                "(captured and checked in %.2f s)",
                self.label,
                size,
                width,
                self.capture_seconds,
            )
        return graph

    def drop(self) -> None:
        """Forget the graphs and their memory (captured again as needed)."""
        self._graphs.clear()
        self._io = self._memory = None
        self._pool_id = 0

    def _turn_off(self, reason: str) -> None:
        self.mode, self.off_reason = "eager", reason
        self.drop()
        log.warning("CUDA graphs off for %s, decoding runs eager: %s", self.label, reason)


def disagreement(got: Any, expected: Any) -> str | None:
    """Why ``got`` is not the logits ``expected``; None when they agree."""
    got, expected = got.float(), expected.float()
    if not bool(got.isfinite().all()):
        return "gave non-finite logits"
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
    if error > AGREE:
        return f"differs from an eager step by {error:.1e} (relative, at most {AGREE:g})"
    return None
