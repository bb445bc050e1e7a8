"""Prompts taken together are prefilled in one forward pass, and each answer is what it is alone."""

from __future__ import annotations

import asyncio

from custom_handlers.inference.engine import similar_lengths
from custom_handlers.inference.provider import LocalLLM
from tests.pace import arriving_together
from tests.test_kv_pool import handler
from tests.test_prefix_cache import SYSTEM

USERS = [
    "a fox",
    "a dragon over a castle at night, with a storm rolling in from the sea",
    "a tiny robot, watercolor",
    "an old lighthouse",
    "a market street in the rain, neon signs, reflections on the cobblestones, crowds",
    "a cat",
]


def greedy_together(local: LocalLLM, conversations: list[list[dict]]) -> list[tuple[str, int]]:
    async def together():
        return await asyncio.gather(
            *(
                local.acompletion(
                    "x", messages, optional_params={"temperature": 0, "max_tokens": 6 + len(text)}
                )
                for messages in conversations
                for text in [messages[-1]["content"]]  # answers of different lengths
            )
        )

    return [(r.choices[0].message.content, r.usage.prompt_tokens) for r in asyncio.run(together())]


def held_until_all_arrive(local: LocalLLM, conversations: list[list[dict]]) -> list:
    """``greedy_together``, with the prompts arriving together on any machine (tests/pace.py)."""
    return arriving_together(
        local, len(conversations), lambda: greedy_together(local, conversations)
    )


def test_prompts_arriving_together_share_a_prefill_and_answer_as_alone(tiny_model_dir):
    plain = [[{"role": "user", "content": user}] for user in USERS]
    with_system = [[{"role": "system", "content": SYSTEM}, *chat] for chat in plain]
    alone = handler(tiny_model_dir, prefix_cache_mb=0)
    expected = [greedy_together(alone, [chat])[0] for chat in plain + with_system]
    assert alone.engine.peak_prefill == 1

    local = handler(tiny_model_dir, prefix_cache_mb=64)
    # The first prompt taken is held in its prefill until every prompt has arrived; the others,
    # queued meanwhile, are then prefilled together: cold ones of similar lengths in one pass.
    assert held_until_all_arrive(local, plain) == expected[: len(USERS)]
    assert local.engine.peak_prefill >= 3
    # Cold with a long shared system prompt, then again: every prompt now reuses the system
    # prompt's KV, and the rests are prefilled together on top of it.
    assert greedy_together(local, with_system) == expected[len(USERS) :]
    hits = local.engine.prefix.hits
    assert greedy_together(local, with_system) == expected[len(USERS) :]
    assert local.engine.prefix.hits == hits + len(USERS)


def test_a_long_prompt_is_not_padded_beside_short_ones():
    class Job:
        def __init__(self, tokens: int):
            self.prompt_ids = [1] * tokens

    group = [(Job(n), None, 0) for n in (30, 2000, 40, 35, 1900)]
    parts = [[len(job.prompt_ids) for job, _, _ in part] for part in similar_lengths(group)]
    assert parts == [[30, 35, 40], [1900, 2000]]
    reused = [(Job(n), None, 1000) for n in (1030, 1040, 2000)]  # lengths after the reused part
    parts = [[len(job.prompt_ids) for job, _, _ in part] for part in similar_lengths(reused)]
    assert parts == [[1030, 1040], [2000]]


def test_a_shared_pass_out_of_memory_is_retried_prompt_by_prompt(tiny_model_dir):
    import torch

    local = handler(tiny_model_dir, prefix_cache_mb=0)
    plain = [[{"role": "user", "content": user}] for user in USERS]
    expected = [greedy_together(local, [chat])[0] for chat in plain]
    model = local.holder.get().model
    real_forward, shapes = model.forward, []

    def forward(*args, **kwargs):  # CUDA's error for any pass over several prompts
        rows, width = kwargs["input_ids"].shape
        shapes.append((rows, width))
        if rows > 1 and width > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    model.forward = forward
    assert held_until_all_arrive(local, plain) == expected  # every request answered, as alone
    assert any(rows > 1 and width > 1 for rows, width in shapes)  # a shared pass was tried
