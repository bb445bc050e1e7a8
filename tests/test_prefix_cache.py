"""Prefix reuse: a prompt that starts like an earlier one prefills only the rest, same answer."""

from __future__ import annotations

import asyncio

import pytest

from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.prefix import MIN_TOKENS, PrefixCache
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings

SYSTEM = " ".join(
    f"Rule {i}: describe the scene with a cinematic eye, soft light and one vivid detail."
    for i in range(12)
)
USERS = ["a fox in a misty forest", "a dragon over a castle at night", "a tiny robot, watercolor"]


@pytest.fixture
def handler(tiny_model_dir, monkeypatch):
    def make(cache_mb: float) -> LocalLLM:
        monkeypatch.setenv("LOCAL_LLM_PREFIX_CACHE_MB", str(cache_mb))
        return LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))

    return make


def greedy(local: LocalLLM, messages) -> str:
    params = {"temperature": 0, "max_tokens": 24}
    response = local.completion("x", messages, optional_params=params)
    return response.choices[0].message.content


def conversation(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def test_a_shared_system_prompt_is_reused_and_answers_are_the_same(handler):
    reusing, fresh = handler(64), handler(0)
    for user in USERS:
        assert greedy(reusing, conversation(user)) == greedy(fresh, conversation(user))
    state = reusing.engine.prefix.state()
    assert state["hits"] == len(USERS) - 1 and state["reused_tokens"] > 2 * 100
    assert fresh.engine.prefix.state() == {"entries": 0, "bytes": 0, "hits": 0, "reused_tokens": 0}


def test_a_chats_earlier_turns_are_reused(handler):
    reusing, fresh = handler(64), handler(0)
    chat = conversation(USERS[0])
    for _ in range(3):
        answer = greedy(reusing, chat)
        assert answer == greedy(fresh, chat)
        chat = [
            *chat,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "more"},
        ]
    assert reusing.engine.prefix.hits == 2


def test_release_drops_the_kept_prefixes(handler):
    local = handler(64)
    greedy(local, conversation(USERS[0]))
    assert local.state()["models"][0]["prefix_cache"]["entries"] == 1
    released = asyncio.run(local.release())
    assert released["released"] and released["state"]["models"][0]["prefix_cache"]["entries"] == 0


class _Layer:
    def __init__(self, tokens: int):
        import torch

        self.keys = self.values = torch.zeros(1, 1, tokens, 8)  # 32 bytes per token


class _Cache:
    def __init__(self, tokens: int, layers: int = 2):
        self.layers = [_Layer(tokens) for _ in range(layers)]


def test_entries_are_evicted_oldest_first_past_the_budget():
    prefix = PrefixCache(budget_bytes=2 * 100 * 2 * 32 * 2)  # two 100-token prompts
    prompts = [[p] * 100 for p in (1, 2, 3)]
    for prompt in prompts:
        prefix.add(prompt, _Cache(100))
    assert prefix.state()["entries"] == 2
    assert prefix.longest(prompts[0] + [9]) == (None, 0)  # evicted
    entry, reused = prefix.longest(prompts[2] + [9])
    assert reused == 100 and entry.tokens == tuple(prompts[2])
    _, whole = prefix.longest(prompts[1])  # the same prompt again: all but its last token
    assert whole == 99


@pytest.mark.parametrize("tokens", [MIN_TOKENS - 1])
def test_short_prompts_are_not_kept(tokens):
    prefix = PrefixCache(budget_bytes=10**6)
    prefix.add(list(range(tokens)), _Cache(tokens))
    assert prefix.state()["entries"] == 0


def test_usage_counts_the_reused_prompt_tokens_as_cached(handler):
    reusing = handler(64)
    params = {"temperature": 0, "max_tokens": 4}
    first, second = (
        reusing.completion("x", conversation(user), optional_params=params) for user in USERS[:2]
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    reused = reusing.engine.prefix.state()["reused_tokens"]
    assert second.usage.prompt_tokens_details.cached_tokens == reused > 100
    assert second.usage.completion_tokens_details.reasoning_tokens == 0
