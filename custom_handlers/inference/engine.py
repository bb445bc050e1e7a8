"""The generation thread: continuous batching of every request's choices (issue 24's shape).

Generation never runs on the proxy's event loop. One worker thread owns a batch of rows (one row
per choice of a request) and loops: jobs join, finished or cancelled rows leave, and one step
runs. Each row has its own sampling parameters, seed, stop strings, token budget and, where asked,
JSON constraint. The work is in three rooms, as in nano-vllm and vLLM v1:

- ``Scheduler`` (scheduler.py): the queue, admission, the KV budget, and each step's plan (how
  many tokens each row feeds: one, a prefill chunk, or a draft to check);
- ``Runner`` (runner.py): the KV pool, the CUDA graphs, and the forward passes that carry out a
  plan (a prefill, the steady one-token step, a packed step);
- ``Outputs`` (outputs.py): logits to tokens and tokens to events (sampling, constraints, drafts
  checked, text, tool calls, logprobs, finishes).

This module holds the thread, the model's life (load on demand, keep-alive, release) and the
joins between the three. Jobs and their events are in jobs.py (imported here too).

Why not transformers' own continuous batching: it has no per-request seed and applies custom
logits processors (our JSON constraint) to the whole batch; and ``generate`` batches cannot take a
request that arrives while they run. See docs/architecture.md.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable

from custom_handlers.inference.errors import drop_frames
from custom_handlers.inference.jobs import Done, Job, Release, error_of, fail
from custom_handlers.inference.kvbatch import KVBudget
from custom_handlers.inference.loader import LoadedModel, ModelHolder
from custom_handlers.inference.outputs import Outputs, Row
from custom_handlers.inference.prefix import PrefixCache, start_cache
from custom_handlers.inference.runner import NoKV, Runner
from custom_handlers.inference.scheduler import STOP, Scheduler, Share

log = logging.getLogger("custom_handlers.engine")

_STOP_WAIT_S = 10.0
# The idle wait is cut into waits of at most this long: keep_alive is bounded where it is read, but
# a wait past threading.TIMEOUT_MAX (~9.2e9 s) raised OverflowError on every loop of the thread.
_LONGEST_WAIT_S = 3600.0
# A loop of the engine thread that fails again and again waits between tries: 10 ms, doubling, at
# most a second; never a spin (issue 20: 641,825 log lines in 6 s at 100 % of a core).
_FIRST_BACKOFF_S = 0.01
_LONGEST_BACKOFF_S = 1.0


def _in(room: str, name: str, settable: bool = True) -> property:
    """An ``Engine`` attribute that lives in one of its rooms (``scheduler``, ``runner``,
    ``outputs``): read there and, if ``settable``, set there."""

    def get(engine: Engine):
        return getattr(getattr(engine, room), name)

    def put(engine: Engine, value) -> None:
        setattr(getattr(engine, room), name, value)

    return property(get, put if settable else None, doc=f"``{room}.{name}``")


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
        self.keep_alive = keep_alive
        self.scheduler = Scheduler(max_rows, max_queue, draft_tokens, prefill_chunk)
        self.runner = Runner(holder.label, kv_cache_bytes, max_rows, cuda_graphs)
        self.outputs = Outputs(holder, self._job_done, lambda: self.scheduler.rows)
        self.chunked_prompts = 0  # prompts that joined in chunks, since start
        self._unload_at: float | None = None  # monotonic time; None: keep the model loaded
        self._last_done = time.monotonic()  # when the last job finished (idle time)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # thread start
        self.peak_rows = 0  # the largest batch so far (rows)
        self._stopping = False  # the process exits: the thread leaves its loop

    # ---- settings and figures, where they live -------------------------------------------------

    running = _in("scheduler", "running", settable=False)
    queued = _in("scheduler", "queued", settable=False)
    releasing = _in("scheduler", "releasing", settable=False)
    max_queue = _in("scheduler", "max_queue")
    draft_tokens = _in("scheduler", "draft_tokens")
    prefill_chunk = _in("scheduler", "prefill_chunk")
    kv_cache_bytes = _in("runner", "kv_cache_bytes", settable=False)
    peak_kv_bytes = _in("runner", "peak_kv_bytes", settable=False)
    peak_prefill = _in("runner", "peak_prefill", settable=False)
    cuda_graphs = _in("runner", "cuda_graphs", settable=False)  # use_cuda_graphs changes it
    graph_mode = _in("runner", "graph_mode")
    cuda_api = _in("runner", "cuda_api")
    penalty_counts = _in("outputs", "penalty_counts", settable=False)
    drafted = _in("outputs", "drafted", settable=False)
    accepted = _in("outputs", "accepted", settable=False)
    forced_drafted = _in("outputs", "forced_drafted", settable=False)
    forced_accepted = _in("outputs", "forced_accepted", settable=False)

    @property
    def max_rows(self) -> int:
        return self.scheduler.max_rows

    @max_rows.setter
    def max_rows(self, rows: int) -> None:  # the batch's rows, and the KV pool's slots
        self.scheduler.max_rows = self.runner.max_rows = rows

    def state(self) -> dict[str, object]:
        """Requests running and queued, idle time and the pending unload (for GET /local/state)."""
        running, queued = self.running, self.queued
        busy = bool(running or queued or self.scheduler.release)
        idle_left = None if busy else self._idle_left()
        return {
            "requests": {"running": running, "queued": queued},
            "idle_seconds": None if busy else round(time.monotonic() - self._last_done, 3),
            "keep_alive_seconds": self.keep_alive,
            "unload_in_seconds": None if idle_left is None else round(idle_left, 3),
            "prefix_cache": self.prefix.state(),
            "kv_cache": self.runner.kv_state(),
            "cuda_graphs": self.runner.graphs_state(),
        }

    def use_cuda_graphs(self, on: bool) -> None:
        """Decode with CUDA graphs (on CUDA) or without, from the next request on; only while no
        request runs or waits (bench/gpu.py's on/off row)."""
        if self.running or self.queued:
            raise RuntimeError("use_cuda_graphs is for an idle engine")
        self.runner.use_cuda_graphs(on)

    def kv_budget(self, loaded: LoadedModel) -> KVBudget:
        """The KV pool's limit for ``loaded``: bytes, bytes per token, slots."""
        return self.runner.kv_budget(loaded)

    # ---- requests in -----------------------------------------------------------------------------

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
        self.scheduler.put_release(marker)
        return marker

    def submit(self, job: Job) -> Job:
        self.scheduler.submit(job)  # OverloadedError when the queue is full
        self._ensure_thread()
        return job

    # ---- the thread ------------------------------------------------------------------------------

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
        self.scheduler.jobs.put(STOP)
        thread.join(timeout=_STOP_WAIT_S)

    def _run(self) -> None:
        import torch  # the thread starts with the first local request: torch is loaded by then

        failures = 0  # loops in a row that raised
        while not self._stopping:
            try:
                with torch.inference_mode():
                    self._admit()
                    self._drop_finished()
                    if self.scheduler.rows:
                        self._step()
            except Exception as exc:  # a failed step fails the batch, never the thread
                failures += 1
                try:
                    self._loop_failed(exc, failures)
                except Exception:  # cleaning up failed too: the next loop starts afresh
                    log.exception("The local engine could not clean up after a failure")
                    self.scheduler.rows = []
                    self.runner.forget()
                continue
            if failures > 1:
                log.info("The local engine works again after %d failed loops in a row", failures)
            failures = 0

    def _loop_failed(self, exc: Exception, failures: int) -> None:
        """A loop of the thread raised: the batch's requests get the error (logged with them);
        a failure with no request running is logged once, the first of a run of them. From the
        second failure in a row on, the thread waits before it tries again."""
        running = any(not r.done for r in self.scheduler.rows)
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

    # ---- the model's life ------------------------------------------------------------------------

    def _next_job(self, block: bool) -> Job | Release | object | None:
        """The next job; with ``block``, waits for one, unloading the model when it idles out."""
        timeout = self._idle_left() if block else None
        try:
            return self.scheduler.next(
                block, None if timeout is None else min(timeout, _LONGEST_WAIT_S)
            )
        except queue.Empty:
            if block and not self._idle_left():  # the keep_alive ran out, not just one wait
                self._unload_at = None
                self._unload_model()
            return None

    def _unload_for(self, marker: Release) -> None:
        self.scheduler.release = None
        self._unload_at = None
        released = False
        try:
            released = self._unload_model()
        finally:
            marker.finish(released)

    def _unload_model(self) -> bool:
        """Unload the model, the prompts' KV kept with it, the KV pool and the CUDA graphs;
        whether a model was loaded."""
        self.prefix.clear()
        self.runner.unload()
        self.outputs.penalty_counts.clear()
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

    # ---- joining ---------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Take queued jobs while the batch has room; wait for one when the batch is empty. The
        jobs taken are prefilled together (``_prefill``).

        After a ``Release`` is taken nobody joins: the batch drains, then the model is unloaded.
        """
        scheduler, taken = self.scheduler, []
        try:
            while True:
                if scheduler.release is not None:
                    if scheduler.rows or taken:
                        return
                    self._unload_for(scheduler.release)
                if not (scheduler.rows or taken):
                    self.runner.capture_while_idle(self._holder.loaded, scheduler.arrived)
                job = self._next_job(block=not (scheduler.rows or taken))
                if isinstance(job, Release):  # now ``scheduler.release``: the batch drains
                    continue
                if job is None or job is STOP:
                    return
                if job.cancelled:
                    job.emit(Done())
                    continue
                if (scheduler.rows or taken) and not scheduler.room_for(
                    job, taken, self.runner.batch
                ):
                    scheduler.waiting = job
                    return
                taken.append(job)
        finally:
            if taken:
                self._prefill(taken)

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill the jobs taken and let their rows join the batch.

        Jobs that reuse the same prefix (or none) are prefilled together, in one forward pass
        over their prompts right-padded to the longest (``_prefill_group``); a long prompt that
        joins running rows does so in chunks instead (``_join_in_chunks``).
        """
        try:
            loaded = self._holder.get()
        except Exception as exc:  # each job gets the error: none is left waiting
            for job in jobs:
                fail(job, error_of(exc))
            return
        if not self.scheduler.rows:
            self.runner.prepare_graphs(loaded)
        groups: dict[tuple[int, int], list[tuple[Job, object, int]]] = {}
        for job in jobs:
            if job.prompt_logprobs is not None:  # every prompt position computed, alone
                groups[(id(job), -1)] = [(job, None, 0)]
                continue
            entry, reused = self.prefix.longest(job.prompt_ids)  # tokens computed before
            job.cached_tokens = reused
            if self.scheduler.joins_in_chunks(loaded, job, reused):
                try:
                    self._join_in_chunks(job, loaded, entry, reused)
                except Exception as exc:
                    fail(job, error_of(exc))
                continue
            groups.setdefault((id(entry), reused), []).append((job, entry, reused))
        for group in groups.values():
            for part in similar_lengths(group):
                try:
                    self._prefill_group(loaded, part)
                except Exception as exc:
                    if len(part) == 1:
                        fail(part[0][0], error_of(exc))
                        continue
                    # The pass over all of them failed (memory, or one job's problem): each alone.
                    for item in part:
                        try:
                            self._prefill_group(loaded, [item])
                        except Exception as exc:
                            fail(item[0], error_of(exc))

    def _prefill_group(self, loaded: LoadedModel, group: list[tuple[Job, object, int]]) -> None:
        """One pass over the prompts of jobs that share a prefix (``Runner.prefill``); each job's
        prompt KV goes to the prefix cache, and its rows join."""
        (first, entry, reused), jobs = group[0], [job for job, _, _ in group]
        every = first.prompt_logprobs is not None  # alone in its group: every position's logits
        passed = self.runner.prefill(loaded, [job.prompt_ids for job in jobs], entry, reused, every)
        for job, (kv, logits, all_logits) in zip(jobs, passed, strict=True):
            self.prefix.add(job.prompt_ids, kv)
            try:
                if all_logits is not None:
                    job.prompt_entries = self.outputs.prompt_logprobs(loaded, job, all_logits)
                self._join(job, loaded, logits.float(), kv)
            except Exception as exc:  # this job only: the others of the pass join
                fail(job, error_of(exc))

    def _join(self, job: Job, loaded: LoadedModel, logits, kv) -> None:
        """The job's rows join the batch: first tokens from the prefill's ``logits`` ``[1,
        vocab]``, its prompt's KV (``kv``) copied into their slots."""
        n = job.sampling.n
        if n > 1:
            logits = logits.expand(n, -1).clone()
        rows = [self._new_row(job, i, loaded) for i in range(n)]
        job.open_rows = n
        tokens, _ = self.outputs.choose(rows, logits)
        self._enter(loaded, rows, kv, len(job.prompt_ids))
        self.outputs.advance(rows, tokens, loaded.eos_token_ids)

    def _join_in_chunks(self, job: Job, loaded: LoadedModel, entry, reused: int) -> None:
        """The job's row takes a slot now, holding the ``reused`` prefix's KV; its prompt's
        other tokens are fed a chunk at a time by the next steps (``Scheduler.plan``), packed
        with the other rows' tokens; the step that feeds its last one samples its first token."""
        kv = start_cache(entry, reused, loaded.model.config) if entry else NoKV(loaded)
        row = self._new_row(job, 0, loaded)
        row.prompt_left = job.prompt_ids[reused:]
        job.open_rows = 1
        self._enter(loaded, [row], kv, reused)
        self.chunked_prompts += 1

    def _new_row(self, job: Job, index: int, loaded: LoadedModel) -> Row:
        drafts = self.scheduler.drafts(loaded) > 0
        return self.outputs.new_row(job, index, loaded, drafts)

    def _enter(self, loaded: LoadedModel, rows: list[Row], kv, length: int) -> None:
        """``rows`` (one job's) take slots holding ``kv``'s first ``length`` tokens."""
        job, scheduler = rows[0].job, self.scheduler
        tokens = len(job.prompt_ids) + job.max_new_tokens
        self.runner.enter(loaded, len(rows), kv, length, tokens, first=not scheduler.rows)
        scheduler.rows.extend(rows)
        self.peak_rows = max(self.peak_rows, len(scheduler.rows))

    # ---- a step --------------------------------------------------------------------------------

    def _step(self) -> None:
        """One step: the scheduler's plan, the runner's pass, the outputs' tokens."""
        loaded = self._holder.get()
        plan = self.scheduler.plan(loaded)
        if plan is None:
            self._decode_step(loaded)
        else:
            self._packed_step(loaded, plan)

    def _decode_step(self, loaded: LoadedModel) -> None:
        """Every row takes one token; the tokens chosen stay on the device as the next inputs."""
        rows, runner = self.scheduler.rows, self.runner
        logits, steady = runner.decode(loaded, rows)
        plan = steady.plan_for(rows)
        tokens, chosen = self.outputs.choose(rows, logits.float(), steady.sampling, plan)
        runner.fed(steady, chosen)
        self.outputs.advance(rows, tokens, loaded.eos_token_ids)

    def _packed_step(self, loaded: LoadedModel, plan: list[Share]) -> None:
        """Each row feeds its share (``plan``) in one packed pass. A prompt's chunk goes into its
        KV (its last: the row samples its first token, and the prompt's KV goes to the prefix
        cache as a whole prefill's would); a draft is checked (``Outputs.verify``) and the row
        keeps what it would have written; every other row takes its next token."""
        rows, outputs = self.scheduler.rows, self.outputs
        keep, at = [], []  # the packed indices whose logits are wanted; each share's first one
        end = 0
        for share in plan:
            end += len(share.tokens)
            at.append(len(keep))
            if share.chooses:
                keep += range(end - 1 - len(share.draft), end)
        logits = self.runner.packed(loaded, [share.tokens for share in plan], keep).float()
        counts, choosing, drafted = [], [], []
        for i, (row, share) in enumerate(zip(rows, plan, strict=True)):
            if share.chunk:
                row.prompt_left = row.prompt_left[len(share.tokens) :]
            if share.draft:
                block = logits[at[i] : at[i] + len(share.tokens)]
                tokens = outputs.verify(row, share.draft, block, share.forced)
                drafted.append((row, tokens))
                counts.append(len(tokens))  # the last token and the draft tokens kept
            else:
                counts.append(len(share.tokens))
                if share.chooses:
                    choosing.append(i)
        self.runner.advance(counts)
        if self.prefix.budget > 0:  # prompts completed now: their KV, for the prefix cache
            for i, share in enumerate(plan):
                if share.completes:
                    self.prefix.add(rows[i].job.prompt_ids, self.runner.row_kv(i))
        eos = loaded.eos_token_ids
        if choosing:
            tokens, _ = outputs.choose(
                [rows[i] for i in choosing], logits[[at[i] for i in choosing]]
            )
            outputs.advance([rows[i] for i in choosing], tokens, eos)
        for row, tokens in drafted:
            outputs.advance([row] * len(tokens), tokens, eos)

    # ---- leaving ---------------------------------------------------------------------------------

    def _drop_finished(self) -> None:
        """Finished rows and rows of cancelled jobs leave the batch (and free their cache)."""
        before = len(self.scheduler.rows)
        keep, gone = self.scheduler.drop_finished()
        for row in gone:
            log.info(
                "Generation cancelled by the caller after %d tokens (max_tokens %d)",
                row.count,
                row.job.max_new_tokens,
            )
            self._job_done(row.job)
        if len(keep) != before:
            self.outputs.retain(self.scheduler.rows)
            self.runner.keep(keep)

    def _fail_batch(self, exc: Exception) -> None:
        jobs = {id(r.job): r.job for r in self.scheduler.rows if not r.done}.values()
        error = error_of(exc) if jobs else None  # logs it, unless no request runs
        for job in jobs:
            fail(job, error)
        self.runner.drop()
        self.scheduler.rows = []
        self.outputs.penalty_counts.clear()
        self.prefix.clear()
        drop_frames(exc)  # the failed step's tensors, held by its error's frames, go too
        self._holder.release_cached_memory()


def similar_lengths(group: list, most_padding: float = 0.5) -> list[list]:
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
