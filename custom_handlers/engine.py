"""The generation thread: a queue of jobs, sampling, stop handling and cancellation.

Generation never runs on the proxy's event loop. Jobs are run by one worker thread; each job carries
its own output channel (a ``Sink``) and a cancel flag that the decoding loop checks every token, so
a caller who goes away stops its generation within a token.

Events a job emits, in order: ``Delta`` (text for one choice), ``Finish`` (one per choice), then
``Done``; or ``Failed`` then ``Done``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from custom_handlers.errors import LocalLLMError, ModelUnavailableError
from custom_handlers.loader import LoadedModel, ModelHolder
from custom_handlers.request import SamplingParams
from custom_handlers.text import TextPipeline

log = logging.getLogger("custom_handlers.engine")


@dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True)
class Finish:
    index: int
    reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: LocalLLMError


@dataclass(frozen=True)
class Done:
    pass


Event = Delta | Finish | Failed | Done


class SyncSink:
    """Output channel for a caller in a plain thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Event] = queue.Queue()

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def get(self) -> Event:
        return self._queue.get()


class AsyncSink:
    """Output channel for a caller on an event loop; safe to ``put`` from the worker thread."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self) -> Event:
        return await self._queue.get()


@dataclass
class Job:
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    sink: SyncSink | AsyncSink
    grammar: str | None = None  # llguidance grammar the answer must follow (JSON output)
    _cancelled: threading.Event = field(default_factory=threading.Event)

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


class Engine:
    """Runs jobs one after another on a dedicated thread, started on first use."""

    def __init__(self, holder: ModelHolder):
        self._holder = holder
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, job: Job) -> Job:
        self._ensure_thread()
        self._jobs.put(job)
        return job

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="local-llm-engine", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job.cancelled:
                job.emit(Done())
                continue
            try:
                self._generate(job)
            except LocalLLMError as exc:
                job.emit(Failed(exc))
            except Exception as exc:
                job.emit(Failed(_internal_error(exc)))
            job.emit(Done())

    def _generate(self, job: Job) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        loaded = self._holder.get()
        tracker = _ChoiceTracker(job, loaded)
        # One row per choice (not num_return_sequences, which greedy decoding refuses for n > 1).
        input_ids = torch.tensor([job.prompt_ids] * job.sampling.n, device=loaded.model.device)
        processors = LogitsProcessorList()
        if job.grammar is not None:
            processors.append(loaded.constraints.processor(job.grammar, job.sampling.n))
        if job.sampling.seed is not None:
            torch.manual_seed(job.sampling.seed)
        with torch.inference_mode():
            loaded.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=_generation_config(loaded, job),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        if job.cancelled:
            log.info(
                "Generation cancelled by the caller after %d tokens (max_tokens %d)",
                tracker.generated,
                job.max_new_tokens,
            )
        tracker.finish_open_choices()


class _ChoiceTracker:
    """A transformers StoppingCriteria that turns each new token into text for its choice.

    Called by ``generate`` once per decoding step with all rows; it emits text as it is produced and
    tells ``generate`` which rows are finished (end of turn, a stop string, max_tokens, or cancel).
    """

    def __init__(self, job: Job, loaded: LoadedModel):
        n = job.sampling.n
        self._job = job
        self._eos = loaded.eos_token_ids
        self._pipelines = [TextPipeline(loaded.tokenizer, job.sampling.stop) for _ in range(n)]
        self._counts = [0] * n
        self._done = [False] * n

    @property
    def generated(self) -> int:
        return max(self._counts)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self._job.cancelled:
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if not self._done[i]:
                self._step(i, token)
        return torch.tensor(self._done, dtype=torch.bool, device=input_ids.device)

    def _step(self, i: int, token: int) -> None:
        self._counts[i] += 1
        if token in self._eos:
            return self._finish(i, "stop")
        text = self._pipelines[i].push(token)
        if text:
            self._job.emit(Delta(i, text))
        if self._pipelines[i].stopped:
            self._finish(i, "stop")
        elif self._counts[i] >= self._job.max_new_tokens:
            self._finish(i, "length")

    def _finish(self, i: int, reason: str) -> None:
        tail = self._pipelines[i].flush()
        if tail:
            self._job.emit(Delta(i, tail))
        self._done[i] = True
        self._job.emit(Finish(i, reason, self._counts[i]))

    def finish_open_choices(self) -> None:
        """Rows ``generate`` ended without us seeing their end (it hit its own length limit)."""
        if self._job.cancelled:
            return
        for i, done in enumerate(self._done):
            if not done:
                self._finish(i, "length")


def _generation_config(loaded: LoadedModel, job: Job) -> Any:
    s = job.sampling
    gc = copy.deepcopy(loaded.model.generation_config)
    gc.max_new_tokens = job.max_new_tokens
    gc.max_length = None
    gc.num_return_sequences = 1
    gc.pad_token_id = loaded.pad_token_id
    if s.greedy:
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
        return gc
    defaults = loaded.generation_defaults
    gc.do_sample = True
    gc.temperature = s.temperature if s.temperature is not None else defaults["temperature"]
    gc.top_p = s.top_p if s.top_p is not None else defaults["top_p"]
    top_k = s.top_k if s.top_k is not None else defaults["top_k"]
    gc.top_k = top_k or None  # 0 means "no top-k"
    return gc


def _internal_error(exc: Exception) -> LocalLLMError:
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing
        return ModelUnavailableError(
            "The local model ran out of GPU memory for this request; retry with a shorter prompt "
            "or max_tokens, or free GPU memory."
        )
    log.exception("Local generation failed")
    return LocalLLMError(f"Local generation failed: {type(exc).__name__}: {exc}")
