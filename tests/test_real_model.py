"""The engine on a real instruct model: SmolLM2-135M-Instruct (Llama architecture, not Qwen3).

The tiny random Qwen3 never ends a turn and never writes a word; this model does both, so here the
guarantees that depend on real text are checked: greedy answers equal transformers' own
``generate`` (alone, in a batch, streamed, through every path of the engine), a stop string the
model really writes, a natural end of turn, and JSON whose strings are text. The answers are
compared with transformers or with each other, never judged for quality.

One model load serves the whole module (``shared``); each handler has its own engine and settings.
Torch runs on one thread here: on a 2-core machine shared with other processes, two threads made
every decoding step ~3x slower (OpenMP threads waiting for each other).
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.loader import ModelHolder, load_model
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings
from tests.pace import arriving_together
from tests.test_provider import transformers_greedy

MAX_TOKENS = 24
SYSTEM = (
    "You are a concise assistant. Answer in one short sentence, in plain English, without lists, "
    "without markdown and without repeating the question."
)
# Short natural answers (the model ends its turn) and one that runs to max_tokens.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {
            "role": "user",
            "content": "Write the French word for coffee, with its accent, and a coffee emoji.",
        }
    ],
    [{"role": "user", "content": "Describe a dragon in one sentence."}],
    [{"role": "user", "content": "Say hello in French, Spanish and German."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a large ocean."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What colour is grass?"}],
]
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared(real_model_dir, one_thread):
    """The model, loaded once for every handler of the module."""
    return load_model(LocalModelSettings(model=str(real_model_dir)))


@pytest.fixture(scope="module")
def make(real_model_dir, shared):
    def make(graph_mode: str | None = None, **settings) -> LocalLLM:
        settings.setdefault("prefix_cache_mb", 0)
        holder = ModelHolder(lambda: LocalModelSettings(model=str(real_model_dir), **settings))
        holder._load = lambda _settings: shared  # the module's one load
        local = LocalLLM(holder)
        local.engine.graph_mode = graph_mode
        return local

    return make


def outcome(response) -> tuple[str, str, int]:
    choice = response.choices[0]
    return choice.message.content, choice.finish_reason, response.usage.completion_tokens


def together(local: LocalLLM, chats, params=GREEDY) -> list[tuple[str, str, int]]:
    async def run():
        return await asyncio.gather(
            *(local.acompletion("x", chat, optional_params=dict(params)) for chat in chats)
        )

    return [outcome(r) for r in asyncio.run(run())]


@pytest.fixture(scope="module")
def alone(make) -> list[tuple[str, str, int]]:
    """Each chat's greedy answer, one request at a time, eager decoding, no prefix reuse."""
    local = make()
    return [outcome(local.completion("x", chat, optional_params=dict(GREEDY))) for chat in CHATS]


def test_greedy_answers_are_exactly_what_transformers_generates(shared, alone):
    for chat, (content, _, _) in zip(CHATS, alone, strict=True):
        assert content == transformers_greedy(shared, chat, MAX_TOKENS)


def test_the_model_ends_its_turn_on_its_own(alone):
    ended = [(content, tokens) for content, reason, tokens in alone if reason == "stop"]
    assert len(ended) >= 3 and any(tokens < MAX_TOKENS for _, tokens in ended)
    for content, tokens in ended:  # its end of turn counts as a token, as in OpenAI's usage
        assert 0 < tokens <= MAX_TOKENS
        assert content.strip() and "<|im_end|>" not in content and "<|im_start|>" not in content
    cut = [tokens for _, reason, tokens in alone if reason == "length"]
    assert cut and set(cut) == {MAX_TOKENS}  # the others ran out of max_tokens


def arriving(local: LocalLLM, chats) -> list[tuple[str, str, int]]:
    """``together``, the requests arriving together on any machine (tests/pace.py)."""
    return arriving_together(local, len(chats), lambda: together(local, chats))


def test_a_batch_answers_as_each_request_alone_and_shares_its_prefills(make, alone):
    local = make()
    assert arriving(local, CHATS) == alone
    assert local.engine.peak_rows >= 3 and local.engine.peak_prefill >= 2


def test_the_graph_path_answers_as_eager_decoding_on_a_llama(make, alone):
    # 512 MiB: 11,650 tokens of 45 KiB, reserved at load as 16 slots x 512 columns: 10 graphs.
    local = make("static", prefix_cache_mb=64, kv_cache_mb=512)
    assert arriving(local, CHATS) == alone
    state = local.state()["models"][0]["cuda_graphs"]
    assert state["enabled"] is True and state["off_reason"] is None, state
    assert state["graphs"] == 10 and state["eager_steps"] == 0, state


def test_a_request_waits_for_room_in_the_kv_pool_then_answers_as_alone(make, alone, shared):
    local = make(kv_cache_mb=12)  # 30 layers x 3 KV heads x 64: 45 KiB a token, one row of 256
    budget = local.engine.kv_budget(shared)
    assert budget.bytes_for(1, 256) <= budget.budget_bytes < budget.bytes_for(2, 256)
    assert arriving(local, CHATS[:3]) == alone[:3]  # queued while the first one runs
    assert local.engine.peak_rows == 1


def test_prefix_reuse_does_not_change_a_greedy_answer(make, alone):
    local = make(prefix_cache_mb=64)
    with_system = [i for i, chat in enumerate(CHATS) if chat[0]["role"] == "system"]
    for i in with_system:
        assert outcome(local.completion("x", CHATS[i], optional_params=dict(GREEDY))) == alone[i]
    assert local.engine.prefix.hits == len(with_system) - 1


def stream(local: LocalLLM, chat, params) -> tuple[list[str], str]:
    """The pieces of text of a streamed answer, and its finish reason."""

    async def run():
        return [chunk async for chunk in local.astreaming("x", chat, optional_params=params)]

    pieces, reason = [], None
    for chunk in asyncio.run(run()):
        if isinstance(chunk, dict):  # the end: a GenericStreamingChunk
            reason = chunk["finish_reason"]
        elif chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces, reason


def test_a_streamed_answer_is_the_whole_answer_in_pieces(make, alone):
    local = make()
    for i in (1, 3):  # one ends on its own, the other runs out of max_tokens; both non-ASCII
        pieces, reason = stream(local, CHATS[i], dict(GREEDY))
        assert "".join(pieces) == alone[i][0] and reason == alone[i][1]
        assert not any("\ufffd" in piece for piece in pieces)


def test_a_stop_string_the_model_writes_ends_the_answer_there(make, alone):
    content, reason, tokens = alone[0]
    words = content.split()
    stop = " " + words[len(words) // 2]  # a word from the middle of the real answer
    local = make()
    got, got_reason, got_tokens = outcome(
        local.completion("x", CHATS[0], optional_params={**GREEDY, "stop": [stop]})
    )
    assert reason == "stop" and got_reason == "stop"
    assert got == content[: content.index(stop)]
    assert got_tokens < tokens
    pieces, reason = stream(local, CHATS[0], {**GREEDY, "stop": stop})
    assert "".join(pieces) == got and reason == "stop"


CAPITAL = {
    "type": "object",
    "properties": {
        "country": {"type": "string", "minLength": 1},
        "capital": {"type": "string", "minLength": 1},
    },
    "required": ["country", "capital"],
    "additionalProperties": False,
}


def test_schema_constrained_json_parses_validates_and_its_strings_are_text(make):
    local = make()
    chat = [
        {
            "role": "user",
            "content": 'What is the capital of France? Answer in JSON: {"country": ..., '
            '"capital": ...}',
        }
    ]
    schema = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL}}
    params = {"temperature": 0, "max_tokens": 40, "response_format": schema}
    content, reason, _ = outcome(local.completion("x", chat, optional_params=params))
    assert reason == "stop"
    answer = json.loads(content)
    jsonschema.validate(answer, CAPITAL)
    for value in answer.values():
        assert value.strip() and value.isprintable() and any(c.isalpha() for c in value)


def test_tools_are_a_400_on_a_checkpoint_without_tool_call_tokens(make):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(InvalidRequestError) as info:
        make().completion("x", CHATS[0], optional_params={**GREEDY, "tools": tools})
    assert info.value.status_code == 400 and info.value.param == "tools"
    assert "no <tool_call> token" in info.value.message
