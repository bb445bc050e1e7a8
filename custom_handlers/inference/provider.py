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
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import litellm
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import (
    ChatCompletionDeltaToolCall,
    GenericStreamingChunk,
    ModelResponseStream,
    StreamingChoices,
)

from custom_handlers.inference.engine import (
    AsyncSink,
    Delta,
    Done,
    Engine,
    Failed,
    Finish,
    Job,
    SyncSink,
    TokenLogprob,
    ToolRun,
)
from custom_handlers.inference.errors import ContextLengthExceededError, InvalidRequestError
from custom_handlers.inference.loader import LoadedModel, ModelHolder
from custom_handlers.inference.request import ChatRequest, parse_chat_request
from custom_handlers.inference.settings import LocalModelSettings
from custom_handlers.inference.tools import CallDelta


@dataclass
class _Outcome:
    """What a finished job produced, per choice."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    calls: dict[int, list[dict]] = field(default_factory=dict)
    finishes: dict[int, Finish] = field(default_factory=dict)

    def add(self, event: Delta | CallDelta | Finish) -> None:
        if isinstance(event, Delta):
            self.texts.setdefault(event.index, []).append(event.text)
            self.logprobs.setdefault(event.index, []).extend(event.logprobs)
        elif isinstance(event, CallDelta):
            calls = self.calls.setdefault(event.index, [])
            if event.id is not None:
                function = {"name": event.name, "arguments": ""}
                calls.append({"id": event.id, "type": "function", "function": function})
            calls[event.call]["function"]["arguments"] += event.arguments
        else:
            self.finishes[event.index] = event

    def message(self, index: int) -> litellm.Message:
        """Choice ``index``'s message: its text, and its complete tool calls (a call cut short
        by max_tokens is left out: every call returned is whole and valid)."""
        content = "".join(self.texts.get(index, []))
        calls = self.calls.get(index, [])[: self.finishes[index].complete_calls]
        if not calls:
            return litellm.Message(role="assistant", content=content)
        return litellm.Message(role="assistant", content=content or None, tool_calls=calls)


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
            int(self.settings.prefix_cache_mb * 2**20),
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
        return self._stream(self._parse(messages, optional_params, stream=True), model)

    async def _stream(self, request: ChatRequest, model: str) -> AsyncIterator:
        job = await self._start(request, AsyncSink())
        chunks = _Chunks(model, job)
        try:
            while True:
                events = await job.sink.get_ready()
                for event in events:
                    if isinstance(event, Done):
                        return
                    _raise_if_failed(event)
                    yield chunks.of(event)
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
        chunks = _Chunks(model, job)
        try:
            while not isinstance(event := job.sink.get(), Done):
                _raise_if_failed(event)
                yield chunks.of(event)
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
            prepared = _prepare(loaded, request)
        else:
            prepared = await asyncio.to_thread(_prepare, loaded, request)
        return self.engine.submit(self._job(loaded, request, prepared, sink))

    def _start_sync(self, request: ChatRequest) -> Job:
        loaded = self.holder.get()
        return self.engine.submit(self._job(loaded, request, _prepare(loaded, request), SyncSink()))

    async def _load(self) -> LoadedModel:
        """The loaded model. One executor thread waits on a load, however many requests do."""
        if (loaded := self.holder.loaded) is not None:
            return loaded
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            return await asyncio.to_thread(self.holder.get)

    def _job(self, loaded, request: ChatRequest, prepared: _Prepared, sink) -> Job:
        ids = prepared.prompt_ids
        max_new = _output_budget(loaded, request, len(ids), self.settings.default_max_tokens)
        return Job(
            ids,
            request.sampling,
            max_new,
            sink,
            prepared.grammar,
            request.keep_alive,
            prepared.tools,
            request.logprobs,
        )


# Streams send at most one chunk every STREAM_INTERVAL seconds: the proxy's work per chunk is the
# same whatever its size, so one chunk per token made a long streamed answer cost 26 % more than
# the same answer unstreamed, and one per 20 ms still 4-9 % (bench/streaming.py); one per 50 ms,
# 20 a second, reads as smooth and costs 1-5 %. The first chunk and the last are not delayed.
STREAM_INTERVAL = 0.05

# Below this many characters of messages (and no new schema to compile), templating and
# tokenizing take well under a millisecond: they run on the event loop instead of a thread.
SMALL_PROMPT_CHARS = 4000


def _is_small(request: ChatRequest) -> bool:
    return (
        request.chars < SMALL_PROMPT_CHARS and request.json_schema is None and request.tools is None
    )


def _check_prompt_size(loaded: LoadedModel, request: ChatRequest) -> None:
    """Refuse at once messages that cannot fit, before tokenizing megabytes of text."""
    chars = request.chars
    if chars > loaded.context_length * loaded.max_token_chars:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {loaded.context_length} tokens, and the "
            f"messages ({chars} characters) cannot fit in it. Please reduce the length of the "
            "messages."
        )


@dataclass(frozen=True)
class _Prepared:
    prompt_ids: list[int]
    grammar: str | None  # the answer's JSON grammar (compiled once per schema)
    tools: ToolRun | None


def _prepare(loaded: LoadedModel, request: ChatRequest) -> _Prepared:
    """Prompt ids and the grammars the answer and its tool calls must follow."""
    _check_prompt_size(loaded, request)
    if request.thinking:
        _check_thinking(loaded, request)
    constraints, schema = loaded.constraints, request.json_schema
    grammar = constraints.grammar(schema) if schema else None
    tools = None
    if request.tools is not None:
        markers = constraints.marker_ids
        if markers is None:
            raise InvalidRequestError(
                "This checkpoint has no <tool_call> token, so the local model cannot call tools "
                "with it; use a Qwen3 checkpoint or a cloud model.",
                param="tools",
            )
        calls = constraints.tool_grammar(request.tools, schema) if request.tools.may_call else None
        from_start = calls is not None and (request.tools.must_call or schema is not None)
        tools = ToolRun(*markers, calls, from_start)
        if from_start:
            grammar = None  # the calls' grammar holds the answer's too
    return _Prepared(_encode_prompt(loaded, request), grammar, tools)


def _check_thinking(loaded: LoadedModel, request: ChatRequest) -> None:
    """Thinking needs a hybrid checkpoint (its template reads ``enable_thinking``) and an answer
    free to begin with a think block."""
    if "enable_thinking" not in (loaded.tokenizer.chat_template or ""):
        raise InvalidRequestError(
            "'reasoning_effort' asks for thinking, and this checkpoint has no thinking mode "
            "(Qwen3-4B-Instruct-2507 always answers directly). Leave it unset or 'none', use a "
            "hybrid Qwen3 checkpoint (Qwen/Qwen3-4B), or a cloud model.",
            param="reasoning_effort",
        )
    if request.json_schema or (request.tools and request.tools.must_call):
        raise InvalidRequestError(
            "'reasoning_effort' asks for thinking, but this answer is constrained from its first "
            "token (response_format, or a required tool call), which leaves no room for it. "
            "Leave reasoning_effort unset or 'none' for this request.",
            param="reasoning_effort",
        )


def _encode_prompt(loaded: LoadedModel, request: ChatRequest) -> list[int]:
    """The model's own chat template (tools as it lays them out), Qwen3 in non-thinking mode
    unless the request asked for thinking (its think block never reaches the caller)."""
    tools = request.tools.template_tools() if request.tools else None
    text = loaded.tokenizer.apply_chat_template(
        request.messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=bool(request.thinking),
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
            message=outcome.message(i),
            logprobs=None if job.logprobs is None else _logprobs(outcome.logprobs.get(i, [])),
        )
        for i in sorted(outcome.finishes)
    ]
    completion_tokens = sum(f.completion_tokens for f in outcome.finishes.values())
    response.usage = litellm.Usage(**_usage(job.prompt_tokens, completion_tokens))
    response.model = model
    response.created = int(time.time())
    return response


class _Chunks:
    """One stream's chunks, in the two shapes LiteLLM passes on from a custom provider.

    Text and tool calls go as ``ModelResponseStream`` (OpenAI's chunk, with one id and ``created``
    for the whole stream): the only shape whose ``logprobs`` reach the caller, and whose
    ``tool_calls`` keep their own ``index`` per call. The end goes as a ``GenericStreamingChunk``,
    the shape whose ``finish_reason`` and ``usage`` LiteLLM puts on the stream's final chunk.
    """

    def __init__(self, model: str, job: Job):
        self.job, self.model = job, model
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = False

    def of(self, event: Delta | CallDelta | Finish):
        if isinstance(event, Finish):
            return GenericStreamingChunk(
                text="",
                is_finished=True,
                finish_reason=event.reason,
                index=event.index,
                tool_use=None,
                usage=_usage(self.job.prompt_tokens, event.completion_tokens),
            )
        delta: dict = {"role": None if self.started else "assistant"}
        self.started = True
        logprobs = None
        if isinstance(event, CallDelta):
            delta["tool_calls"] = [_call_piece(event)]
        else:
            delta["content"] = event.text
            if self.job.logprobs is not None:
                logprobs = _logprobs(event.logprobs)
        choice = StreamingChoices(index=event.index, delta=delta, logprobs=logprobs)
        return ModelResponseStream(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )


def _call_piece(event: CallDelta) -> ChatCompletionDeltaToolCall:
    """A tool call's piece as OpenAI streams it: id, type and name only on the first."""
    function = {"arguments": event.arguments}
    if event.name is not None:
        function["name"] = event.name
    first = event.id is not None
    return ChatCompletionDeltaToolCall(
        id=event.id, type="function" if first else None, function=function, index=event.call
    )


def _logprobs(entries: list[TokenLogprob]) -> dict:
    """OpenAI's ``choices[i].logprobs``."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [
                    {"token": token, "logprob": logprob, "bytes": raw}
                    for token, raw, logprob in e.top
                ],
            }
            for e in entries
        ]
    }


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
