"""Real OpenAI-compatible clients against the real gateway: the client compatibility matrix.

Each test runs on the local model (the tiny random-weight Qwen3 as ``qwen3-4b``) and on the cloud
alias (``gpt-4o-mini``, routed to the fake upstream). Random weights write nonsense, so what is
asserted is the guarantee, never the text: every tool call names an offered function and its
arguments validate against that function's schema, over 10 seeds (the openai SDK's tests; the
other clients' tests check that each client reads the same answers); structured output parses into
the caller's model. Agent frameworks get each step's tool forced and bounded schemas, and their
protocol is asserted. A run of every test here rewrites docs/compatibility.md's matrix (see
``tests/compat_matrix.py``). The JavaScript clients run in one ``node`` process
(``tests/js/clients.mjs``), skipped if node or ``tests/js/node_modules`` is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Literal

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


@pytest.mark.compat("openai", "sampling: presence_penalty, frequency_penalty, logit_bias")
def test_openai_sampling_controls(openai_client, model):
    choice = openai_client.chat.completions.create(
        model=model,
        messages=ASK,
        max_tokens=4,
        presence_penalty=1.5,
        frequency_penalty=0.5,
        logit_bias={"11": -100},
    ).choices[0]
    assert choice.finish_reason in ("stop", "length")


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


# ---- the OpenAI Agents SDK --------------------------------------------------------------------
#
# With random weights an agent cannot decide when it is done: the tool turn forces the call
# (tool_choice "required") and stops on it (tool_use_behavior "stop_on_first_tool"); the next run
# sends the whole exchange back (``to_input_list()``: the call and its output included) and asks
# for a structured answer, which ends within max_tokens because the schema is bounded.


def agents_model(gateway, model: str, responses: bool):
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK would export traces to OpenAI otherwise
    client = AsyncOpenAI(
        base_url=f"{gateway.base_url}/v1", api_key=gateway.key, max_retries=0, timeout=120
    )
    kind = OpenAIResponsesModel if responses else OpenAIChatCompletionsModel
    return kind(model=model, openai_client=client)


def agents_tool_then_output(gateway, model: str, responses: bool) -> None:
    from agents import Agent, ModelSettings, Runner, function_tool

    calls: list[tuple[str, int]] = []

    @function_tool
    def get_weather(
        city: Annotated[str, Field(max_length=24)], days: Annotated[int, Field(ge=1, le=7)]
    ) -> str:
        """The weather in one city."""
        calls.append((city, days))
        return "sunny"

    settings = dict(max_tokens=MAX_TOKENS, extra_body={"seed": 1})
    llm = agents_model(gateway, model, responses)
    agent = Agent(
        name="weather",
        model=llm,
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, **settings),
    )
    first = Runner.run_sync(agent, "What is the weather in Paris this week?", max_turns=1)
    assert first.final_output == "sunny"  # the SDK parsed the call and ran the tool
    [(city, days)] = calls
    assert len(city) <= 24 and 1 <= days <= 7
    kinds = [item.type for item in first.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item"], kinds
    answer = Agent(
        name="answer", model=llm, output_type=Weather, model_settings=ModelSettings(**settings)
    )
    history = [*first.to_input_list(), {"role": "user", "content": "So, the forecast?"}]
    second = Runner.run_sync(answer, history, max_turns=1)
    assert isinstance(second.final_output, Weather)
    assert second.raw_responses[-1].usage.input_tokens > 0


@pytest.mark.compat(
    "openai-agents", "OpenAIChatCompletionsModel: function tool, then output_type from the history"
)
def test_agents_chat_model(gateway, model):
    agents_tool_then_output(gateway, model, responses=False)


@pytest.mark.compat(
    "openai-agents", "OpenAIResponsesModel: function tool, then output_type from the history"
)
def test_agents_responses_model(gateway, model):
    agents_tool_then_output(gateway, model, responses=True)


@pytest.mark.compat(
    "openai-agents", "OpenAIResponsesModel: conversation chained by previous_response_id"
)
def test_agents_previous_response_id(gateway, openai_client, model):
    from agents import Agent, ModelSettings, Runner

    agent = Agent(
        name="chat",
        model=agents_model(gateway, model, responses=True),
        output_type=Weather,  # bounded: the answer ends within max_tokens on random weights
        model_settings=ModelSettings(max_tokens=MAX_TOKENS, extra_body={"seed": 2}),
    )
    first = Runner.run_sync(agent, "Remember: Paris, seven days, in celsius.", max_turns=1)
    follow_up = "And the forecast?"
    chained = Runner.run_sync(
        agent, follow_up, previous_response_id=first.last_response_id, max_turns=1
    )
    alone = Runner.run_sync(agent, follow_up, max_turns=1)
    assert isinstance(chained.final_output, Weather)
    # The earlier turn is part of the request: more input than the new message alone.
    read = chained.raw_responses[-1].usage.input_tokens
    assert read > alone.raw_responses[-1].usage.input_tokens, read
    kept = openai_client.responses.retrieve(first.last_response_id)
    assert kept.id == first.last_response_id and kept.status == "completed"
    assert Weather.model_validate_json(kept.output_text)


# ---- dspy -------------------------------------------------------------------------------------
#
# dspy knows what a model supports from its own catalogue: for `openai/qwen3-4b` it knows
# nothing, so its JSONAdapter would send no schema and rely on the model writing JSON from the
# prompt. Declaring the gateway as a provider whose models support response schemas (what dspy
# 3.4 offers for OpenAI-compatible servers) makes it send `response_format: json_schema`.


@pytest.fixture(scope="module")
def dspy_provider(gateway, tmp_path_factory):
    import os

    os.environ.setdefault("DSPY_CACHEDIR", str(tmp_path_factory.mktemp("dspy-cache")))
    import dspy
    from dspy.lm15 import (
        AccessPolicy,
        ModelSupport,
        OpenAIChatCompat,
        ProviderDefinition,
        register_provider,
    )

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    access = AccessPolicy(
        provider="zgateway", env_keys=("LITELLM_PROXY_API_KEY",), base_url=gateway.base_url
    )
    definition = ProviderDefinition.chat(access, compat=OpenAIChatCompat.preset("openai"))
    supports = ModelSupport(response_schema=True, function_calling=True)
    register_provider(definition, supports=supports, replace=True)
    return "zgateway"


@pytest.mark.compat("dspy", "Predict with JSONAdapter (structured outputs)")
def test_dspy_predict_json_adapter(gateway, dspy_provider, model):
    import dspy

    class Forecast(dspy.Signature):
        """Forecast the weather in a city."""

        city: str = dspy.InputField()
        unit: Literal["celsius", "fahrenheit"] = dspy.OutputField()
        days: int = dspy.OutputField()
        sunny: bool = dspy.OutputField()

    lm = dspy.LM(
        f"{dspy_provider}/{model}",
        api_base=f"{gateway.base_url}/v1",
        api_key=gateway.key,
        max_tokens=64,
        cache=False,
        num_retries=0,
        seed=1,
    )
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        prediction = dspy.Predict(Forecast)(city="Paris")
    assert prediction.unit in ("celsius", "fahrenheit")
    assert isinstance(prediction.days, int) and isinstance(prediction.sunny, bool)
    assert lm.history[-1]["kwargs"]["response_format"]  # a schema was asked for, and honoured


# ---- smolagents -------------------------------------------------------------------------------
#
# A ToolCallingAgent in two steps: a call of the user's tool, then `final_answer`. Random weights
# cannot choose, so each step names its tool (tool_choice, changed by a step callback); the
# agent's own prompt (~3,000 tokens) is longer than the tiny model's context, so a short one
# stands in. Strings are bounded so that a call ends within max_tokens.


@pytest.mark.compat("smolagents", "ToolCallingAgent: a tool step, then final_answer")
def test_smolagents_tool_calling_agent(gateway, model):
    from smolagents import FinalAnswerTool, OpenAIModel, Tool, ToolCallingAgent

    class GetWeather(Tool):
        name = "get_weather"
        description = "The weather in one city."
        inputs = {  # noqa: RUF012 (smolagents' declaration)
            "city": {"type": "string", "description": "the city", "maxLength": 24},
            "days": {"type": "integer", "description": "days", "minimum": 1, "maximum": 7},
        }
        output_type = "string"

        def forward(self, city: str, days: int) -> str:
            return "sunny"

    class Answer(FinalAnswerTool):
        inputs = {"answer": {"type": "string", "description": "the answer", "maxLength": 32}}  # noqa: RUF012

    def forced(name: str) -> dict:
        return {"type": "function", "function": {"name": name}}

    llm = OpenAIModel(
        model_id=model,
        api_base=f"{gateway.base_url}/v1",
        api_key=gateway.key,
        client_kwargs={"max_retries": 0, "timeout": 120},
        max_tokens=MAX_TOKENS,
        seed=1,
        parallel_tool_calls=False,
        tool_choice=forced("get_weather"),
    )

    def then_answer(step, agent) -> None:
        llm.kwargs["tool_choice"] = forced("final_answer")

    agent = ToolCallingAgent(
        tools=[GetWeather(), Answer()],
        model=llm,
        max_steps=2,
        step_callbacks=[then_answer],
        verbosity_level=0,
    )
    agent.prompt_templates["system_prompt"] = "Call tools; end with final_answer."
    answer = agent.run("What is the weather in Paris this week?")
    steps = [s for s in agent.memory.steps if type(s).__name__ == "ActionStep"]
    assert [[c.name for c in s.tool_calls] for s in steps] == [["get_weather"], ["final_answer"]]
    assert all(s.error is None for s in steps), [s.error for s in steps]
    city = steps[0].tool_calls[0].arguments["city"]
    assert isinstance(city, str) and len(city) <= 24
    assert answer == steps[1].tool_calls[0].arguments["answer"]


# ---- llm (simonw) -----------------------------------------------------------------------------


@pytest.fixture
def llm_user_path(gateway, tmp_path, monkeypatch):
    """An `llm` configuration with the gateway's models, as its docs describe."""
    entries = [
        {
            "model_id": name,
            "model_name": name,
            "api_base": f"{gateway.base_url}/v1",
            "api_key_name": "gateway",
            "supports_schema": True,
            "supports_tools": True,
        }
        for name in MODELS.values()
    ]
    (tmp_path / "extra-openai-models.yaml").write_text(json.dumps(entries))  # JSON is YAML
    (tmp_path / "keys.json").write_text(json.dumps({"gateway": gateway.key}))
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    return tmp_path


@pytest.mark.compat("llm", "prompt (Python API), plain and streamed, with usage")
def test_llm_prompt(llm_user_path, model):
    import llm

    chosen = llm.get_model(model)
    plain = chosen.prompt("a fox", stream=False, max_tokens=8)
    assert isinstance(plain.text(), str) and plain.usage().output > 0
    streamed = chosen.prompt("a fox", max_tokens=8)
    pieces = list(streamed)
    assert "".join(pieces) == streamed.text()
    assert streamed.usage().input > 0 and streamed.usage().output > 0


@pytest.mark.compat("llm", "llm --schema (the CLI)")
def test_llm_cli_schema(llm_user_path, model):
    from click.testing import CliRunner
    from llm.cli import cli

    schema = Weather.model_json_schema()
    args = ["-m", model, "--schema", json.dumps(schema), "-o", "max_tokens", str(MAX_TOKENS)]
    result = CliRunner().invoke(cli, [*args, "-o", "seed", "1", "--no-log", "Paris?"])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.output), schema)


# ---- the litellm SDK as a client --------------------------------------------------------------


def litellm_call(gateway, model: str, **kwargs):
    import litellm

    litellm.suppress_debug_info = True
    return litellm.completion(
        model=f"openai/{model}",
        api_base=f"{gateway.base_url}/v1",
        api_key=gateway.key,
        num_retries=0,
        timeout=120,
        **kwargs,
    )


@pytest.mark.compat("litellm", "completion, plain and streamed with usage")
def test_litellm_completion(gateway, model):
    plain = litellm_call(gateway, model, messages=ASK, max_tokens=8)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens
    chunks = list(
        litellm_call(
            gateway,
            model,
            messages=ASK,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens > 0


@pytest.mark.compat("litellm", "completion with tools (required), plain and streamed")
def test_litellm_tools(gateway, model):
    import litellm

    kwargs = dict(messages=ASK, tools=TOOLS, tool_choice="required", seed=1, max_tokens=MAX_TOKENS)
    plain = litellm_call(gateway, model, **kwargs).choices[0]
    assert plain.finish_reason == "tool_calls" and plain.message.tool_calls
    for call in plain.message.tool_calls:
        assert_valid_call(call.function.name, call.function.arguments)
    chunks = list(litellm_call(gateway, model, stream=True, **kwargs))
    built = litellm.stream_chunk_builder(chunks).choices[0]
    assert built.finish_reason == "tool_calls" and built.message.tool_calls
    for call in built.message.tool_calls:
        assert_valid_call(call.function.name, call.function.arguments)


# ---- JavaScript: the openai npm package and the Vercel AI SDK ---------------------------------
#
# tests/js/clients.mjs runs every case on both targets in one `node` process (installed by
# `.ci/run`: `npm ci` in tests/js); each test below asserts on its part of the output.

JS_DIR = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def js_results(gateway) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (.ci/run installs it: apt-get install nodejs npm)")
    if not (JS_DIR / "node_modules").is_dir():
        pytest.skip("tests/js/node_modules is missing: run `npm ci` in tests/js (.ci/run does)")
    env = {
        **os.environ,
        "GATEWAY_URL": gateway.base_url,
        "GATEWAY_KEY": gateway.key,
        "MODELS": json.dumps(MODELS),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    done = subprocess.run(
        [node, "clients.mjs"], cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def js_case(js_results: dict, target: str, name: str) -> dict:
    result = js_results["results"][target][name]
    assert result.pop("ok"), result["error"]
    return result


@pytest.mark.compat("openai (npm)", "chat, plain and streamed with usage")
def test_js_openai_chat(js_results, target):
    plain = js_case(js_results, target, "openai chat")
    assert plain["finish_reason"] in ("stop", "length") and plain["usage"]["completion_tokens"] > 0
    streamed = js_case(js_results, target, "openai chat streamed")
    assert streamed["chunks"] > 1 and streamed["usage"]["completion_tokens"] > 0


@pytest.mark.compat("openai (npm)", "chat.completions.stream helper, one tool call")
def test_js_openai_stream_helper(js_results, target):
    result = js_case(js_results, target, "openai stream helper, tool call")
    [call] = result["calls"]
    assert result["finish_reason"] == "tool_calls"
    assert call["name"] == "Weather"
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["Weather"])
    assert result["done_events"] == [call["arguments"]]


@pytest.mark.compat("ai (Vercel AI SDK)", "generateText with a zod tool (toolChoice required)")
def test_js_ai_generate_text_tool(js_results, target):
    result = js_case(js_results, target, "ai generateText with a tool")
    assert result["finish_reason"] == "tool-calls" and result["calls"]
    assert [c["input"] for c in result["calls"]] == result["executed"]  # zod validated, then ran
    for call in result["calls"]:
        assert call["name"] == "Weather"
        Weather.model_validate(call["input"])
    assert result["results"] == [{"forecast": "sunny"}] * len(result["calls"])


@pytest.mark.compat("ai (Vercel AI SDK)", "generateObject and Output.object with a zod schema")
def test_js_ai_generate_object(js_results, target):
    for name in ("ai generateObject with a zod schema", "ai generateText with Output.object"):
        result = js_case(js_results, target, name)
        Weather.model_validate(result["object"])
        assert result["finish_reason"] == "stop"
