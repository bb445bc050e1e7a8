"""LiteLLM ``CustomLLM`` for the local model: OpenAI request in, OpenAI response out.

The provider translates and validates; it never touches tensors. The path of one request:

    parse_chat_request (400 on bad input) -> load model once (503 if it cannot be)
    -> chat template + tokenize, context check (400 context_length_exceeded)
    -> Engine job on the generation thread -> Delta/Finish events -> ModelResponse or stream chunks
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import litellm
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import GenericStreamingChunk

from custom_handlers.engine import AsyncSink, Delta, Done, Engine, Failed, Finish, Job, SyncSink
from custom_handlers.errors import ContextLengthExceededError
from custom_handlers.loader import LoadedModel, ModelHolder
from custom_handlers.request import ChatRequest, parse_chat_request
from custom_handlers.settings import LocalModelSettings


@dataclass
class _Outcome:
    """What a finished job produced, per choice."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    finishes: dict[int, Finish] = field(default_factory=dict)

    def add(self, event: Delta | Finish) -> None:
        if isinstance(event, Delta):
            self.texts.setdefault(event.index, []).append(event.text)
        else:
            self.finishes[event.index] = event


class LocalLLM(CustomLLM):
    def __init__(self, holder: ModelHolder | None = None) -> None:
        super().__init__()
        self.holder = holder or ModelHolder()
        self.settings = LocalModelSettings()
        self.engine = Engine(
            self.holder,
            self.settings.max_batch_size,
            self.settings.max_queue,
            self.settings.keep_alive,
        )
        self._load_lock: asyncio.Lock | None = None

    # ---- LiteLLM entry points -------------------------------------------------------------

    async def acompletion(self, model, messages, *args, optional_params=None, **kwargs):
        request = self._parse(messages, optional_params, stream=False)
        job = await self._start(request, AsyncSink())
        outcome = _Outcome()
        try:
            while not isinstance(event := await job.sink.get(), Done):
                _raise_if_failed(event)
                outcome.add(event)
        finally:
            job.cancel()  # a no-op once done; stops generation if the caller went away
        return _model_response(kwargs.get("model_response"), model, job, outcome)

    def astreaming(
        self, model, messages, *args, optional_params=None, **kwargs
    ) -> AsyncIterator[GenericStreamingChunk]:
        """The stream, with the request checked first, as LiteLLM calls this.

        Not itself a generator: a refused request raises here, before any chunk, so every route
        answers it with an HTTP error (the Responses API's stream otherwise opened with a 200 and a
        lone ``response.failed`` event, which the openai SDK cannot read).
        """
        return self._stream(self._parse(messages, optional_params, stream=True))

    async def _stream(self, request: ChatRequest) -> AsyncIterator[GenericStreamingChunk]:
        job = await self._start(request, AsyncSink())
        try:
            while True:
                events = await job.sink.get_ready()
                for event in events:
                    if isinstance(event, Done):
                        return
                    _raise_if_failed(event)
                    yield _chunk(job, event)
                if not isinstance(events[-1], Finish):  # after a Finish, Done is on its way
                    await asyncio.sleep(STREAM_INTERVAL)  # text made meanwhile: one chunk
        finally:
            job.cancel()

    def completion(self, model, messages, *args, optional_params=None, **kwargs):
        request = self._parse(messages, optional_params, stream=False)
        job = self._start_sync(request)
        outcome = _Outcome()
        try:
            while not isinstance(event := job.sink.get(), Done):
                _raise_if_failed(event)
                outcome.add(event)
        finally:
            job.cancel()
        return _model_response(kwargs.get("model_response"), model, job, outcome)

    def streaming(
        self, model, messages, *args, optional_params=None, **kwargs
    ) -> Iterator[GenericStreamingChunk]:
        request = self._parse(messages, optional_params, stream=True)
        job = self._start_sync(request)
        try:
            while not isinstance(event := job.sink.get(), Done):
                _raise_if_failed(event)
                yield _chunk(job, event)
        finally:
            job.cancel()

    # ---- the model's state and release (GET /local/state, POST /local/release) ----------------

    def state(self) -> dict[str, object]:
        """What is loaded where, the memory it holds, and the requests it serves."""
        loaded = self.holder.loaded
        return {
            "loaded": loaded is not None,
            "loading": self.holder.loading,
            "source": LocalModelSettings().model,  # read now: the next load uses the current value
            "device": loaded.device if loaded else None,
            "dtype": loaded.dtype if loaded else None,
            "quantization": loaded.quantization if loaded else None,
            "context_length": loaded.context_length if loaded else None,
            "load_seconds": _rounded(self.holder.last_load_seconds),  # the last load's, if any
            "memory": self.holder.memory(),
            **self.engine.state(),
            "last_error": self.holder.last_error,
        }

    async def release(self) -> dict[str, object]:
        """Unload the model once the requests before this call are done; then its state."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        started = time.monotonic()
        marker = self.engine.release(on_done=wake)
        if not marker.done.is_set():
            await done
        return {
            "released": marker.released,
            "waited_seconds": round(time.monotonic() - started, 3),
            "state": self.state(),
        }

    # ---- internals --------------------------------------------------------------------------

    def _parse(self, messages, optional_params, *, stream: bool) -> ChatRequest:
        return parse_chat_request(
            messages, optional_params or {}, stream=stream, max_n=self.settings.max_n
        )

    async def _start(self, request: ChatRequest, sink: AsyncSink) -> Job:
        loaded = await self._load()
        if _is_small(request):  # under a millisecond: a thread hop would cost more than it saves
            prompt_ids, grammar = _prepare(loaded, request)
        else:
            prompt_ids, grammar = await asyncio.to_thread(_prepare, loaded, request)
        return self.engine.submit(self._job(loaded, request, prompt_ids, grammar, sink))

    def _start_sync(self, request: ChatRequest) -> Job:
        loaded = self.holder.get()
        prompt_ids, grammar = _prepare(loaded, request)
        return self.engine.submit(self._job(loaded, request, prompt_ids, grammar, SyncSink()))

    async def _load(self) -> LoadedModel:
        """The loaded model. One executor thread waits on a load, however many requests do."""
        if (loaded := self.holder.loaded) is not None:
            return loaded
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            return await asyncio.to_thread(self.holder.get)

    def _job(self, loaded, request: ChatRequest, prompt_ids: list[int], grammar, sink) -> Job:
        max_new = _output_budget(loaded, request, len(prompt_ids), self.settings.default_max_tokens)
        return Job(prompt_ids, request.sampling, max_new, sink, grammar, request.keep_alive)


# Streams send at most one chunk every STREAM_INTERVAL seconds: the proxy's work per chunk is the
# same whatever its size, so one chunk per token made a long streamed answer cost 26 % more than
# the same answer unstreamed, and one per 20 ms still 4-9 % (bench/streaming.py); one per 50 ms,
# 20 a second, reads as smooth and costs 1-5 %. The first chunk and the last are not delayed.
STREAM_INTERVAL = 0.05

# Below this many characters of messages (and no new schema to compile), templating and
# tokenizing take well under a millisecond: they run on the event loop instead of a thread.
SMALL_PROMPT_CHARS = 4000


def _is_small(request: ChatRequest) -> bool:
    chars = sum(len(m["content"]) for m in request.messages)
    return chars < SMALL_PROMPT_CHARS and request.json_schema is None


def _check_prompt_size(loaded: LoadedModel, request: ChatRequest) -> None:
    """Refuse at once messages that cannot fit, before tokenizing megabytes of text."""
    chars = sum(len(m["content"]) for m in request.messages)
    if chars > loaded.context_length * loaded.max_token_chars:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {loaded.context_length} tokens, and the "
            f"messages ({chars} characters) cannot fit in it. Please reduce the length of the "
            "messages."
        )


def _prepare(loaded: LoadedModel, request: ChatRequest) -> tuple[list[int], str | None]:
    """Prompt ids, and the compiled grammar when the answer must be JSON (cached per schema)."""
    _check_prompt_size(loaded, request)
    grammar = loaded.constraints.grammar(request.json_schema) if request.json_schema else None
    return _encode_prompt(loaded, request), grammar


def _encode_prompt(loaded: LoadedModel, request: ChatRequest) -> list[int]:
    """The model's own chat template, Qwen3 in non-thinking mode."""
    text = loaded.tokenizer.apply_chat_template(
        request.messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def _output_budget(loaded: LoadedModel, request: ChatRequest, prompt_len: int, default: int) -> int:
    context = loaded.context_length
    asked = request.sampling.max_tokens
    if asked is not None and prompt_len + asked > context:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the messages, {asked} in the "
            "completion). Please reduce the length of the messages or the completion."
        )
    if prompt_len >= context:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context} tokens, and the messages alone "
            f"take {prompt_len}. Please reduce the length of the messages."
        )
    return asked if asked is not None else min(default, context - prompt_len)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _raise_if_failed(event) -> None:
    if isinstance(event, Failed):
        raise event.error


def _model_response(model_response, model: str, job: Job, outcome: _Outcome):
    response = model_response if model_response is not None else litellm.ModelResponse()
    response.choices = [
        litellm.Choices(
            index=i,
            finish_reason=outcome.finishes[i].reason,
            message=litellm.Message(role="assistant", content="".join(outcome.texts.get(i, []))),
        )
        for i in sorted(outcome.finishes)
    ]
    completion_tokens = sum(f.completion_tokens for f in outcome.finishes.values())
    response.usage = litellm.Usage(**_usage(job.prompt_tokens, completion_tokens))
    response.model = model
    response.created = int(time.time())
    return response


def _chunk(job: Job, event: Delta | Finish) -> GenericStreamingChunk:
    if isinstance(event, Delta):
        return GenericStreamingChunk(
            text=event.text,
            is_finished=False,
            finish_reason="",
            usage=None,
            index=event.index,
            tool_use=None,
        )
    return GenericStreamingChunk(
        text="",
        is_finished=True,
        finish_reason=event.reason,
        index=event.index,
        tool_use=None,
        usage=_usage(job.prompt_tokens, event.completion_tokens),
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _configure_logging() -> None:
    """Our INFO lines (model loaded, generation cancelled) reach the gateway's stderr."""
    logger = logging.getLogger("custom_handlers")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_configure_logging()
local_llm = LocalLLM()
