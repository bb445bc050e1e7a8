"""What a request is to the engine (``Job``), what it hears back (events, through a ``Sink``), and
the marker that unloads the model (``Release``).

Events a job emits, in order: ``Delta`` (text for one choice) and ``CallDelta`` (a piece of a tool
call), ``Finish`` (one per choice), then ``Done``; or ``Failed``, then ``Done``. Each job carries
its own output channel and a cancel flag checked before every step, so a caller who goes away
leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from custom_handlers.inference.errors import LocalLLMError, ModelUnavailableError
from custom_handlers.inference.request import SamplingParams
from custom_handlers.inference.tools import CallDelta

log = logging.getLogger("custom_handlers.engine")


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


def fail(job: Job, error: LocalLLMError) -> None:
    job.emit(Failed(error))
    job.emit(Done())


def error_of(exc: Exception) -> LocalLLMError:
    return exc if isinstance(exc, LocalLLMError) else internal_error(exc)


def internal_error(exc: Exception) -> LocalLLMError:
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing
        return ModelUnavailableError(
            "The local model ran out of GPU memory for this request; retry with a shorter prompt "
            "or max_tokens, or free GPU memory."
        )
    log.exception("Local generation failed")
    return LocalLLMError(f"Local generation failed: {type(exc).__name__}: {exc}")
