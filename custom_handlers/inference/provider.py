"""LiteLLM ``CustomLLM`` for the local model: OpenAI request in, OpenAI response out.

The provider translates and validates; it never touches tensors. The path of one request:

    parse_chat_request (400 on bad input) -> load model once (503 if it cannot be)
    -> chat template + tokenize, context check (400 context_length_exceeded)
    -> Engine job on the generation thread -> Delta/Finish events -> ModelResponse or stream chunks
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
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

from custom_handlers.inference import completion as text
from custom_handlers.inference.engine import Engine
from custom_handlers.inference.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    LocalLLMError,
    ModelUnavailableError,
    NotFoundError,
)
from custom_handlers.inference.jobs import (
    AsyncSink,
    Delta,
    Done,
    Failed,
    Finish,
    Job,
    SyncSink,
    TokenLogprob,
    ToolRun,
)
from custom_handlers.inference.loader import LoadedModel, ModelHolder
from custom_handlers.inference.registry import LocalModel, Registry
from custom_handlers.inference.request import ChatRequest, check_logit_bias, parse_chat_request
from custom_handlers.inference.settings import LocalModelsSettings
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
    """Every local model of the gateway (``registry``), behind LiteLLM's provider interface."""

    def __init__(self, holder: ModelHolder | None = None, registry: Registry | None = None):
        super().__init__()
        self.registry = registry or Registry.single(holder)

    def use(self, registry: Registry) -> None:
        """Serve the models of ``registry`` (the gateway's configuration) from now on."""
        self.registry = registry

    # The first model's parts: the one model of a registry made without a configuration.
    @property
    def first(self) -> LocalModel:
        return next(iter(self.registry.models.values()))

    @property
    def holder(self) -> ModelHolder:
        return self.first.holder

    @property
    def engine(self) -> Engine:
        return self.first.engine

    # ---- LiteLLM entry points -------------------------------------------------------------

    async def acompletion(self, model, messages, *args, optional_params=None, **kwargs):
        local = self._model(model, kwargs)
        if _is_text_completion(kwargs):
            request = _parse_text(local, messages, optional_params, kwargs, stream=False)
            return await self._complete_text(local, request, model)
        request = _parse(local, messages, optional_params, stream=False)
        job = await self._start(local, request, AsyncSink())
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
        local = self._model(model, kwargs)
        if _is_text_completion(kwargs):
            key = _metadata(kwargs).get(text.STREAM_KEY)
            request = _parse_text(local, messages, optional_params, kwargs, stream=True)
            return self._stream_text(local, request, model, key)
        request = _parse(local, messages, optional_params, stream=True)
        return self._stream(local, request, model)

    async def _stream(self, local: LocalModel, request: ChatRequest, model: str) -> AsyncIterator:
        job = await self._start(local, request, AsyncSink())
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
        local = self._model(model, kwargs)
        if _is_text_completion(kwargs):
            raise InvalidRequestError(
                "/v1/completions on the local model is served by the gateway's async path only.",
                param="prompt",
            )
        request = _parse(local, messages, optional_params, stream=False)
        job = self._start_sync(local, request)
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
        local = self._model(model, kwargs)
        request = _parse(local, messages, optional_params, stream=True)
        job = self._start_sync(local, request)
        chunks = _Chunks(model, job)
        try:
            while not isinstance(event := job.sink.get(), Done):
                _raise_if_failed(event)
                yield chunks.of(event)
        finally:
            job.cancel()

    # ---- /v1/completions: the raw prompt, continued (custom_handlers/inference/completion.py) ----

    async def _complete_text(
        self, local: LocalModel, request: text.CompletionRequest, model: str
    ) -> litellm.TextCompletionResponse:
        loaded, jobs = await self._start_texts(local, request)
        try:
            outcomes = await asyncio.gather(*(_collect(job) for job, _ in jobs))
        finally:
            for job, _ in jobs:
                job.cancel()
        n, choices = request.sampling.n, []
        for i, ((job, prompt_text), outcome) in enumerate(zip(jobs, outcomes, strict=True)):
            asked = job.prompt_logprobs is not None
            prompt_entries = _prompt_entries(loaded, job) if asked else None
            for j in sorted(outcome.finishes):
                written = not request.prompt_only
                entries = outcome.logprobs.get(j, []) if written else []
                choices.append(
                    text.Choice(
                        index=i * n + j,
                        text="".join(outcome.texts.get(j, [])) if written else "",
                        finish_reason=outcome.finishes[j].reason,
                        prompt_text=prompt_text,
                        prompt_logprobs=prompt_entries,
                        logprobs=[_legacy(e) for e in entries],
                    )
                )
        completion_tokens = sum(
            f.completion_tokens for outcome in outcomes for f in outcome.finishes.values()
        )
        if request.prompt_only:
            completion_tokens = 0
        prompt_tokens = sum(job.prompt_tokens for job, _ in jobs)
        body = text.response_body(
            text.completion_id(),
            model,
            choices,
            _text_usage(prompt_tokens, completion_tokens),
            request.echo,
            request.logprobs is not None,
        )
        return litellm.TextCompletionResponse(**body)

    async def _stream_text(
        self, local: LocalModel, request: text.CompletionRequest, model: str, key: str | None
    ) -> AsyncIterator:
        """Every choice's chunks, in the order made. With the gateway's stream hook (``key``)
        they go to its channel, in OpenAI's shape, and LiteLLM gets a placeholder per batch (its
        text-completion stream would keep only the first choice's text); without it, one
        choice's text and end go to LiteLLM directly."""
        loaded, jobs = await self._start_texts(local, request)
        channel = text.open_channel(key) if key is not None else None
        writer = text.StreamWriter(model, request.logprobs is not None)
        events: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(_pump(i, job, events)) for i, (job, _) in enumerate(jobs)]
        n, started, left, completion_tokens = request.sampling.n, set(), len(jobs), 0
        try:
            while left:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                chunks, last = [], None
                for i, event in batch:
                    if isinstance(event, Done):
                        left -= 1
                        continue
                    _raise_if_failed(event)
                    (job, prompt_text), index = jobs[i], i * n + event.index
                    if index not in started:
                        started.add(index)
                        if request.echo:
                            entries = (
                                _prompt_entries(loaded, job)
                                if request.logprobs is not None
                                else None
                            )
                            chunks.append(writer.chunk(index, prompt_text, entries))
                    if isinstance(event, Finish):
                        tokens = 0 if request.prompt_only else event.completion_tokens
                        completion_tokens += tokens
                        chunks.append(writer.chunk(index, "", [], event.reason))
                        last = event
                    elif isinstance(event, Delta) and not request.prompt_only:
                        entries = [_legacy(e) for e in event.logprobs]
                        chunks.append(writer.chunk(index, event.text, entries))
                if channel is not None:
                    channel.extend(chunks)
                    if chunks:
                        yield _placeholder(model, writer.id)
                else:  # one choice: its text, then its end with the usage
                    for chunk in chunks:
                        choice = chunk["choices"][0]
                        if choice["finish_reason"] is None:
                            yield _placeholder(model, writer.id, choice["text"])
                    if last is not None:
                        yield _end(last.reason, jobs[0][0].prompt_tokens, completion_tokens)
                if left and not isinstance(batch[-1][1], Finish | Done):
                    await asyncio.sleep(STREAM_INTERVAL)  # text made meanwhile: one chunk
            if channel is not None:
                usage = _text_usage(sum(job.prompt_tokens for job, _ in jobs), completion_tokens)
                if request.include_usage:
                    channel.append(writer.usage(usage))
                yield _end("stop", usage["prompt_tokens"], completion_tokens)
        finally:
            for pump in pumps:
                pump.cancel()
            for job, _ in jobs:
                job.cancel()

    async def _start_texts(
        self, local: LocalModel, request: text.CompletionRequest
    ) -> tuple[LoadedModel, list[tuple[Job, str]]]:
        """One job per prompt (``n`` rows each), submitted in the prompts' order."""
        with local.arrival():
            loaded = await self._load(local)
            prepared = await asyncio.to_thread(_prepare_texts, loaded, request)
            jobs: list[tuple[Job, str]] = []
            try:
                for ids, prompt_text in prepared.prompts:
                    job = _text_job(local, loaded, request, ids, prepared.grammar)
                    jobs.append((local.engine.submit(job), prompt_text))
            except BaseException:
                for job, _ in jobs:
                    job.cancel()
                raise
            return loaded, jobs

    # ---- the models' state and release (GET /local/state, POST /local/release) ---------------

    def state(self) -> dict[str, object]:
        """Every local model: what is loaded where, the memory it holds, the requests it serves."""
        return {
            "models": [_model_state(m) for m in self.registry.models.values()],
            "max_loaded_models": self.registry.max_loaded,
        }

    async def release(self, name: str | None = None) -> dict[str, object]:
        """Unload every model (or the one named) once the requests sent before this call are
        done; then the models released and the state. ``NotFoundError`` for an unknown name."""
        if name is None:
            models = list(self.registry.models.values())
        elif (one := self.registry.models.get(name)) is not None:
            models = [one]
        else:
            raise NotFoundError(
                f"No local model is named {name!r} (local models: "
                f"{', '.join(self.registry.models) or 'none'}).",
                param="model",
                code="model_not_found",
            )
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        markers = []
        for model in models:
            done = loop.create_future()

            def wake(done=done) -> None:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

            marker = model.engine.release(on_done=wake)
            markers.append((model, marker, done))
        for _, marker, done in markers:
            if not marker.done.is_set():
                await done
        return {
            "released": [model.name for model, marker, _ in markers if marker.released],
            "waited_seconds": round(time.monotonic() - started, 3),
            "state": self.state(),
        }

    def preload(self) -> threading.Thread | None:
        """Load the models marked ``preload: true``, in the configuration's order, on a thread of
        their own (the gateway starts meanwhile); the thread, or None when none is marked.

        A preloaded model stays loaded until its first request (keep_alive counts from the end of
        a request), unless another model needs its room."""
        marked = [m for m in self.registry.models.values() if m.settings.preload]
        if not marked:
            return None
        if len(marked) > self.registry.max_loaded:
            log.warning(
                "%d local models are marked preload but LOCAL_LLM_MAX_LOADED_MODELS is %d: the "
                "last %d loaded stay loaded",
                len(marked),
                self.registry.max_loaded,
                self.registry.max_loaded,
            )

        def load_all() -> None:
            for model in marked:
                model.touch()
                with contextlib.suppress(LocalLLMError):  # logged; the first request retries
                    model.holder.get()

        thread = threading.Thread(target=load_all, name="local-llm-preload", daemon=True)
        thread.start()
        return thread

    # ---- internals --------------------------------------------------------------------------

    def _model(self, model: str, kwargs: dict) -> LocalModel:
        """The local model a call is for: its entry's name (LiteLLM's model group), checked
        against the deployment's ``zlocal/<id>``; a model not declared is refused (400)."""
        params = kwargs.get("litellm_params") or {}
        metadata = params.get("metadata") or {}
        group = metadata.get("model_group") if isinstance(metadata, dict) else None
        return self.registry.find(group if isinstance(group, str) else None, model)

    async def _start(self, local: LocalModel, request: ChatRequest, sink: AsyncSink) -> Job:
        with local.arrival():
            loaded = await self._load(local)
            if _is_small(request):  # under a millisecond: a thread hop would cost more
                prepared = _prepare(loaded, request)
            else:
                prepared = await asyncio.to_thread(_prepare, loaded, request)
            return local.engine.submit(_job(local, loaded, request, prepared, sink))

    def _start_sync(self, local: LocalModel, request: ChatRequest) -> Job:
        with local.arrival():
            loaded = local.holder.get()
            prepared = _prepare(loaded, request)
            return local.engine.submit(_job(local, loaded, request, prepared, SyncSink()))

    async def _load(self, local: LocalModel) -> LoadedModel:
        """The loaded model. One thread loads it, however many requests wait for it; a request
        that has waited ``LOCAL_LLM_DOWNLOAD_WAIT`` for a download still running gets a 503
        saying so (the download goes on: a later request finds it further along, or done)."""
        if (loaded := local.holder.loaded) is not None:
            return loaded
        if local.load_task is None:
            local.load_task = asyncio.ensure_future(asyncio.to_thread(local.holder.get))
            local.load_task.add_done_callback(lambda task: _load_done(local, task))
        task, started = local.load_task, time.monotonic()
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(task), 1.0)
            except TimeoutError:
                watch = local.holder.download
                if watch is None or not watch.active:
                    continue
                if time.monotonic() - started >= LocalModelsSettings().download_wait:
                    raise _still_downloading(local, watch.describe()) from None


def _still_downloading(local: LocalModel, progress: str) -> ModelUnavailableError:
    error = ModelUnavailableError(
        f"The local model {local.name!r} is still downloading ({progress}; the gateway's log "
        f"shows its progress). Retry in a minute, or download it ahead with "
        f"`z-explorer pull {local.name}`.",
        code="model_downloading",
    )
    error.headers = {"retry-after": "60"}
    return error


def _load_done(local: LocalModel, task: asyncio.Task) -> None:
    """Forget the finished load: its result is the model, which must not outlive an unload. Its
    failure is told to the requests that wait for it, and logged by the holder; asyncio need not
    report it again when nobody waits any more."""
    if local.load_task is task:
        local.load_task = None
    if not task.cancelled():
        task.exception()


def _parse(local: LocalModel, messages, optional_params, *, stream: bool) -> ChatRequest:
    return parse_chat_request(
        messages, optional_params or {}, stream=stream, max_n=local.settings.max_n
    )


def _is_text_completion(kwargs: dict) -> bool:
    """LiteLLM's /v1/completions calls the provider with ``text_completion`` set."""
    return bool((kwargs.get("litellm_params") or {}).get("text_completion"))


def _metadata(kwargs: dict) -> dict:
    metadata = (kwargs.get("litellm_params") or {}).get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _parse_text(
    local: LocalModel, messages, optional_params, kwargs: dict, *, stream: bool
) -> text.CompletionRequest:
    metadata = _metadata(kwargs)
    return text.parse_completion_request(
        text.prompts_of(metadata.get(text.PROMPT_KEY), messages),
        optional_params or {},
        stream=stream,
        max_n=local.settings.max_n,
        channel=metadata.get(text.STREAM_KEY) is not None,
    )


async def _pump(i: int, job: Job, events: asyncio.Queue) -> None:
    """Job ``i``'s events into one queue for a stream of several jobs (prompts)."""
    while True:
        for event in await job.sink.get_ready():
            events.put_nowait((i, event))
            if isinstance(event, Done):
                return


def _placeholder(model: str, chunk_id: str, content: str = " ") -> ModelResponseStream:
    """A chunk of text for LiteLLM's stream (with the stream hook, only its rhythm is used)."""
    choice = StreamingChoices(index=0, delta={"role": None, "content": content})
    return ModelResponseStream(id=chunk_id, model=model, choices=[choice])


def _end(reason: str, prompt_tokens: int, completion_tokens: int) -> GenericStreamingChunk:
    return GenericStreamingChunk(
        text="",
        is_finished=True,
        finish_reason=reason,
        index=0,
        tool_use=None,
        usage=_text_usage(prompt_tokens, completion_tokens),
    )


@dataclass(frozen=True)
class _PreparedTexts:
    prompts: list[tuple[list[int], str]]  # each prompt's ids and its text (what echo shows)
    grammar: str | None


def _prepare_texts(loaded: LoadedModel, request: text.CompletionRequest) -> _PreparedTexts:
    """Each prompt tokenized as ``generate`` would (no chat template; the tokenizer's own
    special tokens, BOS where the checkpoint wants one), or its token ids checked."""
    check_logit_bias(request.sampling, vocab_size(loaded.model))
    tokenizer = loaded.tokenizer
    last_id = len(tokenizer) - 1
    prompts = []
    for i, prompt in enumerate(request.prompts):
        where = "prompt" if len(request.prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            if len(prompt) > loaded.context_length * loaded.max_token_chars:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {loaded.context_length} tokens, "
                    f"and {where} ({len(prompt)} characters) cannot fit in it.",
                    param="prompt",
                )
            ids = list(tokenizer(prompt)["input_ids"])
            shown = prompt
        else:
            bad = [t for t in prompt if not 0 <= t <= last_id]
            if bad:
                raise InvalidRequestError(
                    f"{where} holds token id {bad[0]}, which this model's vocabulary lacks "
                    f"(ids 0 to {last_id}).",
                    param="prompt",
                )
            ids = list(prompt)
            shown = tokenizer.decode(ids)
        if not ids:
            raise InvalidRequestError(
                f"{where} is empty: a completion continues a prompt of at least one token.",
                param="prompt",
            )
        prompts.append((ids, shown))
    schema = request.chat.json_schema
    grammar = loaded.constraints.grammar(schema) if schema else None
    return _PreparedTexts(prompts, grammar)


def _text_job(
    local: LocalModel,
    loaded,
    request: text.CompletionRequest,
    ids: list[int],
    grammar: str | None,
) -> Job:
    n = request.sampling.n
    budget = local.engine.kv_budget(loaded)
    default = text.DEFAULT_MAX_TOKENS
    if (room := budget.tokens_alone(n)) is not None and room > len(ids):
        default = min(default, room - len(ids))
    if request.prompt_only:
        max_new = 1
    else:
        max_new = _output_budget(loaded, request.chat, len(ids), default, what="prompt")
    budget.check(n, len(ids) + max_new)
    job = Job(
        ids,
        request.sampling,
        max_new,
        AsyncSink(),
        grammar,
        request.chat.keep_alive,
        logprobs=request.logprobs,
    )
    job.raw_text = True
    if request.echo and request.logprobs is not None:
        job.prompt_logprobs = request.logprobs
    return job


async def _collect(job: Job) -> _Outcome:
    outcome = _Outcome()
    while not isinstance(event := await job.sink.get(), Done):
        _raise_if_failed(event)
        outcome.add(event)
    return outcome


def _legacy(entry: TokenLogprob) -> tuple[str, float, dict[str, float]]:
    """A token's logprob in the legacy shape: the sampled token is among its alternatives."""
    top = {token: _finite(logprob) for token, _, logprob in entry.top}
    top.setdefault(entry.token, _finite(entry.logprob))
    return entry.token, _finite(entry.logprob), top


def _finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf (a token the model rules out) as -9999.0, as vLLM does."""
    return max(logprob, -9999.0)


def _prompt_entries(loaded: LoadedModel, job: Job) -> list[tuple]:
    """The prompt's tokens with their logprobs: the first has none (nothing comes before it)."""
    first = loaded.constraints.token_text(job.prompt_ids[0])[0]
    return [(first, None, None), *(_legacy(e) for e in job.prompt_entries or [])]


def _job(local: LocalModel, loaded, request: ChatRequest, prepared: _Prepared, sink) -> Job:
    ids, n = prepared.prompt_ids, request.sampling.n
    budget = local.engine.kv_budget(loaded)
    default = local.settings.default_max_tokens
    if (room := budget.tokens_alone(n)) is not None and room > len(ids):
        default = min(default, room - len(ids))  # without max_tokens: what fits in the KV cache
    max_new = _output_budget(loaded, request, len(ids), default)
    budget.check(n, len(ids) + max_new)
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


def _model_state(model: LocalModel) -> dict[str, object]:
    holder, settings = model.holder, model.settings
    loaded = holder.loaded
    return {
        "model": model.name,
        # read now for a model without an entry: the next load uses the current LOCAL_LLM_MODEL
        "source": (settings if model.model_id is not None else holder.settings_factory()).shown,
        "loaded": loaded is not None,
        "loading": holder.loading,
        "device": loaded.device if loaded else None,
        "dtype": loaded.dtype if loaded else None,
        "quantization": loaded.quantization if loaded else None,
        "context_length": loaded.context_length if loaded else None,
        "load_seconds": _rounded(holder.last_load_seconds),  # the last load's, if any
        "memory": holder.memory(),
        **model.engine.state(),
        "requests": {"running": model.engine.running, "queued": model.queued},
        "max_batch_size": model.engine.max_rows,
        "max_queue": settings.max_queue,
        "preload": settings.preload,
        "last_error": holder.last_error,
    }


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
    check_logit_bias(request.sampling, vocab_size(loaded.model))
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


def vocab_size(model) -> int:
    """The width of the model's logits: the token ids ``logit_bias`` may name."""
    head = model.get_output_embeddings()
    width = getattr(head, "out_features", None)
    return width if isinstance(width, int) else model.config.get_text_config().vocab_size


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


def _output_budget(
    loaded: LoadedModel, request: ChatRequest, prompt_len: int, default: int, what: str = "messages"
) -> int:
    """The job's token budget; ``what`` the prompt is, as the caller sent it (and its field)."""
    context = loaded.context_length
    asked = request.sampling.max_tokens
    if asked is not None and prompt_len + asked > context:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the {what}, {asked} in the "
            f"completion). Please reduce the length of the {what} or the completion.",
            param=what,
        )
    if prompt_len >= context:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context} tokens, and the {what} alone "
            f"take{'s' if what == 'prompt' else ''} {prompt_len}. Please reduce the length of "
            f"the {what}.",
            param=what,
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
    response.usage = litellm.Usage(**_usage(job, *outcome.finishes.values()))
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
                usage=_usage(self.job, event),
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


def _usage(job: Job, *finishes: Finish) -> dict:
    """OpenAI's ``usage`` for ``job``'s choices that ``finishes`` ended, with its details objects:
    prompt tokens whose KV came from the prefix cache, and completion tokens of a think block."""
    completion_tokens = sum(f.completion_tokens for f in finishes)
    reasoning_tokens = sum(f.reasoning_tokens for f in finishes)
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": job.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def _text_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """A text completion's ``usage``: its three counts."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


log = logging.getLogger("custom_handlers.provider")


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
