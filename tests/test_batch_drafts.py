"""Drafts for rows in a batch (issue 24): rows checking a draft (a prompt lookup's, or the tokens
a grammar forces) share one packed pass with rows taking one token. Every answer must stay what it
is alone without drafts (greedy: token for token; seeded: seeded rows never draft), the drafts must
really be checked in steps with several rows, every constrained row drafting its forced tokens,
and lookup drafts only while the batch has at most ``LOOKUP_ROWS`` rows."""

from __future__ import annotations

import asyncio
import concurrent.futures

from custom_handlers.inference import scheduler
from tests.pace import Gate, wait_for
from tests.test_batching import _messages
from tests.test_grammar_forward import ASK, NAMED_BODY, SCHEMA_BODY
from tests.test_speculation import REPEATING, _handler

OTHER = [{"role": "user", "content": "a red boat on a lake, a red boat on a lake, a red boat"}]
REQUESTS = [
    (REPEATING, {"max_tokens": 40, "temperature": 0}),  # drafts from its prompt
    (OTHER, {"max_tokens": 40, "temperature": 0}),  # drafts from its prompt
    (ASK, SCHEMA_BODY),  # drafts its grammar's forced tokens
    (ASK, NAMED_BODY),  # drafts its tool call's forced tokens
    (_messages(2), {"max_tokens": 30, "temperature": 0.9, "seed": 5}),  # seeded: never drafts
]


def _answer(local, messages: list[dict], body: dict) -> tuple:
    response = asyncio.run(local.acompletion("x", messages, optional_params=dict(body)))
    choice = response.choices[0]
    calls = tuple((c.function.name, c.function.arguments) for c in choice.message.tool_calls or ())
    return choice.message.content, calls, choice.finish_reason, response.usage.completion_tokens


def _together(local) -> list[tuple]:
    """All of ``REQUESTS`` in one batch from their first step: the first one's prefill is held
    until the others wait in the queue; the engine then takes them all before any step."""
    engine = local.engine
    gate = Gate(local.holder.get().model, decode_only=False).close()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            sent = [pool.submit(_answer, local, m, body) for m, body in REQUESTS]
            try:
                assert wait_for(lambda: engine.queued == len(REQUESTS) - 1 and gate.waits)
            finally:
                gate.open()
            return [future.result() for future in sent]
    finally:
        gate.remove()


def _kind(row, share) -> str:
    """What the row drafts in this step: its grammar's forced tokens, or from its prompt; a
    seeded row: "seeded" whatever it does."""
    if not row.sampling.greedy and row.sampling.seeded:
        return "seeded"
    return "forced" if share.forced else "lookup"


def _spy(engine) -> list[list[tuple[str, int, int]]]:
    """Each packed step's shares: (what the row drafts, its draft's length, its job's id)."""
    seen, real = [], engine._packed_step

    def packed_step(loaded, plan):
        rows = engine.scheduler.rows
        seen.append(
            [(_kind(r, s), len(s.draft), id(r.job)) for r, s in zip(rows, plan, strict=True)]
        )
        real(loaded, plan)

    engine._packed_step = packed_step
    return seen


def test_rows_in_a_batch_check_drafts_and_answer_as_alone_without(tiny_model_dir):
    plain = _handler(tiny_model_dir, draft_tokens=0)
    expected = [_answer(plain, messages, body) for messages, body in REQUESTS]
    local = _handler(tiny_model_dir, draft_tokens=7)
    steps = _spy(local.engine)
    assert _together(local) == expected
    assert local.engine.peak_rows == len(REQUESTS)
    batched = [step for step in steps if len(step) > 1]
    forced = [[n for kind, n, _ in step if kind == "forced" and n] for step in batched]
    assert max(len(drafts) for drafts in forced) == 2  # both constrained rows in one pass
    lookups = [sum(1 for kind, n, _ in step if kind == "lookup" and n) for step in batched]
    assert any(n and len(step) > 1 for n, step in zip(lookups, batched, strict=True))
    larger = [
        n for n, step in zip(lookups, batched, strict=True) if len(step) > scheduler.LOOKUP_ROWS
    ]
    assert larger and not any(larger)  # none from prompts while the batch is larger
    assert all(n == 0 for step in steps for kind, n, _ in step if kind == "seeded")
    engine = local.engine
    assert engine.forced_accepted > 0 and engine.accepted - engine.forced_accepted > 0


def test_prompt_lookup_drafts_are_checked_in_small_batches_only(monkeypatch):
    from types import SimpleNamespace

    from custom_handlers.inference.speculation import PromptLookup

    monkeypatch.setattr(scheduler, "LOOKUP_ROWS", 3)
    planner = scheduler.Scheduler(max_rows=8, max_queue=4, draft_tokens=7, prefill_chunk=0)
    job = SimpleNamespace(max_new_tokens=100, tools=None, cancelled=False)

    def row():  # a row whose prompt always suggests a draft of 7
        lookup = PromptLookup([5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8, 9, 10, 11, 12, 5])
        return SimpleNamespace(
            job=job, lookup=lookup, matcher=None, prompt_left=[], count=0, last=5, running=True
        )

    loaded = SimpleNamespace(packed=True, model=SimpleNamespace(device="cpu"))
    planner.rows = [row(), row(), row()]
    assert [len(share.draft) for share in planner.plan(loaded)] == [7, 7, 7]  # each of them
    planner.rows.append(row())
    assert planner.plan(loaded) is None  # one more: one token each, the steady step
