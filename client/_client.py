"""``Client`` and ``AsyncClient``: prompt enhancement, variable values and template expansion.

Each operation is written once, as a *plan*: a generator that yields the chat requests it needs
and receives each answer. ``Client`` runs plans with blocking calls and ``AsyncClient`` with
awaited ones, so the two twins cannot drift apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from client import _prompts
from client._config import Settings, load_settings
from client._errors import (
    ClientError,
    ContextLengthError,
    LibraryError,
    ResponseError,
    VariableExistsError,
)
from client._library import Library, Variable, check_name
from client._llm import AsyncTransport, Completion, Transport
from client._local import (
    DEFAULT_RELEASE_TIMEOUT,
    LocalModelState,
    LocalState,
    ReleaseResult,
    pick_model,
)
from client._prompts import ChatRequest
from client._template import Template, parse_template, substitute
from client._values import (
    clean_prompt,
    distinct,
    extract_values,
    not_a_value,
    strip_thinking,
)

T = TypeVar("T")
Plan = Generator[ChatRequest, Completion, T]
Progress = Callable[[str], None]

DEFAULT_VALUE_COUNT = 20
MAX_BATCH = 25  # values asked for in one request
WEAK_ROUNDS = 3  # rounds bringing under half of what they asked for, before giving up


@dataclass(frozen=True)
class ExpandedPrompt:
    """One prompt made from a template: the final text, the text before enhancement, the values."""

    prompt: str
    substituted: str
    values: dict[str, str] = field(default_factory=dict)


# ---- plans --------------------------------------------------------------------------------------


def text_plan(prompt: str, max_tokens: int, temperature: float) -> Plan[str]:
    completion = yield _prompts.text_request(prompt, max_tokens, temperature)
    return strip_thinking(completion.text).strip()


def enhance_plan(prompt: str, instruction: str = "") -> Plan[str]:
    if not prompt.strip():
        raise ValueError("prompt is empty")
    completion = yield _prompts.enhance_request(prompt, instruction)
    enhanced = clean_prompt(completion.text, cut=completion.finish_reason == "length")
    if not enhanced:
        cut = " (it ran out of tokens)" if completion.finish_reason == "length" else ""
        raise ResponseError(
            f"Model '{completion.model}' returned no prompt{cut}. Try again, or choose another "
            "model with LLM_MODEL."
        )
    return enhanced


def values_plan(name: str, context_prompt: str, count: int) -> Plan[list[str]]:
    """Ask for the values still missing, in batches, until there are ``count`` distinct ones.

    A batch that does not fit the model's context is made smaller. A round that brings less than
    half of what it asked for is a weak one; after ``WEAK_ROUNDS`` of them the plan gives up.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    values: list[str] = []
    batch, weak, model = min(count, MAX_BATCH), 0, "the model"
    while len(values) < count:
        want = min(count - len(values), batch)
        request = _prompts.values_request(name, context_prompt, want, _recent(values))
        try:
            completion = yield request
        except ContextLengthError as exc:
            batch = _smaller_batch(exc, want, _prompts.value_length_limit(name))
            continue
        model = f"Model '{completion.model}'"
        found = [v for v in extract_values(completion.text) if not not_a_value(v, name)]
        before, values = len(values), distinct(values + found)
        if 2 * (len(values) - before) < want:
            weak += 1
        if weak >= WEAK_ROUNDS and len(values) < count:
            raise ResponseError(
                f"{model} gave {len(values)} distinct values for __{name}__ of the {count} asked "
                "for. Try again, ask for fewer, or choose another model (LLM_MODEL)."
            )
    return values[:count]


def _recent(values: list[str], max_chars: int = 1200) -> list[str]:
    """The latest values, as many as fit in ``max_chars``: what the model is told to avoid."""
    kept, used = [], 0
    for value in reversed(values):
        used += len(value) + 2
        if used > max_chars:
            break
        kept.append(value)
    return kept[::-1]


def _smaller_batch(exc: ContextLengthError, want: int, max_chars: int) -> int:
    """A batch whose answer fits the context the error reported; re-raises when none can."""
    if exc.context_tokens and exc.prompt_tokens:
        room = exc.context_tokens - exc.prompt_tokens - 32
        fits = room // (max_chars + 3)
    else:
        fits = want // 2
    if fits < 1 or fits >= want:
        raise exc
    return fits


def variable_plan(
    library: Library, name: str, context_prompt: str, count: int, model: str
) -> Plan[tuple[Variable, bool]]:
    """The variable from the library, or new values generated and saved: (variable, created)."""
    name = check_name(name)
    existing = library.get(name)
    if existing is not None:
        return existing, False
    values = yield from values_plan(name, context_prompt, count)
    context = " ".join(context_prompt.split())
    description = f"Values for __{name}__, generated by {model}" + (
        f" for the prompt: {context}" if context else "."
    )
    try:
        return library.save(name, values, description), True
    except VariableExistsError:  # written by someone else meanwhile: theirs wins
        return library.get(name), False


def expand_plan(
    template: Template,
    library: Library,
    model: str,
    *,
    values_per_variable: int,
    rng: random.Random,
    progress: Progress,
) -> Plan[list[ExpandedPrompt]]:
    variables: dict[str, Variable] = {}
    for name in template.variables:
        if library.find(name) is None:
            progress(f"Generating {values_per_variable} values for __{name}__ with {model}")
        variable, _ = yield from variable_plan(
            library, name, template.prompt, values_per_variable, model
        )
        if not variable.values:
            raise LibraryError(f"__{name}__ has no values in {variable.path}: add one per line.")
        variables[name] = variable
    results = []
    for i in range(template.count):
        substituted, chosen = substitute(template.prompt, lambda n: rng.choice(variables[n].values))
        final = substituted
        if template.enhance:
            progress(f"Enhancing prompt {i + 1}/{template.count} with {model}")
            final = yield from enhance_plan(substituted, template.instruction or "")
        results.append(ExpandedPrompt(final, substituted, chosen))
    return results


def _run(plan: Plan[T], complete: Callable[[ChatRequest], Completion]) -> T:
    """Drive a plan with blocking calls; a failed call is raised inside the plan."""
    try:
        request = next(plan)
        while True:
            try:
                answer = complete(request)
            except ClientError as exc:
                request = plan.throw(exc)
            else:
                request = plan.send(answer)
    except StopIteration as stop:
        return stop.value
    finally:
        plan.close()


async def _arun(plan: Plan[T], complete) -> T:
    """Drive a plan with awaited calls (the twin of ``_run``)."""
    try:
        request = next(plan)
        while True:
            try:
                answer = await complete(request)
            except ClientError as exc:
                request = plan.throw(exc)
            else:
                request = plan.send(answer)
    except StopIteration as stop:
        return stop.value
    finally:
        plan.close()


def _quiet(message: str) -> None:
    pass


# ---- clients ------------------------------------------------------------------------------------


class _Base:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        library_dir: str | None = None,
    ):
        self.settings = settings if settings is not None else load_settings()
        self.model = model or self.settings.model_name
        root = library_dir if library_dir is not None else self.settings.library_dir
        self.library = Library(root)

    def _template(self, template: str | Template) -> Template:
        return template if isinstance(template, Template) else parse_template(template)


class Client(_Base):
    """Blocking client. ``Client()`` reads the settings (environment, ./.env, defaults).

    ``model`` overrides ``LLM_MODEL``; ``http_client`` is passed to the OpenAI SDK (tests give it
    a fake transport).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        library_dir: str | None = None,
        http_client: httpx.Client | None = None,
    ):
        super().__init__(settings, model=model, library_dir=library_dir)
        self._transport = Transport(self.settings, http_client)

    def generate_text(self, prompt: str, max_tokens: int = 1024, temperature: float = 0.7) -> str:
        """The model's answer to ``prompt`` (one user message), without any thinking block."""
        return self._run(text_plan(prompt, max_tokens, temperature))

    def enhance_prompt(self, prompt: str, instruction: str = "") -> str:
        """``prompt`` expanded into a rich image prompt that keeps all its facts."""
        return self._run(enhance_plan(prompt, instruction))

    def generate_prompt_variable_values(
        self, name: str, context_prompt: str = "", count: int = DEFAULT_VALUE_COUNT
    ) -> list[str]:
        """``count`` distinct values for the variable ``name`` (the name is the instruction)."""
        return self._run(values_plan(check_name(name), context_prompt, count))

    def get_or_create_variable(
        self, name: str, *, count: int = DEFAULT_VALUE_COUNT, context_prompt: str = ""
    ) -> tuple[Variable, bool]:
        """The library's variable ``name``, or one generated and saved now: (variable, created)."""
        return self._run(variable_plan(self.library, name, context_prompt, count, self.model))

    def expand(
        self,
        template: str | Template,
        *,
        values_per_variable: int = DEFAULT_VALUE_COUNT,
        rng: random.Random | None = None,
        on_progress: Progress | None = None,
    ) -> list[ExpandedPrompt]:
        """The prompts a template makes: variables substituted, then enhanced when asked."""
        plan = expand_plan(
            self._template(template),
            self.library,
            self.model,
            values_per_variable=values_per_variable,
            rng=rng or random.Random(),
            progress=on_progress or _quiet,
        )
        return self._run(plan)

    def list_models(self) -> list[str]:
        """The model names the gateway serves."""
        return self._transport.list_models()

    def local_state(self) -> LocalState:
        """What the gateway's local models are doing (loaded, memory, requests), how many may be
        loaded at once, and whether the gateway was restarted. Loads nothing."""
        return self._transport.local_state()

    def local_model_state(self, model: str | None = None) -> LocalModelState:
        """One local model's part of ``local_state()``: ``model``'s; without it, this client's
        model's when it is a local one, else the only local model's. A name that is none of the
        local models raises ``ModelNotFoundError`` (``.available`` lists them)."""
        return pick_model(self.local_state(), model, self.model, self.settings.gateway_url)

    def release_gpu(
        self, model: str | None = None, *, timeout: float = DEFAULT_RELEASE_TIMEOUT
    ) -> ReleaseResult:
        """Unload the gateway's local models (``model``: only that one) and return their device
        memory to the system, e.g. before the image model loads.

        The gateway first lets the requests already running or queued finish; this returns once
        the memory is free, or raises ``GatewayTimeoutError`` after ``timeout`` seconds. A
        ``model`` that is none of the local models raises ``ModelNotFoundError`` listing them; a
        gateway without this route (an older one) raises ``RequestError`` with status 404. The
        next request to a released model loads it again.
        """
        return self._transport.release_local(timeout, model)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _run(self, plan: Plan[T]) -> T:
        return _run(plan, lambda request: self._transport.complete(request, self.model))


class AsyncClient(_Base):
    """The async twin of ``Client``: the same methods, awaited."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        model: str | None = None,
        library_dir: str | None = None,
        http_client: httpx.AsyncClient | None = None,
    ):
        super().__init__(settings, model=model, library_dir=library_dir)
        self._transport = AsyncTransport(self.settings, http_client)

    async def generate_text(
        self, prompt: str, max_tokens: int = 1024, temperature: float = 0.7
    ) -> str:
        return await self._run(text_plan(prompt, max_tokens, temperature))

    async def enhance_prompt(self, prompt: str, instruction: str = "") -> str:
        return await self._run(enhance_plan(prompt, instruction))

    async def generate_prompt_variable_values(
        self, name: str, context_prompt: str = "", count: int = DEFAULT_VALUE_COUNT
    ) -> list[str]:
        return await self._run(values_plan(check_name(name), context_prompt, count))

    async def get_or_create_variable(
        self, name: str, *, count: int = DEFAULT_VALUE_COUNT, context_prompt: str = ""
    ) -> tuple[Variable, bool]:
        return await self._run(variable_plan(self.library, name, context_prompt, count, self.model))

    async def expand(
        self,
        template: str | Template,
        *,
        values_per_variable: int = DEFAULT_VALUE_COUNT,
        rng: random.Random | None = None,
        on_progress: Progress | None = None,
    ) -> list[ExpandedPrompt]:
        plan = expand_plan(
            self._template(template),
            self.library,
            self.model,
            values_per_variable=values_per_variable,
            rng=rng or random.Random(),
            progress=on_progress or _quiet,
        )
        return await self._run(plan)

    async def list_models(self) -> list[str]:
        return await self._transport.list_models()

    async def local_state(self) -> LocalState:
        return await self._transport.local_state()

    async def local_model_state(self, model: str | None = None) -> LocalModelState:
        return pick_model(await self.local_state(), model, self.model, self.settings.gateway_url)

    async def release_gpu(
        self, model: str | None = None, *, timeout: float = DEFAULT_RELEASE_TIMEOUT
    ) -> ReleaseResult:
        return await self._transport.release_local(timeout, model)

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def _run(self, plan: Plan[T]) -> T:
        return await _arun(plan, lambda request: self._transport.complete(request, self.model))


# ---- module-level shortcuts ---------------------------------------------------------------------


def generate_text(
    prompt: str, max_tokens: int = 1024, temperature: float = 0.7, *, model: str | None = None
) -> str:
    """``Client(model=model).generate_text(...)`` with the settings from the environment."""
    with Client(model=model) as client:
        return client.generate_text(prompt, max_tokens, temperature)


def enhance_prompt(prompt: str, instruction: str = "", *, model: str | None = None) -> str:
    """``Client(model=model).enhance_prompt(...)`` with the settings from the environment."""
    with Client(model=model) as client:
        return client.enhance_prompt(prompt, instruction)


def generate_prompt_variable_values(
    name: str,
    context_prompt: str = "",
    count: int = DEFAULT_VALUE_COUNT,
    *,
    model: str | None = None,
) -> list[str]:
    """``Client(model=model).generate_prompt_variable_values(...)`` with the environment's
    settings."""
    with Client(model=model) as client:
        return client.generate_prompt_variable_values(name, context_prompt, count)


def release_gpu(
    model: str | None = None, *, timeout: float = DEFAULT_RELEASE_TIMEOUT
) -> ReleaseResult:
    """``Client().release_gpu(model, timeout=timeout)`` with the settings from the environment:
    without ``model``, every local model leaves the GPU (e.g. for the image model)."""
    with Client() as client:
        return client.release_gpu(model, timeout=timeout)
