"""Chunked prefill (issue 24): a long prompt that arrives while rows decode joins in chunks, one a
step, packed with the running rows' next tokens in one forward pass (packed.py). The running rows
advance in every one of those steps, and every answer is the one it would be without chunks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math

import pytest
import torch

from custom_handlers.inference.kvbatch import KVBatch
from custom_handlers.inference.packed import ATTENTION, packed_forward, use_packed_attention
from tests.pace import Gate, wait_for
from tests.test_batching import ENDLESS, _messages
from tests.test_decode_graphs import handler

CHUNK = 64
RUNNING = [{"max_tokens": 200, "temperature": 0, "response_format": ENDLESS}] * 2 + [
    {"max_tokens": 200, "temperature": 0.9, "seed": 5}
]
LONG_USER = "a fox in a forest at dawn, " * 70 + "and then?"  # ~700 tokens with the template
LONG = [{"role": "user", "content": LONG_USER}]


def _answer(response) -> tuple[str, str, int]:
    choice = response.choices[0]
    return choice.message.content, choice.finish_reason, response.usage.completion_tokens


def _send(local, messages: list[dict], body: dict):
    return _answer(asyncio.run(local.acompletion("x", messages, optional_params=dict(body))))


def alone(local, long_body: dict, running=RUNNING) -> list[tuple[str, str, int]]:
    """Each request alone, one after another: the answers to expect."""
    running = [_send(local, _messages(i), body) for i, body in enumerate(running)]
    return [*running, _send(local, LONG, long_body)]


def long_prompt_joins_running_rows(local, long_body: dict, running=RUNNING, longs=(LONG,)):
    """The ``RUNNING`` requests decode (all three have rows), then the long prompt is queued and
    the engine goes on: it takes the long prompt at its next loop, with the three running
    (they cannot finish meanwhile: the model is held before each decoding pass, and before a
    graph's warm-up, until then, and let go one pass at a time)."""
    engine = local.engine
    gate = Gate(local.holder.get().model).close()
    try:
        rows = len(running)
        with concurrent.futures.ThreadPoolExecutor(rows + len(longs)) as pool:
            sent = [pool.submit(_send, local, _messages(i), body) for i, body in enumerate(running)]
            passes = 0  # let the engine go one pass at a time until all of them have rows
            while engine.running < rows:
                assert wait_for(lambda n=passes: engine.running == rows or gate.waits > n)
                if engine.running < rows:
                    gate.let(1)
                    passes += 1
            joining = [pool.submit(_send, local, messages, long_body) for messages in longs]
            try:
                assert wait_for(lambda: engine.queued == len(longs))
            finally:
                gate.open()  # whatever happened: the requests end, and the pool with them
            return [_outcome(f) for f in [*sent, *joining]]
    finally:
        gate.remove()


def _outcome(future):
    """The answer, or the error a request ended with."""
    error = future.exception()
    return future.result() if error is None else error


def spy_packed_steps(engine) -> list[tuple[int, int, int]]:
    """(rows decoding, prompt tokens taken, the longest prompt joining) of each packed step with
    a prompt joining (the others: rows checking drafts)."""
    seen, real = [], engine._packed_step

    def packed_step(loaded, plan):
        rows = list(engine.scheduler.rows)
        if not any(row.prompt_left for row in rows):
            return real(loaded, plan)
        one = sum(1 for row in rows if not row.prompt_left)
        left = [len(row.prompt_left) for row in rows]
        longest = max(len(r.job.prompt_ids) for r in rows if r.prompt_left)
        engine.joining_prompts.update(
            {id(r.job): len(r.job.prompt_ids) for r in rows if r.prompt_left}
        )
        real(loaded, plan)
        taken = sum(n - len(row.prompt_left) for n, row in zip(left, rows, strict=True))
        seen.append((one, taken, longest))

    engine._packed_step = packed_step
    engine.joining_prompts = {}  # id(job) -> prompt tokens, of the prompts that joined in chunks
    return seen


@pytest.mark.parametrize("graph_mode", [None, "static"], ids=["eager", "graph path"])
def test_a_long_prompt_joins_in_chunks_while_the_others_decode(tiny_model_dir, graph_mode):
    long_body = {"max_tokens": 30, "temperature": 0}
    expected = alone(handler(tiny_model_dir, graph_mode, prefill_chunk=0), long_body)
    local = handler(tiny_model_dir, graph_mode, prefill_chunk=CHUNK)
    steps = spy_packed_steps(local.engine)
    assert long_prompt_joins_running_rows(local, long_body) == expected
    assert local.engine.chunked_prompts == 1
    prompt = steps[0][2]
    assert prompt > 10 * CHUNK
    assert len(steps) == math.ceil(prompt / CHUNK)  # a chunk a step, the whole prompt
    assert all(one == len(RUNNING) for one, _, _ in steps)  # the others advanced each time
    assert sum(tokens for _, tokens, _ in steps) == prompt


def test_prompts_joining_together_share_one_chunk_a_step(tiny_model_dir):
    long_body = {"max_tokens": 10, "temperature": 0}
    second = [{"role": "user", "content": "At night: " + LONG_USER}]
    plain = handler(tiny_model_dir, prefill_chunk=0)
    expected = [*alone(plain, long_body), _send(plain, second, long_body)]
    local = handler(tiny_model_dir, prefill_chunk=CHUNK)
    steps = spy_packed_steps(local.engine)
    assert long_prompt_joins_running_rows(local, long_body, longs=(LONG, second)) == expected
    assert local.engine.chunked_prompts == 2
    assert all(taken <= CHUNK for _, taken, _ in steps)  # one chunk a step for the two
    assert all(one >= len(RUNNING) for one, _, _ in steps)  # the first to join decodes then
    assert sum(taken for _, taken, _ in steps) == sum(local.engine.joining_prompts.values())


def test_once_the_others_have_left_the_rest_of_the_prompt_takes_one_pass(tiny_model_dir):
    long_body = {"max_tokens": 10, "temperature": 0}
    # Its first token comes from its prefill, its second from the step the gate held, its last
    # from the first chunk's step: then it leaves.
    short = [{"max_tokens": 3, "temperature": 0}]
    expected = alone(handler(tiny_model_dir, prefill_chunk=0), long_body, short)
    local = handler(tiny_model_dir, prefill_chunk=CHUNK)
    steps = spy_packed_steps(local.engine)
    assert long_prompt_joins_running_rows(local, long_body, short) == expected
    prompt = steps[0][2]
    assert [(one, tokens) for one, tokens, _ in steps] == [(1, CHUNK), (0, prompt - CHUNK)]
    assert local.engine.chunked_prompts == 1


def test_by_default_chunks_are_smaller_on_the_cpu_than_on_cuda(tiny_model_dir):
    from types import SimpleNamespace

    from custom_handlers.inference.scheduler import CHUNK_CPU, CHUNK_CUDA

    engine = handler(tiny_model_dir).engine  # prefill_chunk unset
    assert engine.prefill_chunk is None
    chunk = engine.scheduler.chunk
    assert chunk(SimpleNamespace(model=SimpleNamespace(device="cpu"))) == CHUNK_CPU
    assert chunk(SimpleNamespace(model=SimpleNamespace(device="cuda:0"))) == CHUNK_CUDA


def test_without_running_rows_or_with_chunks_off_a_prompt_is_prefilled_whole(tiny_model_dir):
    long_body = {"max_tokens": 5, "temperature": 0}
    local = handler(tiny_model_dir, prefill_chunk=CHUNK)
    _send(local, LONG, long_body)  # alone: nobody waits for it
    off = handler(tiny_model_dir, prefill_chunk=0)
    long_prompt_joins_running_rows(off, long_body)
    assert local.engine.chunked_prompts == off.engine.chunked_prompts == 0


def test_a_prompt_joining_in_chunks_reuses_a_cached_prefix_and_leaves_its_own(tiny_model_dir):
    long_body = {"max_tokens": 20, "temperature": 0}
    # It shares the first half of the long prompt only: the rest still takes several chunks.
    other = [{"role": "user", "content": LONG_USER[: len(LONG_USER) // 2] + " And at dusk?"}]
    plain = handler(tiny_model_dir, prefill_chunk=0, prefix_cache_mb=0)
    expected = [_send(plain, LONG, long_body)]
    local = handler(tiny_model_dir, prefill_chunk=CHUNK, prefix_cache_mb=64)
    engine = local.engine
    _send(local, other, {"max_tokens": 1})  # its prompt's KV is cached
    # The long prompt shares all but its end with it: the chunks start after the shared part.
    got = long_prompt_joins_running_rows(local, long_body)[-1]
    assert engine.prefix.hits == 1  # the shared half was reused
    assert engine.chunked_prompts == 1  # and the rest joined in chunks
    assert got == expected[0]
    hits = engine.prefix.hits
    assert _send(local, LONG, long_body) == expected[0]  # the chunked prompt's own KV, reused
    assert engine.prefix.hits == hits + 1


def test_a_prompt_cancelled_while_joining_leaves_and_the_others_go_on(tiny_model_dir):
    local = handler(tiny_model_dir, prefill_chunk=CHUNK)
    engine = local.engine
    real = engine._packed_step

    def cancel_then_step(loaded, plan):  # the long prompt's caller goes away after its first chunk
        real(loaded, plan)
        for row in engine.scheduler.rows:
            if row.prompt_left:
                row.job.cancel()

    engine._packed_step = cancel_then_step
    long_body = {"max_tokens": 5, "temperature": 0}
    expected = alone(handler(tiny_model_dir, prefill_chunk=0), long_body)[:-1]
    answers = long_prompt_joins_running_rows(local, long_body)
    assert answers[:-1] == expected  # the running rows went on, as without the long prompt
    assert engine.chunked_prompts == 1
    assert wait_for(lambda: not engine.scheduler.rows and engine.runner.batch.rows == 0)


# ---- the packed pass itself ---------------------------------------------------------------------


def test_a_packed_pass_gives_each_row_the_logits_of_its_whole_sequence(tiny_model_dir):
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert use_packed_attention(model) and model.config._attn_implementation == ATTENTION
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 600, (n,), generator=generator).tolist() for n in (7, 12, 5, 9)]
    taking = [[11], torch.randint(0, 600, (6,), generator=generator).tolist(), [3], [4, 5, 6]]
    batch = KVBatch()
    with torch.inference_mode():
        for prompt in prompts:
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
            batch.add(cache, 1, len(prompt), 64)
        packed = packed_forward(model, batch, taking, list(range(sum(map(len, taking)))))
        batch.advance([len(tokens) for tokens in taking])
        again = packed_forward(model, batch, [[1], [2], [3], [4]], [0, 1, 2, 3])
        pairs = list(zip(prompts, taking, strict=True))
        whole = [model(input_ids=torch.tensor([p + t])).logits[0] for p, t in pairs]
        first = torch.cat([w[len(p) :] for w, p in zip(whole, prompts, strict=True)])
        then = [
            model(input_ids=torch.tensor([p + t + [i + 1]])).logits[0, -1]
            for i, (p, t) in enumerate(pairs)
        ]
    torch.testing.assert_close(packed, first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, torch.stack(then), rtol=1e-4, atol=1e-4)
