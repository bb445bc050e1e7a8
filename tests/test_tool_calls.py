"""Tool calls and logprobs on the local model, in-process through the LiteLLM SDK (tiny model).

The guarantee under test: every call the model returns names an offered function and its arguments
validate against that function's schema, however the call began (forced from the first token, or
opened by the model itself under ``auto``), and nothing else is ever returned as a call.
"""

from __future__ import annotations

import json

import jsonschema
import litellm
import pytest

from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
COUNT = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "count", "parameters": COUNT, "strict": True}},
]
SCHEMAS = {"weather": WEATHER, "count": COUNT}
ASK = [{"role": "user", "content": "weather?"}]
# The random model seldom writes <tool_call> by itself (about one request in twenty); the eager
# caller, the same checkpoint with that token's embedding (tied to its output row) scaled up,
# writes some text and then opens a call in most requests: the "auto" path, exercised.
EAGERNESS = 10.0


@pytest.fixture(scope="module")
def eager_caller_dir(tiny_model_dir, tmp_path_factory):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("eager-caller")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    token = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("<tool_call>")
    with torch.no_grad():
        model.get_input_embeddings().weight[token] *= EAGERNESS
    model.save_pretrained(out)
    return out


def _register(name: str, model_dir):
    handler = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(model_dir))))
    litellm.custom_provider_map = [
        *[p for p in litellm.custom_provider_map if p["provider"] != name],
        {"provider": name, "custom_handler": handler},
    ]
    litellm.utils.custom_llm_setup()
    return handler


@pytest.fixture(scope="module")
def local(tiny_model_dir, eager_caller_dir):
    previous = litellm.custom_provider_map
    _register("ztools", tiny_model_dir)
    yield _register("zeager", eager_caller_dir)
    litellm.custom_provider_map = previous


def ask(provider="ztools", **params):
    return litellm.completion(model=f"{provider}/x", messages=ASK, **params).choices[0]


def assert_valid(call) -> None:
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    strict = call.function.name == "count"
    if strict:
        assert set(json.loads(call.function.arguments)) <= {"n"}


def test_auto_calls_opened_by_the_model_are_valid_and_none_never_calls(local):
    kinds = set()
    for seed in range(10):
        choice = ask("zeager", tools=TOOLS, seed=seed, max_tokens=100)
        calls = choice.message.tool_calls or []
        for call in calls:
            assert_valid(call)
        if calls:
            kinds.add("text, then a call" if choice.message.content else "a call")
            assert choice.finish_reason in ("tool_calls", "length")
            assert "<tool_call>" not in (choice.message.content or "")
        forbidden = ask("zeager", tools=TOOLS, tool_choice="none", seed=seed, max_tokens=100)
        assert not forbidden.message.tool_calls and forbidden.finish_reason == "length"
        assert "<tool_call>" not in forbidden.message.content
    assert kinds == {"text, then a call", "a call"}, kinds


def test_a_required_call_streams_in_openais_shape(local):
    for seed in range(10):
        chunks = list(
            litellm.completion(
                model="ztools/x",
                messages=ASK,
                tools=TOOLS,
                tool_choice="required",
                seed=seed,
                max_tokens=200,
                stream=True,
            )
        )
        pieces = [p for c in chunks for p in c.choices[0].delta.tool_calls or []]
        assert pieces and pieces[0].id and pieces[0].function.name in SCHEMAS
        firsts = [p for p in pieces if p.id]
        assert [p.index for p in firsts] == list(range(len(firsts)))  # one index per call
        assert len({c.id for c in chunks}) == 1
        finish = chunks[-1].choices[0].finish_reason
        if finish == "tool_calls":
            for first in firsts:
                arguments = "".join(p.function.arguments for p in pieces if p.index == first.index)
                call = litellm.ChatCompletionMessageToolCall(
                    id=first.id, function={"name": first.function.name, "arguments": arguments}
                )
                assert_valid(call)


def test_a_json_answer_or_a_call_under_auto(local):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    kinds = set()
    for provider, seed in [(p, s) for p in ("ztools", "zeager") for s in range(5)]:
        choice = ask(provider, tools=TOOLS, response_format=response_format, seed=seed)
        if choice.message.tool_calls:
            kinds.add("call")
            for call in choice.message.tool_calls:
                assert_valid(call)
        elif choice.finish_reason == "stop":
            kinds.add("answer")
            jsonschema.validate(json.loads(choice.message.content), schema)
    assert kinds == {"call", "answer"}, kinds


def test_a_cut_call_is_left_out_and_says_length(local):
    choice = ask(tools=TOOLS, tool_choice="required", seed=0, max_tokens=12)
    assert choice.finish_reason == "length"
    assert not choice.message.tool_calls  # 12 tokens cannot hold a whole call


def test_logprobs_follow_the_text_token_by_token(local):
    choice = ask(logprobs=True, top_logprobs=4, seed=3, max_tokens=24)
    entries = choice.logprobs["content"] if isinstance(choice.logprobs, dict) else None
    entries = entries or choice.logprobs.content
    assert len(entries) == 24 and choice.finish_reason == "length"
    written = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
    assert written == choice.message.content
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert entry.logprob <= tops[0] + 1e-6  # the best alternative is at least as likely


def test_a_checkpoint_without_call_tokens_refuses_tools(tiny_model_dir, tmp_path):
    import shutil

    from custom_handlers.inference.errors import InvalidRequestError

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    config = json.loads((plain / "tokenizer.json").read_text())
    config["added_tokens"] = [t for t in config["added_tokens"] if "tool_call" not in t["content"]]
    (plain / "tokenizer.json").write_text(json.dumps(config))
    handler = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(plain))))
    with pytest.raises(InvalidRequestError, match="no <tool_call> token"):
        handler.completion("x", ASK, optional_params={"tools": TOOLS, "max_tokens": 4})


def test_thinking_is_refused_by_a_checkpoint_without_a_thinking_mode(tiny_model_dir, tmp_path):
    import shutil

    from custom_handlers.inference.errors import InvalidRequestError

    direct = tmp_path / "instruct-2507-like"
    shutil.copytree(tiny_model_dir, direct)
    template = direct / "chat_template.jinja"
    template.write_text(template.read_text().replace("enable_thinking", "no_such_switch"))
    handler = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(direct))))
    params = {"reasoning_effort": "high", "max_tokens": 4}
    with pytest.raises(InvalidRequestError, match="has no thinking mode"):
        handler.completion("x", ASK, optional_params=params)
    params["reasoning_effort"] = "none"  # no thinking asked: fine on any checkpoint
    assert handler.completion("x", ASK, optional_params=params).choices[0].finish_reason
