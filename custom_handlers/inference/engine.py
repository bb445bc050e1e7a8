"""The generation thread: continuous batching of every request's choices, token by token.

Generation never runs on the proxy's event loop. One worker thread owns a batch of rows (one row
per choice of a request). Between two decoding steps, new requests join (the prompts taken are
prefilled together, then their KV is copied into the batch's slots) and finished or cancelled rows
leave. Each row has its own sampling parameters, seed, stop strings, token budget and, where asked,
JSON constraint.

Each job carries its own output channel (a ``Sink``) and a cancel flag checked before every step,
so a caller who goes away leaves the batch at the next step. Events a job emits, in order:
``Delta`` (text for one choice) and ``CallDelta`` (a piece of a tool call), ``Finish`` (one per
choice), then ``Done``; or ``Failed``, then ``Done``.

A row that may call tools writes text until it samples ``<tool_call>``; from then on it follows the
calls' grammar (from its first token when a call is required), and its tokens go to a
``CallReader`` instead of the text pipeline.

Why not transformers' own continuous batching: it has no per-request seed and applies custom
logits processors (our JSON constraint) to the whole batch; and ``generate`` batches cannot take a
request that arrives while they run. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from custom_handlers.inference.constraints import JsonMatcher, mask_along, mask_logits
from custom_handlers.inference.decode import CudaApi, Decoder, block_forward
from custom_handlers.inference.errors import (
    InvalidRequestError,
    LocalLLMError,
    ModelUnavailableError,
    OverloadedError,
    drop_frames,
)
from custom_handlers.inference.kvbatch import (
    KVBatch,
    KVBudget,
    columns_for,
    kv_shape,
    kv_token_bytes,
)
from custom_handlers.inference.loader import LoadedModel, ModelHolder
from custom_handlers.inference.packed import packed_forward
from custom_handlers.inference.penalties import PenaltyCounts
from custom_handlers.inference.prefix import PrefixCache, start_cache
from custom_handlers.inference.request import SamplingParams
from custom_handlers.inference.sampling import (
    BatchSampling,
    RowSampling,
    kept_logits,
    row_sampling,
    token_logprobs,
)
from custom_handlers.inference.speculation import PromptLookup, accept, forced_draft
from custom_handlers.inference.text import IncrementalDecoder, TextPipeline
from custom_handlers.inference.tools import CallDelta, CallReader

log = logging.getLogger("custom_handlers.engine")

_STOP = object()  # queued at exit: the engine thread stops
GRAPHS_OFF_BY_SETTING = "turned off (cuda_graphs: false)"
_STOP_WAIT_S = 10.0
# The idle wait is cut into waits of at most this long: keep_alive is bounded where it is read, but
# a wait past threading.TIMEOUT_MAX (~9.2e9 s) raised OverflowError on every loop of the thread.
_LONGEST_WAIT_S = 3600.0
# A loop of the engine thread that fails again and again waits between tries: 10 ms, doubling, at
# most a second; never a spin (issue 20: 641,825 log lines in 6 s at 100 % of a core).
_FIRST_BACKOFF_S = 0.01
# A prompt's own logprobs (echo with logprobs) are read this many positions at a time: each slice
# is copied to float32 (vocabulary x 4 bytes a position: 150k tokens, 0.6 MB).
_PROMPT_LOGPROB_ROWS = 256
_LONGEST_BACKOFF_S = 1.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives (OpenAI's shape)."""

    token: str
    bytes: list[int]
    logprob: float
    top: tuple[tuple[str, list[int], float], ...] = ()  # (token, bytes, logprob), best first


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind this text, when asked for


@dataclass(frozen=True)
class Finish:
    index: int
    reason: str  # "stop", "length" or "tool_calls"
    completion_tokens: int
    complete_calls: int = 0  # tool calls closed (a call cut by max_tokens is not)
    reasoning_tokens: int = 0  # of completion_tokens, those of a think block (not sent)


@dataclass(frozen=True)
class Failed:
    error: LocalLLMError


@dataclass(frozen=True)
class Done:
    pass


Event = Delta | CallDelta | Finish | Failed | Done


class SyncSink:
    """Output channel for a caller in a plain thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Event] = queue.Queue()

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def get(self) -> Event:
        return self._queue.get()


class AsyncSink:
    """Output channel for a caller on an event loop, fed by the engine thread.

    Safe by construction: the engine thread never touches an asyncio object. It appends the event
    to a plain deque under a lock and, unless a wake-up is already on its way, schedules one with
    ``loop.call_soon_threadsafe``, the one loop method made to be called from another thread. The
    wake-up runs on the loop and resolves the future the reader waits on (created, awaited and
    resolved on the loop's own thread only), in an empty context of its own rather than a copy of
    the engine thread's. So a stream costs the loop one call per batch of events the reader had not
    taken yet, not one per token. See docs/architecture.md, "Events back to the loop".
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # guards _events and _wake_pending, across the two threads
        self._events: collections.deque[Event] = collections.deque()
        self._wake_pending = False
        self._waiter: asyncio.Future[None] | None = None  # the loop's thread only
        self._context = contextvars.Context()

    def put(self, event: Event) -> None:
        """Engine thread: queue ``event``; RuntimeError if the caller's loop is closed."""
        with self._lock:
            self._events.append(event)
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._wake, context=self._context)
        except RuntimeError:
            with self._lock:
                self._wake_pending = False
            raise

    def _wake(self) -> None:
        """Loop thread: let the reader look at the events again."""
        with self._lock:
            self._wake_pending = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _take(self, every: bool) -> list[Event]:
        while True:
            with self._lock:
                if self._events:
                    if not every:
                        return [self._events.popleft()]
                    events = list(self._events)
                    self._events.clear()
                    return events
            self._waiter = self._loop.create_future()
            await self._waiter

    async def get(self) -> Event:
        return (await self._take(every=False))[0]

    async def get_ready(self) -> list[Event]:
        """The next event and every one already waiting, consecutive text of a choice joined.

        A stream whose reader falls behind the model then sends fewer, larger chunks instead of
        queueing up one chunk per token: each chunk costs the proxy the same, whatever its size.
        """
        return coalesce(await self._take(every=True))


def coalesce(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, Delta) and isinstance(last, Delta) and last.index == event.index:
            out[-1] = Delta(event.index, last.text + event.text, last.logprobs + event.logprobs)
        elif (
            isinstance(event, CallDelta)
            and isinstance(last, CallDelta)
            and (last.index, last.call) == (event.index, event.call)
            and event.id is None
        ):
            arguments = last.arguments + event.arguments
            out[-1] = CallDelta(last.index, last.call, arguments, last.id, last.name)
        else:
            out.append(event)
    return out


@dataclass(frozen=True)
class ToolRun:
    """How a job's rows may call tools: ``grammar`` is what a row follows once it calls (from the
    first token with ``from_start``); without one, calls are not allowed and ``<tool_call>`` is
    never sampled."""

    open_id: int
    close_id: int
    grammar: str | None
    from_start: bool = False


@dataclass
class Job:
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    sink: SyncSink | AsyncSink
    grammar: str | None = None  # llguidance grammar the answer must follow (JSON output)
    keep_alive: float | None = None  # seconds the model stays loaded after this job
    tools: ToolRun | None = None  # the request offers tools
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    cached_tokens: int = 0  # of the prompt's tokens, those whose KV came from the prefix cache
    # /v1/completions: the prompt's own tokens' log-probabilities too (echo with logprobs), with
    # this many alternatives; computed at prefill, set before the job's first event.
    prompt_logprobs: int | None = None
    prompt_entries: list[TokenLogprob] | None = None  # the prompt's tokens 1.. (0 has none)
    raw_text: bool = False  # /v1/completions: the text as the model writes it (no think filter)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    open_rows: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        try:
            self.sink.put(event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.cancel()


@dataclass
class Release:
    """A request to unload the model once every job queued before it is done.

    Jobs submitted after it wait, and load the model again when their turn comes.
    """

    on_done: Callable[[], None] | None = None  # called on the engine thread when done
    released: bool = False  # a model was unloaded (False: none was loaded)
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, released: bool) -> None:
        self.released = released
        self.done.set()
        if self.on_done is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                self.on_done()


@dataclass
class _Row:
    """One choice of one job, in the batch."""

    job: Job
    index: int
    pipeline: TextPipeline
    sampling: RowSampling
    matcher: JsonMatcher | None
    last: int = -1  # the token sampled last, fed at the next step
    count: int = 0  # tokens generated
    done: bool = False
    calls: CallReader | None = None  # set once the row starts calling tools
    call_text: IncrementalDecoder | None = None  # the open call's text
    sampled_logprob: tuple | None = None  # (token, logprob, top) of the token sampled last
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent with text
    lookup: PromptLookup | None = None  # prompt and answer so far, for drafts (speculation on)
    prompt_left: list[int] = field(default_factory=list)  # joining in chunks: not yet in the KV


class Engine:
    """Runs all jobs' rows as one continuously changing batch on a dedicated thread."""

    def __init__(
        self,
        holder: ModelHolder,
        max_rows: int = 16,
        max_queue: int = 64,
        keep_alive: float = 300,
        prefix_cache_bytes: int = 0,
        kv_cache_bytes: int = 0,
        cuda_graphs: bool = True,
        draft_tokens: int | None = 0,
        prefill_chunk: int | None = 0,
    ):
        self._holder = holder
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.keep_alive = keep_alive
        self.kv_cache_bytes = kv_cache_bytes  # the running rows' KV pool at most (0: no limit)
        self.peak_kv_bytes = 0  # the KV pool at its largest so far
        self.cuda_graphs = cuda_graphs  # decode steps replayed from CUDA graphs, on CUDA
        # Prompt-lookup speculation: a lone row drafts up to this many tokens a step (0: off;
        # None: DRAFT_TOKENS_CPU on the CPU, off on CUDA until a GPU run measures it).
        self.draft_tokens = draft_tokens
        self.drafted = self.accepted = 0  # draft tokens checked, and kept, since start
        self.forced_drafted = self.forced_accepted = 0  # of them, a grammar's forced tokens
        # Chunked prefill: a longer prompt joining running rows takes this many tokens a step,
        # packed with their next tokens in one pass (packed.py); 0: prompts are prefilled whole;
        # None: CHUNK_CPU on the CPU, CHUNK_CUDA on CUDA.
        self.prefill_chunk = prefill_chunk
        self.chunked_prompts = 0  # prompts that joined in chunks, since start
        self.graph_mode: str | None = None  # forces a Decoder mode ("static": tests on the CPU)
        self.cuda_api: CudaApi | None = None  # the CUDA calls of graphs (a stand-in: CPU tests)
        self._decoder: Decoder | None = None  # the loaded model's decoding steps
        self._unload_at: float | None = None  # monotonic time; None: keep the model loaded
        self._jobs: queue.Queue[Job | Release] = queue.Queue()
        self._releases_queued = 0  # Release markers in ``_jobs`` (not requests)
        self._release: Release | None = None  # taken from the queue: the batch drains, then unload
        self._waiting: Job | None = None  # taken from the queue, waiting for room in the batch
        self._last_done = time.monotonic()  # when the last job finished (idle time)
        self._rows: list[_Row] = []
        self._batch = KVBatch()
        self._steady: _Steady | None = None  # the rows' step state on the device; None: rebuild
        self.penalty_counts = PenaltyCounts()  # token counts of the rows with penalties
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # thread start, release markers count
        self.peak_rows = 0  # the largest batch so far (rows)
        self.peak_prefill = 0  # the most prompts prefilled in one forward pass so far
        self._stopping = False  # the process exits: the thread leaves its loop

    @property
    def running(self) -> int:
        """Requests with a row still generating (a finished row waits a step to leave)."""
        rows = list(self._rows)  # the engine thread may replace the list meanwhile
        return len({id(r.job) for r in rows if not r.done and not r.job.cancelled})

    @property
    def releasing(self) -> bool:
        """A release is asked for or under way."""
        return self._release is not None or self._releases_queued > 0

    @property
    def queued(self) -> int:
        return max(0, self._jobs.qsize() - self._releases_queued) + (self._waiting is not None)

    def state(self) -> dict[str, object]:
        """Requests running and queued, idle time and the pending unload (for GET /local/state)."""
        running, queued = self.running, self.queued
        busy = bool(running or queued or self._release)
        idle_left = None if busy else self._idle_left()
        return {
            "requests": {"running": running, "queued": queued},
            "idle_seconds": None if busy else round(time.monotonic() - self._last_done, 3),
            "keep_alive_seconds": self.keep_alive,
            "unload_in_seconds": None if idle_left is None else round(idle_left, 3),
            "prefix_cache": self.prefix.state(),
            "kv_cache": self._kv_state(),
            "cuda_graphs": self._graphs_state(),
        }

    def _graphs_state(self) -> dict[str, object]:
        decoder = self._decoder  # the engine thread may replace it meanwhile
        if decoder is not None:
            return decoder.state()
        reason = None if self.cuda_graphs else GRAPHS_OFF_BY_SETTING
        return {
            "enabled": None,
            "graphs": 0,
            "captured": 0,
            "capture_seconds": 0.0,
            "memory_bytes": 0,
            "eager_steps": 0,
            "off_reason": reason,
        }

    def use_cuda_graphs(self, on: bool) -> None:
        """Decode with CUDA graphs (on CUDA) or without, from the next request on; only while no
        request runs or waits (bench/gpu.py's on/off row)."""
        if self.running or self.queued:
            raise RuntimeError("use_cuda_graphs is for an idle engine")
        if self._decoder is not None:
            self._decoder.release()
        self.cuda_graphs, self._decoder = on, None

    def kv_budget(self, loaded: LoadedModel) -> KVBudget:
        """The KV pool's limit for ``loaded``: bytes, bytes per token, slots."""
        token_bytes = kv_token_bytes(loaded.model.config, loaded.dtype)
        return KVBudget(self.kv_cache_bytes, token_bytes, self.max_rows, loaded.context_length)

    def _kv_state(self) -> dict[str, int]:
        batch = self._batch  # the engine thread may replace it meanwhile
        return {
            "bytes": batch.nbytes,
            "budget_bytes": self.kv_cache_bytes,
            "slots": batch.slots,
            "columns": batch.columns,
            "peak_bytes": self.peak_kv_bytes,
        }

    def release(self, on_done: Callable[[], None] | None = None) -> Release:
        """Unload the model once the jobs queued so far are done; ``Release.done`` says when.

        Callable from any thread. With no model loaded nor loading it is done at once, without
        starting the engine thread (which would import torch on a gateway that never used it).
        """
        marker = Release(on_done)
        if self._holder.loaded is None and not self._holder.loading:
            marker.finish(False)
            return marker
        self._ensure_thread()
        with self._lock:
            self._releases_queued += 1
            self._jobs.put(marker)
        return marker

    def submit(self, job: Job) -> Job:
        if self.queued >= self.max_queue:
            raise OverloadedError(
                f"The local model is busy: {self.queued} requests are waiting already "
                f"(LOCAL_LLM_MAX_QUEUE={self.max_queue}). Retry in a few seconds.",
                retry_after=2,
            )
        self._ensure_thread()
        self._jobs.put(job)
        return job

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="local-llm-engine", daemon=True
                )
                self._thread.start()
                atexit.register(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        """Let the thread leave torch before the interpreter finalizes: a daemon thread left in it
        made the process abort at exit ("terminate called without an active exception")."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._stopping = True
        self._jobs.put(_STOP)
        thread.join(timeout=_STOP_WAIT_S)

    def _run(self) -> None:
        import torch  # the thread starts with the first local request: torch is loaded by then

        failures = 0  # loops in a row that raised
        while not self._stopping:
            try:
                with torch.inference_mode():
                    self._admit()
                    self._drop_finished()
                    if self._rows:
                        self._step()
            except Exception as exc:  # a failed step fails the batch, never the thread
                failures += 1
                try:
                    self._loop_failed(exc, failures)
                except Exception:  # cleaning up failed too: the next loop starts afresh
                    log.exception("The local engine could not clean up after a failure")
                    self._rows, self._batch, self._decoder = [], KVBatch(), None
                continue
            if failures > 1:
                log.info("The local engine works again after %d failed loops in a row", failures)
            failures = 0

    def _loop_failed(self, exc: Exception, failures: int) -> None:
        """A loop of the thread raised: the batch's requests get the error (logged with them);
        a failure with no request running is logged once, the first of a run of them. From the
        second failure in a row on, the thread waits before it tries again."""
        running = any(not r.done for r in self._rows)
        if failures == 1 and not running:
            log.error(
                "The local engine failed with no request running; it tries again, waiting up to "
                "%.0f s between tries, and logs this once until it works again",
                _LONGEST_BACKOFF_S,
                exc_info=exc,
            )
        self._fail_batch(exc)
        if failures > 1:
            time.sleep(min(_FIRST_BACKOFF_S * 2 ** (failures - 2), _LONGEST_BACKOFF_S))

    # ---- joining ------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Take queued jobs while the batch has room; wait for one when the batch is empty. The
        jobs taken are prefilled together (``_prefill``).

        After a ``Release`` is taken nobody joins: the batch drains, then the model is unloaded.
        """
        taken: list[Job] = []
        try:
            while True:
                if self._release is not None:
                    if self._rows or taken:
                        return
                    self._unload_for(self._release)
                if not (self._rows or taken):
                    self._capture_while_idle()
                job = self._next_job(block=not (self._rows or taken))
                if job is None or job is _STOP:
                    return
                if isinstance(job, Release):
                    with self._lock:
                        self._releases_queued -= 1
                    self._release = job
                    continue
                if job.cancelled:
                    job.emit(Done())
                    continue
                if (self._rows or taken) and not self._room_for(job, taken):
                    self._waiting = job
                    return
                taken.append(job)
        finally:
            if taken:
                self._prefill(taken)

    def _room_for(self, job: Job, taken: list[Job]) -> bool:
        """Whether the job's rows fit in the batch and the KV pool next to the running rows and
        the jobs ``taken`` to join with it."""
        if self._batch.budget is None and taken:  # the pool's size per token is not known yet
            return False
        joining = [*taken, job]
        rows = sum(j.sampling.n for j in joining)
        tokens = max(len(j.prompt_ids) + j.max_new_tokens for j in joining)
        return len(self._rows) + rows <= self.max_rows and self._batch.fits(rows, tokens)

    def _unload_for(self, marker: Release) -> None:
        self._release = None
        self._unload_at = None
        released = False
        try:
            released = self._unload_model()
        finally:
            marker.finish(released)

    def _next_job(self, block: bool) -> Job | Release | None:
        """The next job; with ``block``, waits for one, unloading the model when it idles out."""
        if self._waiting is not None:
            job, self._waiting = self._waiting, None
            return job
        timeout = self._idle_left() if block else None
        try:
            return self._jobs.get(
                block=block, timeout=None if timeout is None else min(timeout, _LONGEST_WAIT_S)
            )
        except queue.Empty:
            if block and not self._idle_left():  # the keep_alive ran out, not just one wait
                self._unload_at = None
                self._unload_model()
            return None

    def _unload_model(self) -> bool:
        """Unload the model, the prompts' KV kept with it, the KV pool and the CUDA graphs;
        whether a model was loaded."""
        self.prefix.clear()
        if self._decoder is not None:
            self._decoder.release()
        self._batch, self._decoder, self._steady = KVBatch(), None, None
        self.penalty_counts.clear()
        return self._holder.unload()

    def _idle_left(self) -> float | None:
        """Seconds until the idle model is unloaded; None: no unload pending."""
        if self._unload_at is None or self._holder.loaded is None:
            return None
        return max(0.0, self._unload_at - time.monotonic())

    def _job_done(self, job: Job) -> None:
        """The last job to finish sets how long the model stays loaded (as Ollama does)."""
        keep_alive = self.keep_alive if job.keep_alive is None else job.keep_alive
        self._last_done = time.monotonic()
        self._unload_at = None if keep_alive < 0 else self._last_done + keep_alive
        job.emit(Done())

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill the jobs taken and let their rows join the batch.

        Jobs that reuse the same prefix (or none) are prefilled together, in one forward pass
        over their prompts right-padded to the longest (``_prefill_group``).
        """
        try:
            loaded = self._holder.get()
        except Exception as exc:  # each job gets the error: none is left waiting
            for job in jobs:
                _fail(job, _error_of(exc))
            return
        self._prepare_graphs(loaded)
        groups: dict[tuple[int, int], list[tuple[Job, object, int]]] = {}
        for job in jobs:
            if job.prompt_logprobs is not None:  # every prompt position computed, alone
                groups[(id(job), -1)] = [(job, None, 0)]
                continue
            entry, reused = self.prefix.longest(job.prompt_ids)  # tokens computed before
            job.cached_tokens = reused
            if self._in_chunks(loaded, job, reused):
                try:
                    self._join_in_chunks(job, loaded, entry, reused)
                except Exception as exc:
                    _fail(job, _error_of(exc))
                continue
            groups.setdefault((id(entry), reused), []).append((job, entry, reused))
        for group in groups.values():
            for part in _similar_lengths(group):
                try:
                    self._prefill_group(loaded, part)
                except Exception as exc:
                    if len(part) == 1:
                        _fail(part[0][0], _error_of(exc))
                        continue
                    # The pass over all of them failed (memory, or one job's problem): each alone.
                    for item in part:
                        try:
                            self._prefill_group(loaded, [item])
                        except Exception as exc:
                            _fail(item[0], _error_of(exc))

    def _prefill_group(self, loaded: LoadedModel, group: list[tuple[Job, object, int]]) -> None:
        """One forward pass over the prompts of jobs that share their first ``reused`` tokens
        (from the prefix cache's ``entry``, or none), each right-padded to the longest: causal
        attention keeps a prompt's tokens from ever seeing the padding after them."""
        import torch
        from transformers import DynamicCache

        model, (_, entry, reused) = loaded.model, group[0]
        rows = len(group)
        cache = (
            start_cache(entry, reused, model.config, rows)
            if entry
            else DynamicCache(config=model.config)
        )
        rests = [job.prompt_ids[reused:] for job, _, _ in group]
        width = max(len(rest) for rest in rests)
        ids = [rest + [loaded.pad_token_id] * (width - len(rest)) for rest in rests]
        last = sorted({len(rest) - 1 for rest in rests})  # where each prompt's next token comes
        keep = 1 if rows == 1 else torch.tensor(last, device=model.device)
        if group[0][0].prompt_logprobs is not None:  # alone in its group: every position's logits
            keep = 0
        input_ids = torch.tensor(ids, device=model.device)
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=keep)
        self.peak_prefill = max(self.peak_prefill, rows)
        for i, (job, _, _) in enumerate(group):
            if rows == 1:
                kv, logits = cache, out.logits[:, -1]
            else:
                layers = ((layer.keys, layer.values) for layer in cache.layers)
                kv = _RowKV(layers, i, len(job.prompt_ids))
                logits = out.logits[i : i + 1, last.index(len(rests[i]) - 1)]
            self.prefix.add(job.prompt_ids, kv)
            try:
                if job.prompt_logprobs is not None:
                    job.prompt_entries = self._prompt_logprobs(loaded, job, out.logits[0])
                self._join(job, loaded, logits.float(), kv)
            except Exception as exc:  # this job only: the others of the pass join
                _fail(job, _error_of(exc))

    def _prompt_logprobs(self, loaded: LoadedModel, job: Job, logits) -> list[TokenLogprob]:
        """The log-probability of each prompt token after the ones before it (from the prefill's
        logits ``[prompt, vocab]``), with ``job.prompt_logprobs`` alternatives each."""
        ids, spell, entries = job.prompt_ids, loaded.constraints.token_text, []
        for start in range(0, len(ids) - 1, _PROMPT_LOGPROB_ROWS):  # float32 copies, a slice each
            end = min(start + _PROMPT_LOGPROB_ROWS, len(ids) - 1)
            distribution = logits[start:end].float().log_softmax(dim=-1)
            top = [job.prompt_logprobs] * (end - start)
            entries += [
                TokenLogprob(*spell(token), lp, tuple((*spell(t), v) for t, v in alternatives))
                for token, lp, alternatives in token_logprobs(
                    distribution, ids[start + 1 : end + 1], top
                )
            ]
        return entries

    def _join(self, job: Job, loaded: LoadedModel, logits, kv) -> None:
        """The job's rows join the batch: first tokens from the prefill's ``logits`` ``[1,
        vocab]``, its prompt's KV (``kv``) copied into their slots."""
        n = job.sampling.n
        if n > 1:
            logits = logits.expand(n, -1).clone()
        rows = [self._new_row(job, i, loaded) for i in range(n)]
        job.open_rows = n
        tokens, _ = self._choose(rows, logits)
        self._enter(loaded, rows, kv, len(job.prompt_ids))
        self._advance(rows, tokens, loaded.eos_token_ids)

    def _enter(self, loaded: LoadedModel, rows: list[_Row], kv, length: int) -> None:
        """``rows`` (one job's) take slots holding ``kv``'s first ``length`` tokens."""
        job = rows[0].job
        decoder, budget = self._decoder_for(loaded), self.kv_budget(loaded)
        if not self._rows and self._batch.budget != budget:
            self._batch = KVBatch(budget)  # a pool for the model loaded now
        self._batch.keep_pool = decoder.graphs  # graphs point into it: kept while loaded
        self._batch.add(kv, len(rows), length, len(job.prompt_ids) + job.max_new_tokens)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self._batch.nbytes)
        self._rows.extend(rows)
        self._steady = None
        self.peak_rows = max(self.peak_rows, len(self._rows))

    # ---- chunked prefill ------------------------------------------------------------------------

    def _in_chunks(self, loaded: LoadedModel, job: Job, reused: int) -> bool:
        """Whether ``job`` joins in chunks: rows are decoding (alone, a prompt is prefilled
        whole: nobody waits for it), its prompt has more than a chunk left after the prefix
        reused, one choice (``n`` choices would need the prompt copied into ``n`` slots at the
        end, room the batch may not have kept), no prompt logprobs (every position's logits)."""
        chunk = self._chunk(loaded)
        return (
            chunk > 0
            and loaded.packed
            and any(not row.done and not row.job.cancelled for row in self._rows)
            and job.sampling.n == 1
            and job.prompt_logprobs is None
            and len(job.prompt_ids) - reused > chunk
        )

    def _chunk(self, loaded: LoadedModel) -> int:
        """Prompt tokens a row joining in chunks takes a step on ``loaded``'s device."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        return CHUNK_CUDA if str(loaded.model.device).startswith("cuda") else CHUNK_CPU

    def _join_in_chunks(self, job: Job, loaded: LoadedModel, entry, reused: int) -> None:
        """The job's row takes a slot now, holding the ``reused`` prefix's KV; its prompt's
        other tokens are fed ``prefill_chunk`` at a time by the next steps (``_packed_step``),
        packed with the other rows' tokens; the step that feeds its last one samples its first
        token."""
        config = loaded.model.config
        kv = start_cache(entry, reused, config) if entry else _NoKV(loaded)
        row = self._new_row(job, 0, loaded)
        row.prompt_left = job.prompt_ids[reused:]
        job.open_rows = 1
        self._enter(loaded, [row], kv, reused)
        self.chunked_prompts += 1

    def _prepare_graphs(self, loaded: LoadedModel) -> None:
        """With CUDA graphs, before the first rows join a model: reserve the whole KV pool and
        capture the graphs of its shape (at load: the requests that wait, wait for the load)."""
        decoder = self._decoder_for(loaded)
        if not decoder.graphs or self._rows:
            return
        budget = self.kv_budget(loaded)
        if self._batch.budget != budget or not self._batch.keys:
            batch = KVBatch(budget, keep_pool=True)
            if not batch.can_reserve():  # no budget (0: no limit): the pool grows as before
                return
            self._batch.free()
            batch.reserve(loaded.model.config, loaded.dtype, loaded.model.device)
            self._batch = batch
        decoder.capture_missing(loaded.model, self._batch)

    def _capture_while_idle(self) -> None:
        """No row runs: capture what the pool's shape still misses, until a request arrives."""
        decoder, loaded = self._decoder, self._holder.loaded
        if decoder is None or loaded is None or not decoder.is_for(loaded.model):
            return
        decoder.capture_missing(
            loaded.model, self._batch, stop=lambda: self._waiting is not None or self._jobs.qsize()
        )

    def _decoder_for(self, loaded: LoadedModel) -> Decoder:
        """The decoding steps of ``loaded``: CUDA graphs on CUDA unless turned off."""
        if self._decoder is not None and self._decoder.is_for(loaded.model):
            return self._decoder
        if self.graph_mode is not None:
            mode, reason = self.graph_mode, None
        elif not self.cuda_graphs:
            mode, reason = "eager", GRAPHS_OFF_BY_SETTING
        elif not str(loaded.model.device).startswith("cuda"):
            mode, reason = "eager", f"not on CUDA ({loaded.model.device})"
        else:
            mode, reason = "cuda", None
        if self._decoder is not None:
            self._decoder.release()
        self._decoder = Decoder(loaded.model, mode, self._holder.label, reason, self.cuda_api)
        return self._decoder

    def _new_row(self, job: Job, index: int, loaded: LoadedModel) -> _Row:
        sampling = row_sampling(
            job.sampling, loaded.generation_defaults, loaded.model.device, index, job.prompt_ids
        )
        grammar = job.grammar
        if job.tools is not None and job.tools.from_start:
            grammar = job.tools.grammar
        matcher = loaded.constraints.matcher(grammar) if grammar else None
        pipeline = TextPipeline(loaded.tokenizer, job.sampling.stop, drop_think=not job.raw_text)
        row = _Row(job, index, pipeline, sampling, matcher)
        if self._drafts(loaded) > 0 and _may_draft(row):
            row.lookup = PromptLookup(job.prompt_ids)
        return row

    # ---- one decoding step for every row -------------------------------------------------------

    def _step(self) -> None:
        """One decoding step. While the rows stay the same, what it feeds the device stays there:
        the token ids just chosen and the positions (plus one, on the device), and the rows'
        sampling settings; only the chosen ids come back (one wait for the device). Rows joining
        or leaving rebuild them (``_steady`` None): one copy from the host then."""
        import torch

        loaded = self._holder.get()
        if any(row.prompt_left for row in self._rows):
            self._packed_step(loaded)
            return
        if len(self._rows) == 1 and self._rows[0].lookup is not None:
            draft = self._draft(loaded, self._rows[0])
            if draft:
                self._speculate(loaded, self._rows[0], draft)
                return
        rows, batch, steady = self._rows, self._batch, self._steady
        if steady is None:  # row i is slot i: its last token, at its length so far
            device = loaded.model.device
            inputs = torch.tensor([[r.last for r in rows], batch.lengths], device=device)
            steady = self._steady = _Steady(inputs, BatchSampling([r.sampling for r in rows]))
        decoder = self._decoder_for(loaded)
        logits = decoder.step(loaded.model, batch, steady.inputs, max(batch.lengths) + 1)
        batch.advance()
        tokens, chosen = self._choose(rows, logits.float(), steady.sampling)
        steady.tokens.copy_(chosen)  # the next step's inputs, on the device
        steady.positions.add_(1)
        self._advance(rows, tokens, loaded.eos_token_ids)

    def _packed_step(self, loaded: LoadedModel) -> None:
        """A step in which the rows joining in chunks take their prompts' next tokens, at most
        ``prefill_chunk`` in all (the first joined first), and every other row its next token,
        in one packed forward pass (packed.py); with no other row left, the prompts' whole rest.
        A row whose prompt is then complete samples its first token, and its prompt's KV goes to
        the prefix cache as a whole prefill's would."""
        rows, batch = self._rows, self._batch
        inputs, keep, choosing, completed = [], [], [], []
        # Nobody decoding (the running rows have left): the prompts' rest in this one pass.
        budget = self._chunk(loaded) if any(not row.prompt_left for row in rows) else None
        end = 0
        for i, row in enumerate(rows):
            if row.prompt_left:
                chunk = row.prompt_left[:budget]  # nothing once the step's budget is spent
                row.prompt_left = row.prompt_left[len(chunk) :]
                if budget is not None:
                    budget -= len(chunk)
                inputs.append(chunk)
                if chunk and not row.prompt_left:
                    completed.append(i)
            else:
                inputs.append([row.last])
            end += len(inputs[-1])
            if inputs[-1] and not row.prompt_left:
                keep.append(end - 1)
                choosing.append(row)
        logits = packed_forward(loaded.model, batch, inputs, keep)
        batch.advance([len(tokens) for tokens in inputs])
        self._steady = None
        if self.prefix.budget > 0:  # prompts completed now: their KV, for the prefix cache
            for i in completed:
                slots = zip(batch.keys, batch.values, strict=True)
                self.prefix.add(rows[i].job.prompt_ids, _RowKV(slots, i, batch.lengths[i]))
        if choosing:  # none when every row is a prompt still joining
            tokens, _ = self._choose(choosing, logits.float())
            self._advance(choosing, tokens, loaded.eos_token_ids)

    def _drafts(self, loaded: LoadedModel) -> int:
        """Draft tokens a lone row may check a step on ``loaded``'s device."""
        if self.draft_tokens is not None:
            return self.draft_tokens
        return 0 if str(loaded.model.device).startswith("cuda") else DRAFT_TOKENS_CPU

    def _draft(self, loaded: LoadedModel, row: _Row) -> list[int]:
        """A lone row's draft. A constrained row (JSON answer, or a tool call under way): the
        tokens its grammar forces from here, up to ``FORCED_TOKENS``, from ``MIN_FORCED`` on
        (grammar fast-forward, checked as any draft). Any other row: up to ``draft_tokens``
        tokens from its prompt and answer, none if fewer than ``MIN_DRAFT`` (on this CPU a pass
        over 2-4 tokens costs too much for prompt lookup's acceptance, see docs/benchmarks.md).
        Only rows given a ``lookup`` at their start draft (``_may_draft``: nothing it checks
        changes while the row runs)."""
        if row.lookup is None or row.done or row.job.cancelled:
            return []
        room = row.job.max_new_tokens - row.count - 1  # the pass's tokens stay in its columns
        if row.matcher is not None:  # a constrained row: the tokens its grammar forces
            return forced_draft(row.matcher, min(self._forced_drafts(loaded), room), MIN_FORCED)
        if row.job.tools is not None:  # text that may open a call: no drafts until it does
            return []
        draft = row.lookup.draft(min(self._drafts(loaded), room))
        return draft if len(draft) >= MIN_DRAFT else []

    def _forced_drafts(self, loaded: LoadedModel) -> int:
        """Forced tokens a constrained lone row may check a pass: ``FORCED_TOKENS`` while drafts
        are on (``_drafts``), none when they are off."""
        return FORCED_TOKENS if self._drafts(loaded) > 0 else 0

    def _speculate(self, loaded: LoadedModel, row: _Row, draft: list[int]) -> None:
        """One pass over the row's last token and ``draft``; it writes the draft's prefix it
        would have written itself and one more token (``speculation.accept``)."""
        import torch

        batch, device = self._batch, loaded.model.device
        length, block = batch.lengths[0], 1 + len(draft)
        ids = torch.tensor([[row.last, *draft]], device=device)
        positions = torch.arange(length, length + block, device=device)[None, :]
        width = min(batch.columns, columns_for(length + block))
        logits = block_forward(loaded.model, batch, ids, positions, [block], width)[0].float()
        penalties = row.sampling.penalties
        if penalties is not None:  # position j's counts include the draft's first j tokens
            for j in range(block):
                if j:
                    self.penalty_counts.count([penalties], [draft[j - 1]])
                self.penalty_counts.apply(logits[j : j + 1], [penalties])
        if row.matcher is not None:  # after penalties and bias, as in _choose
            mask_along(logits, row.matcher, draft)
            tools = row.job.tools
            if tools is not None and tools.grammar is None:  # "none" next to a JSON answer
                logits[:, tools.open_id] = float("-inf")
        if not row.sampling.greedy:
            logits = kept_logits(logits, [row.sampling] * block)
        tokens = accept(logits, draft, row.sampling.greedy, row.sampling.generator)
        if penalties is not None:  # counted: the whole draft; written: its kept part, then one
            kept = len(tokens) - 1
            rejected = draft[kept:]
            self.penalty_counts.count([penalties] * len(rejected), rejected, by=-1.0)
            self.penalty_counts.count([penalties], [tokens[-1]])
        self.drafted += len(draft)
        self.accepted += len(tokens) - 1
        if row.matcher is not None:
            self.forced_drafted += len(draft)
            self.forced_accepted += len(tokens) - 1
        batch.advance([len(tokens)])  # the last token and the draft tokens kept: their KV stays
        self._steady = None
        self._advance([row] * len(tokens), tokens, loaded.eos_token_ids)

    def _choose(self, rows: list[_Row], logits, sampling: BatchSampling | None = None):
        """The rows' next tokens from their ``logits``: a list, and the same on the device."""
        steady = self._steady
        if steady is not None and sampling is steady.sampling:  # the same rows as it was made for
            plan = steady.plan or steady.plan_for(rows)
        else:
            plan = _ChoicePlan.of(rows)
        # Log-probabilities come from the model's own distribution, before sampling settings and
        # constraints change it (as vLLM's default): what the model thinks of each token.
        asking = [i for i in plan.logprobs if rows[i].calls is None]
        distribution = logits[asking].log_softmax(dim=-1) if asking else None
        # Penalties and logit_bias before the grammar's mask: a token it forbids stays -inf.
        penalties, penalised = plan.penalties, plan.penalised
        if penalised:
            self.penalty_counts.apply(logits, penalties)
        constrained = [i for i in plan.may_constrain if rows[i].matcher is not None]
        if constrained:
            mask_logits(logits, constrained, [rows[i].matcher for i in constrained])
        for i, open_id in plan.no_calls:  # tool_choice "none": the model may not open a call
            logits[i, open_id] = float("-inf")
        sampling = sampling or BatchSampling([r.sampling for r in rows])
        chosen = sampling.choose(logits)
        tokens = chosen.tolist()  # the step's one wait for the device
        if penalised:
            self.penalty_counts.count(penalties, tokens)
        if asking:
            top = [rows[i].job.logprobs for i in asking]
            noted = token_logprobs(distribution, [tokens[i] for i in asking], top)
            for i, entry in zip(asking, noted, strict=True):
                rows[i].sampled_logprob = entry
        return tokens, chosen

    def _advance(self, rows: list[_Row], tokens: list[int], eos: frozenset[int]) -> None:
        # Once a step for every row: what a row without tools, logprobs or a constraint does not
        # need is skipped before any call (``_tool_token``, ``_note_logprob``, ``_take_logprobs``
        # would each find nothing to do).
        for row, token in zip(rows, tokens, strict=True):
            job = row.job
            if row.done or job.cancelled:
                continue
            row.last = token
            row.count += 1
            if row.lookup is not None:
                row.lookup.extend((token,))
            if row.matcher is not None:
                row.matcher.consume(token)
            if token in eos:
                if row.matcher is not None and (error := row.matcher.error) is not None:
                    self._constraint_gave_up(row, error)
                else:
                    self._finish(row, "tool_calls" if row.calls and row.calls.complete else "stop")
                continue
            if job.tools is not None and self._tool_token(row, token):
                pass
            elif row.calls is not None:
                self._emit(row, row.calls.push(row.call_text.push(token)))
            else:
                if row.sampled_logprob is not None:
                    self._note_logprob(row)
                pipeline = row.pipeline
                text = pipeline.push(token)
                if text:
                    logprobs = self._take_logprobs(row) if row.logprobs else ()
                    job.emit(Delta(row.index, text, logprobs))
                if pipeline.stopped:
                    self._finish(row, "stop")
                    continue
            if row.count >= job.max_new_tokens:
                self._finish(row, "length")

    def _constraint_gave_up(self, row: _Row, error: str) -> None:
        """The JSON constraint ran out of llguidance's budgets mid-answer (a long forced run):
        its mask then allows only end-of-turn. The answer is not valid JSON, so the request fails
        with a 400 naming ``response_format`` instead of finishing with ``stop``; its other rows
        leave with it."""
        job = row.job
        for other in self._rows:
            if other.job is job:
                other.done = True
        job.open_rows = 0
        log.info("The JSON constraint gave up after %d tokens: %s", row.count, error.split("\n")[0])
        gave_up = InvalidRequestError(
            f"The local model's JSON constraint gave up after {row.count} tokens: this schema "
            "asks for more than it can follow token by token (a long run of forced items or "
            "characters). Simplify it: smaller minItems / minLength, fewer forced values.",
            param="response_format",
        )
        job.emit(Failed(gave_up))
        self._job_done(job)  # Done, and the keep-alive counts from here as for any job

    def _tool_token(self, row: _Row, token: int) -> bool:
        """Open or close a tool call at its marker token; False for any other token."""
        tools = row.job.tools
        if tools is None or tools.grammar is None or token not in (tools.open_id, tools.close_id):
            return False
        if token == tools.close_id:
            if row.calls is None:
                return False
            self._emit(row, row.calls.push(row.call_text.flush()) + row.calls.close())
            return True
        if row.calls is None:  # the first call: the text so far is the answer's content
            self._emit_text_tail(row)
            row.calls = CallReader(row.index)
            if row.matcher is None:  # "auto": the grammar starts at this very token
                row.matcher = self._holder.get().constraints.matcher(tools.grammar)
                row.matcher.consume(token)
        row.calls.open()
        row.call_text = IncrementalDecoder(self._holder.get().tokenizer)
        return True

    def _emit(self, row: _Row, deltas: list[CallDelta]) -> None:
        for delta in deltas:
            row.job.emit(delta)

    def _emit_text_tail(self, row: _Row) -> None:
        tail = row.pipeline.flush()
        if tail or row.logprobs:
            row.job.emit(Delta(row.index, tail, self._take_logprobs(row)))

    def _note_logprob(self, row: _Row) -> None:
        """Keep the log-probability of a token of text (not of a call, nor the end of turn)."""
        if row.sampled_logprob is None:
            return
        token, logprob, top = row.sampled_logprob
        spell = self._holder.get().constraints.token_text
        alternatives = tuple((*spell(t), lp) for t, lp in top)
        row.logprobs.append(TokenLogprob(*spell(token), logprob, alternatives))
        row.sampled_logprob = None

    def _take_logprobs(self, row: _Row) -> tuple[TokenLogprob, ...]:
        taken, row.logprobs = tuple(row.logprobs), []
        return taken

    def _finish(self, row: _Row, reason: str) -> None:
        if row.calls is None:
            self._emit_text_tail(row)
        row.done = True
        complete = row.calls.complete if row.calls else 0
        thought = row.pipeline.reasoning_tokens
        row.job.emit(Finish(row.index, reason, row.count, complete, thought))
        row.job.open_rows -= 1
        if row.job.open_rows == 0:
            self._job_done(row.job)

    # ---- leaving ----------------------------------------------------------------------------

    def _drop_finished(self) -> None:
        """Finished rows and rows of cancelled jobs leave the batch (and free their cache)."""
        keep, gone = [], {}
        for i, row in enumerate(self._rows):
            if row.job.cancelled and not row.done:
                gone[id(row.job)] = row
            elif not row.done:
                keep.append(i)
        for row in gone.values():
            log.info(
                "Generation cancelled by the caller after %d tokens (max_tokens %d)",
                row.count,
                row.job.max_new_tokens,
            )
            self._job_done(row.job)
        if len(keep) != len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._steady = None
            self.penalty_counts.retain([r.sampling.penalties for r in self._rows])
            self._batch.keep(keep)

    def _fail_batch(self, exc: Exception) -> None:
        jobs = {id(r.job): r.job for r in self._rows if not r.done}.values()
        error = _error_of(exc) if jobs else None  # logs it, unless no request runs
        for job in jobs:
            _fail(job, error)
        # The pool goes now, not at the collector's next pass (the batch is a reference cycle:
        # KVBatch -> SlotCache -> SlotLayer -> KVBatch), so the next one is not allocated beside
        # it; the failed step's tensors, held by its error's frames, go too (below).
        self._batch.free()
        self._rows, self._batch, self._steady = [], KVBatch(), None
        self.penalty_counts.clear()
        if self._decoder is not None:  # its graphs point into the pool just dropped
            self._decoder.drop()
        self.prefix.clear()
        drop_frames(exc)
        self._holder.release_cached_memory()


@dataclass
class _Steady:
    """What the next step feeds the device while the batch's rows stay the same."""

    inputs: Any  # [2, rows] int64 on the model's device: each row's next token id, its position
    sampling: BatchSampling  # the rows' sampling settings, on the device once used
    plan: _ChoicePlan | None = None  # what ``_choose`` looks at in each row, made at its first

    def __post_init__(self) -> None:
        self.tokens, self.positions = self.inputs.unbind(0)  # views: written in place

    def plan_for(self, rows: list[_Row]) -> _ChoicePlan:
        self.plan = _ChoicePlan.of(rows)
        return self.plan


@dataclass(frozen=True)
class _ChoicePlan:
    """Which rows ``_choose`` must look at beyond the sampling, from what does not change while
    a row runs: kept with the steady rows, so a step does not go over every row four times."""

    penalties: list  # each row's RowPenalties or None
    penalised: bool  # some row has penalties or a logit_bias
    logprobs: list[int]  # rows asking for logprobs (while not inside a tool call)
    may_constrain: list[int]  # rows with a matcher, or tools (whose first call brings one)
    no_calls: list[tuple[int, int]]  # (row, its tool-call opening token): tool_choice "none"

    @classmethod
    def of(cls, rows: list[_Row]) -> _ChoicePlan:
        penalties = [r.sampling.penalties for r in rows]
        return cls(
            penalties,
            any(p is not None for p in penalties),
            [i for i, r in enumerate(rows) if r.job.logprobs is not None],
            [i for i, r in enumerate(rows) if r.matcher is not None or r.job.tools is not None],
            [
                (i, r.job.tools.open_id)
                for i, r in enumerate(rows)
                if r.job.tools is not None and r.job.tools.grammar is None
            ],
        )


CHUNK_CPU = 256  # chunked prefill's chunk on the CPU (docs/benchmarks.md, issue 24)
CHUNK_CUDA = 1024  # on CUDA: a step with a chunk runs eagerly, so fewer, larger chunks
MIN_DRAFT = 4  # shorter drafts are not checked (a lone row: docs/benchmarks.md, issue 24)
DRAFT_TOKENS_CPU = 7  # speculation's default on the CPU (docs/benchmarks.md, issue 24)
# A grammar's forced tokens: up to this many a pass, checked from this many on (docs/benchmarks.md,
# "Grammar fast-forward"); they are almost always kept, so shorter runs pay than for prompt lookup.
FORCED_TOKENS = 15
MIN_FORCED = 1


def _may_draft(row: _Row) -> bool:
    """Rows whose next token depends only on the model's distribution, the row's own tokens and
    its grammar (penalties, bias and the grammar's mask are replayed position by position along
    the draft): no logprobs asked; greedy, or sampled without a seed (a seeded row must give the
    same answer alone as in a batch, where it does not draft: its random draws would differ).
    What a row drafts is ``Engine._draft``'s choice: a constrained row, the tokens its grammar
    forces; a row that may call tools, nothing until it opens a call; any other, prompt lookup."""
    return (row.sampling.greedy or not row.sampling.seeded) and row.job.logprobs is None


class _NoKV:
    """No token's KV yet, shaped as a cache of one row (``KVBatch.add`` of a row joining in
    chunks with no prefix reused)."""

    def __init__(self, loaded: LoadedModel):
        import torch

        layers, heads, dim = kv_shape(loaded.model.config)
        dtype, device = getattr(torch, loaded.dtype, torch.float32), loaded.model.device
        empty = torch.zeros(1, heads, 0, dim, dtype=dtype, device=device)
        self.layers = [_LayerKV(empty, empty) for _ in range(layers)]


class _RowKV:
    """Row ``i`` of a cache's layers (``(keys, values)`` pairs: a batched prefill's cache, or the
    slot pool), its first ``length`` tokens, copied (the prefix cache may keep it: a view would
    keep the whole batch's tensors alive)."""

    def __init__(self, layers, i: int, length: int):
        self.layers = [
            _LayerKV(keys[i : i + 1, :, :length].clone(), values[i : i + 1, :, :length].clone())
            for keys, values in layers
        ]


@dataclass
class _LayerKV:
    keys: Any
    values: Any


def _similar_lengths(group: list, most_padding: float = 0.5) -> list[list]:
    """``group`` (jobs sharing a prefix) in parts whose prompts are close enough in length that
    padding to the longest adds at most ``most_padding`` of their tokens: one 2,000-token prompt
    is not prefilled beside fifteen short ones padded to its length."""
    parts: list[list] = []
    for item in sorted(group, key=lambda item: len(item[0].prompt_ids)):
        rest = len(item[0].prompt_ids) - item[2]
        if parts:
            part = parts[-1]
            tokens = sum(len(job.prompt_ids) - reused for job, _, reused in part) + rest
            if rest * (len(part) + 1) <= (1 + most_padding) * tokens:
                part.append(item)
                continue
        parts.append([item])
    return parts


def _fail(job: Job, error: LocalLLMError) -> None:
    job.emit(Failed(error))
    job.emit(Done())


def _error_of(exc: Exception) -> LocalLLMError:
    return exc if isinstance(exc, LocalLLMError) else _internal_error(exc)


def _internal_error(exc: Exception) -> LocalLLMError:
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing
        return ModelUnavailableError(
            "The local model ran out of GPU memory for this request; retry with a shorter prompt "
            "or max_tokens, or free GPU memory."
        )
    log.exception("Local generation failed")
    return LocalLLMError(f"Local generation failed: {type(exc).__name__}: {exc}")
