"""Real OpenAI-compatible clients against the real gateway: the client compatibility matrix.

Each test runs on the local model (the tiny random-weight Qwen3 as ``qwen3-4b``) and on the cloud
alias (``gpt-4o-mini``, routed to the fake upstream). Random weights write nonsense, so what is
asserted is the guarantee, never the text: every tool call names an offered function and its
arguments validate against that function's schema, over 10 seeds; structured output parses into
the caller's model. ``--compat-matrix docs/compatibility.md`` writes the matrix from the run.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

MODELS = {"local": "qwen3-4b", "cloud": "gpt-4o-mini"}
SEEDS = range(10)
MAX_TOKENS = 160  # a whole call of these bounded schemas takes 30-80 tokens of the tiny model
AUTO_MAX_TOKENS = 48  # under "auto" it mostly writes text: no need to read much of it
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


class Weather(BaseModel):
    """The weather asked for one city."""

    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=7)


class Clock(BaseModel):
    """The time in one time zone."""

    zone: str = Field(max_length=24)


def function_tool(model: type[BaseModel], *, strict: bool = False) -> dict:
    spec = {"name": model.__name__, "parameters": model.model_json_schema()}
    if model.__doc__:
        spec["description"] = model.__doc__
    if strict:
        spec["strict"] = True
    return {"type": "function", "function": spec}


TOOLS = [function_tool(Weather), function_tool(Clock)]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def assert_valid_call(name: str, arguments: str | dict) -> None:
    """The guarantee: an offered function, and arguments that follow its schema."""
    assert name in SCHEMAS, name
    values = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(values, SCHEMAS[name])


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def target(request) -> str:
    return request.param


@pytest.fixture
def model(target) -> str:
    return MODELS[target]


@pytest.fixture(scope="module")
def openai_client(gateway) -> OpenAI:
    return OpenAI(
        base_url=f"{gateway.base_url}/v1", api_key=gateway.key, max_retries=0, timeout=120
    )


# ---- the openai SDK ---------------------------------------------------------------------------


@pytest.mark.compat("openai", "chat, streamed with usage")
def test_openai_chat_streams_with_usage(openai_client, model):
    stream = openai_client.chat.completions.create(
        model=model,
        messages=ASK,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.compat("openai", "tools, tool_choice auto")
def test_openai_tools_auto(openai_client, model):
    for seed in SEEDS:
        choice = openai_client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, seed=seed, max_tokens=AUTO_MAX_TOKENS
        ).choices[0]
        calls = choice.message.tool_calls or []
        for call in calls:
            assert_valid_call(call.function.name, call.function.arguments)
        expected = ("tool_calls", "length") if calls else ("stop", "length")
        assert choice.finish_reason in expected


@pytest.mark.compat("openai", "tools, tool_choice required")
def test_openai_tools_required(openai_client, model):
    for seed in SEEDS:
        choice = openai_client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            seed=seed,
            max_tokens=MAX_TOKENS,
        ).choices[0]
        assert choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            assert call.id and call.type == "function"
            assert_valid_call(call.function.name, call.function.arguments)
        assert choice.finish_reason in ("tool_calls", "length")


@pytest.mark.compat("openai", "tools, named tool_choice, parallel_tool_calls false")
def test_openai_tools_named(openai_client, model):
    named = {"type": "function", "function": {"name": "Clock"}}
    for seed in SEEDS:
        choice = openai_client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice=named,
            parallel_tool_calls=False,
            seed=seed,
            max_tokens=MAX_TOKENS,
        ).choices[0]
        [call] = choice.message.tool_calls
        assert call.function.name == "Clock"
        assert_valid_call(call.function.name, call.function.arguments)
        assert choice.finish_reason == "tool_calls"


def streamed_calls(stream) -> tuple[list[dict], str]:
    """Tool calls put together from a stream's deltas as OpenAI sends them (id, type and name on
    a call's first piece only, then argument pieces under the same index), and the finish."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id and piece.type == "function" and piece.function.name
                    calls[piece.index] = {"name": piece.function.name, "arguments": ""}
                else:
                    assert piece.id is None and not piece.function.name
                calls[piece.index]["arguments"] += piece.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.compat("openai", "tools streamed (auto, required, named)")
def test_openai_tools_streamed(openai_client, model):
    named = {"type": "function", "function": {"name": "Weather"}}
    for tool_choice in ("auto", "required", named):
        for seed in SEEDS:
            stream = openai_client.chat.completions.create(
                model=model,
                messages=ASK,
                tools=TOOLS,
                tool_choice=tool_choice,
                seed=seed,
                max_tokens=AUTO_MAX_TOKENS if tool_choice == "auto" else MAX_TOKENS,
                stream=True,
            )
            calls, finish = streamed_calls(stream)
            if tool_choice != "auto":
                assert calls and finish in ("tool_calls", "length")
            complete = calls if finish == "tool_calls" else calls[:-1]  # the last may be cut
            for call in complete:
                assert_valid_call(call["name"], call["arguments"])


@pytest.mark.compat("openai", "chat.completions.stream helper, one call")
def test_openai_stream_helper(openai_client, model):
    for seed in SEEDS:
        with openai_client.chat.completions.stream(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            seed=seed,
            max_tokens=MAX_TOKENS,
        ) as stream:
            done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
            final = stream.get_final_completion().choices[0]
        [call] = final.message.tool_calls
        assert_valid_call(call.function.name, call.function.arguments)
        assert [e.arguments for e in done] == [call.function.arguments]


@pytest.mark.compat("openai", "tool result round trip")
def test_openai_tool_result_round_trip(openai_client, model):
    first = openai_client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", seed=1, max_tokens=120
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    answer = openai_client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, seed=1, max_tokens=16
    ).choices[0]
    for later in answer.message.tool_calls or []:
        assert_valid_call(later.function.name, later.function.arguments)
    assert answer.message.content or answer.message.tool_calls


@pytest.mark.compat("openai", "chat.completions.parse, pydantic response_format")
def test_openai_parse_response_format(openai_client, model):
    for seed in SEEDS:
        message = (
            openai_client.chat.completions.parse(
                model=model, messages=ASK, response_format=Weather, seed=seed, max_tokens=120
            )
            .choices[0]
            .message
        )
        assert isinstance(message.parsed, Weather)


@pytest.mark.compat("openai", "chat.completions.parse, strict pydantic_function_tool")
def test_openai_parse_strict_tool(openai_client, model):
    from openai import pydantic_function_tool

    for seed in SEEDS:
        message = (
            openai_client.chat.completions.parse(
                model=model,
                messages=ASK,
                tools=[pydantic_function_tool(Weather)],
                tool_choice="required",
                parallel_tool_calls=False,  # random weights may chain calls past max_tokens
                seed=seed,
                max_tokens=MAX_TOKENS,
            )
            .choices[0]
            .message
        )
        assert message.tool_calls
        assert all(isinstance(c.function.parsed_arguments, Weather) for c in message.tool_calls)


@pytest.mark.compat("openai", "logprobs, top_logprobs (plain and streamed)")
def test_openai_logprobs(openai_client, model):
    kwargs = dict(model=model, messages=ASK, logprobs=True, top_logprobs=3, max_tokens=8, seed=4)
    choice = openai_client.chat.completions.create(**kwargs).choices[0]
    entries = choice.logprobs.content
    assert entries
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes is not None
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
    streamed = [
        e
        for chunk in openai_client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]


@pytest.mark.compat("openai", "Responses API, plain and streamed")
def test_openai_responses(openai_client, model):
    response = openai_client.responses.create(model=model, input="a fox", max_output_tokens=16)
    assert response.status in ("completed", "incomplete") and response.output_text
    events = list(
        openai_client.responses.create(
            model=model, input="a fox", max_output_tokens=16, stream=True
        )
    )
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")


@pytest.mark.compat("openai", "Responses API with function tools")
def test_openai_responses_tools(openai_client, model):
    tools = [
        {"type": "function", **t["function"], "strict": False} for t in TOOLS
    ]  # the Responses API's flat tool shape
    for seed in range(3):
        for stream in (False, True):
            kwargs = dict(model=model, input="weather in Paris?", tools=tools)
            kwargs |= dict(tool_choice="required", max_output_tokens=MAX_TOKENS)
            if stream:
                events = list(
                    openai_client.responses.create(stream=True, **kwargs, extra_body={"seed": seed})
                )
                response = events[-1].response
            else:
                response = openai_client.responses.create(**kwargs, extra_body={"seed": seed})
            calls = [item for item in response.output if item.type == "function_call"]
            assert calls
            for call in calls:
                assert_valid_call(call.name, call.arguments)


@pytest.mark.compat("openai", "completions (legacy)")
def test_openai_completions(openai_client, model):
    completion = openai_client.completions.create(model=model, prompt="a fox", max_tokens=8)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens > 0


@pytest.mark.compat("openai", "completions with logprobs")
def test_openai_completions_logprobs(openai_client, model, target):
    completion = openai_client.completions.create(
        model=model, prompt="a fox", max_tokens=8, logprobs=2
    )
    assert completion.choices[0].text is not None
    if target != "cloud":  # the fake upstream has chat only: LiteLLM drops logprobs on the way
        logprobs = completion.choices[0].logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset)


# ---- langchain-openai -------------------------------------------------------------------------


def langchain_model(gateway, model: str, seed: int, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=model,
        base_url=f"{gateway.base_url}/v1",
        api_key=gateway.key,
        max_tokens=MAX_TOKENS,
        seed=seed,
        max_retries=0,
        timeout=120,
        **kwargs,
    )


@pytest.mark.compat("langchain-openai", "bind_tools, invoke and stream")
def test_langchain_bind_tools(gateway, model):
    for seed in SEEDS:
        llm = langchain_model(gateway, model, seed).bind_tools(
            [Weather, Clock], tool_choice="required"
        )
        message = llm.invoke("What is the weather in Paris?")
        assert message.tool_calls
        for call in message.tool_calls:
            assert_valid_call(call["name"], call["args"])
        merged = None
        for chunk in llm.stream("What is the weather in Paris?"):
            merged = chunk if merged is None else merged + chunk
        calls = merged.tool_calls
        if merged.response_metadata.get("finish_reason") == "length":
            calls = calls[:-1]  # streamed before max_tokens cut it: incomplete, as with OpenAI
        assert merged.tool_calls
        for call in calls:
            assert_valid_call(call["name"], call["args"])


@pytest.mark.compat("langchain-openai", "with_structured_output, function_calling")
def test_langchain_structured_function_calling(gateway, model):
    for seed in SEEDS:
        llm = langchain_model(gateway, model, seed)
        runnable = llm.with_structured_output(Weather, method="function_calling")
        assert isinstance(runnable.invoke("Weather in Paris?"), Weather)


@pytest.mark.compat("langchain-openai", "with_structured_output, json_schema (default)")
def test_langchain_structured_json_schema(gateway, model):
    for seed in SEEDS:
        llm = langchain_model(gateway, model, seed)
        runnable = llm.with_structured_output(Weather, method="json_schema")
        assert isinstance(runnable.invoke("Weather in Paris?"), Weather)


# ---- instructor -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
@pytest.mark.compat("instructor", "response_model, Mode.TOOLS (default) and Mode.JSON_SCHEMA")
def test_instructor(gateway, openai_client, model, mode):
    import instructor

    client = instructor.from_openai(openai_client, mode=getattr(instructor.Mode, mode))
    for seed in SEEDS:
        weather = client.chat.completions.create(
            model=model,
            messages=ASK,
            response_model=Weather,
            max_retries=0,
            seed=seed,
            max_tokens=MAX_TOKENS,
        )
        assert isinstance(weather, Weather)


# ---- pydantic-ai ------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [False, True], ids=["tool output", "NativeOutput"])
@pytest.mark.compat("pydantic-ai", "Agent output_type: tool output (default) and NativeOutput")
def test_pydantic_ai(gateway, model, native):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=f"{gateway.base_url}/v1", api_key=gateway.key)
    agent = Agent(
        OpenAIChatModel(model, provider=provider),
        output_type=NativeOutput(Weather) if native else Weather,
        retries=0,
    )
    for seed in SEEDS:
        settings = {"max_tokens": MAX_TOKENS, "seed": seed}
        result = agent.run_sync("What is the weather in Paris?", model_settings=settings)
        assert isinstance(result.output, Weather)
