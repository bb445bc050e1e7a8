"""Draft tokens and their check (issue 24): prompt-lookup drafts, and ``accept``, which must leave
greedy output unchanged and sampled output distributed as if each token were drawn alone."""

from __future__ import annotations

import pytest
import torch

from custom_handlers.inference.speculation import PromptLookup, accept

# chi-square critical values at p = 0.001 (the draws below are seeded: the test is deterministic)
CHI2_999 = {4: 18.47}


def test_a_draft_is_what_followed_the_longest_most_recent_match():
    lookup = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3], max_ngram=3)
    assert lookup.draft(2) == [5, 6]  # "2 3" last came before 5 6 (not 4 9)
    lookup.extend([4])  # "2 3 4": the trigram first seen at the start wins over "3 4" / "4"
    assert lookup.draft(3) == [9, 2, 3]
    assert PromptLookup([7, 8, 9]).draft(4) == []  # no earlier occurrence
    assert lookup.draft(0) == []


def test_a_run_that_repeats_itself_drafts_from_its_first_occurrence():
    lookup = PromptLookup([5, 9, 9, 9, 9, 9, 9, 9])
    assert lookup.draft(4) == [9, 9, 9, 9]  # the last "9 9 9" is followed by one token only


def test_the_answer_so_far_counts_and_drafts_stop_at_the_end():
    lookup = PromptLookup([10, 11, 12])
    lookup.extend([10, 11])
    assert lookup.draft(5) == [12, 10, 11]  # what followed, up to the tokens known


class _EagerLookup:
    """The index as it was first written: every n-gram indexed as each token comes."""

    def __init__(self, tokens, max_ngram=3, min_ngram=1):
        self.lookup = PromptLookup([], max_ngram, min_ngram)
        self.extend(tokens)

    def extend(self, tokens):
        lookup = self.lookup
        for token in tokens:
            lookup.tokens.append(token)
            end = len(lookup.tokens)
            for n in range(lookup.min_ngram, lookup.max_ngram + 1):
                if end - 1 - n >= 0:
                    gram = tuple(lookup.tokens[end - 1 - n : end - 1])
                    lookup._first.setdefault(gram, end - 1)
                    lookup._last[gram] = end - 1
            lookup._indexed = end

    def draft(self, k):
        return self.lookup.draft(k)


def test_tokens_are_indexed_at_the_next_draft_with_the_same_drafts():
    """A row in a batch extends its lookup at every step but drafts only when alone: extending
    costs no n-gram work (issue 23, item 4), and the drafts are those of the index built token by
    token, whenever they are asked for."""
    import random

    rng = random.Random(11)
    for _ in range(300):
        alphabet = rng.randrange(2, 12)
        prompt = [rng.randrange(alphabet) for _ in range(rng.randrange(0, 30))]
        lazy, eager = PromptLookup(prompt), _EagerLookup(prompt)
        for _ in range(rng.randrange(1, 40)):
            new = [rng.randrange(alphabet) for _ in range(rng.randrange(0, 4))]
            lazy.extend(new)
            eager.extend(new)
            if rng.random() < 0.3:
                k = rng.randrange(0, 8)
                assert lazy.draft(k) == eager.draft(k)
        assert lazy.draft(7) == eager.draft(7)
        assert (lazy._first, lazy._last) == (eager.lookup._first, eager.lookup._last)
    batch_row = PromptLookup(list(range(200)))
    batch_row.extend(range(100))
    assert not batch_row._last  # nothing indexed until a draft is asked for


def test_greedy_keeps_the_draft_while_it_is_the_argmax_then_corrects():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 2.0, 0.0]])
    assert accept(logits, [1, 0, 2], greedy=True) == [1, 0, 2, 1]  # all kept, then a bonus
    assert accept(logits, [1, 2, 2], greedy=True) == [1, 0]  # the second is not the argmax
    assert accept(logits[:1], [], greedy=True) == [1]


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_output_follows_the_models_distribution_over_many_seeds():
    # 5 tokens, three positions: the drafted token is likely at the first, unlikely at the second.
    vocab = 5
    probs = torch.tensor(
        [[0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.15, 0.3, 0.25, 0.25], [0.2, 0.2, 0.2, 0.2, 0.2]]
    )
    logits = probs.log()
    draft = [0, 1]
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    third = torch.zeros(vocab)
    for seed in range(20_000):
        out = accept(logits, draft, greedy=False, generator=torch.Generator().manual_seed(seed))
        assert 1 <= len(out) <= 3 and out[: len(out) - 1] == draft[: len(out) - 1]
        first[out[0]] += 1
        if out[0] == draft[0]:
            second[out[1]] += 1  # the second position's distribution holds after the first draft
            if out[1] == draft[1]:
                third[out[2]] += 1
    assert _chi2(first, probs[0]) < CHI2_999[4]
    assert _chi2(second, probs[1]) < CHI2_999[4]
    assert third.sum() > 200 and _chi2(third, probs[2]) < CHI2_999[4]


def test_a_rule_that_keeps_every_draft_would_fail_that_check():
    # The check above can fail: drawing the first token as "the draft if a coin says so, else
    # anything" (not removing the draft from the rest) over-weights the drafted token.
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])
    counts = torch.zeros(5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20_000):
        if torch.rand(1, generator=generator).item() < probs[0]:
            counts[0] += 1
        else:
            counts[int(torch.multinomial(probs, 1, generator=generator))] += 1
    assert _chi2(counts, probs) > CHI2_999[4]


def test_masked_tokens_are_never_written():
    logits = torch.tensor([[0.0, float("-inf"), 0.0], [float("-inf"), 0.0, float("-inf")]])
    for seed in range(200):
        out = accept(logits, [1], greedy=False, generator=torch.Generator().manual_seed(seed))
        assert out[0] != 1 and len(out) == 1  # the draft token is not allowed: always replaced


# ---- grammar drafts (llguidance's fast-forward tokens) -------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"values": {"type": "array", "items": {"type": "string"}}},
    "required": ["values"],
    "additionalProperties": False,
}


def test_a_grammar_drafts_the_tokens_it_forces_and_is_left_where_it_was(tiny_model_dir):
    import json

    import llguidance.numpy
    from transformers import AutoTokenizer

    from custom_handlers.inference.constraints import JsonConstraints

    constraints = JsonConstraints(AutoTokenizer.from_pretrained(tiny_model_dir))
    matcher = constraints.matcher(constraints.grammar(json.dumps(SCHEMA)))
    draft = matcher.draft(64)
    text = b"".join(constraints.llg_tokenizer().decode_bytes([t]) for t in draft)
    # Compact JSON: the bytes up to the array are forced (llguidance holds back a last token that
    # could merge with what follows).
    assert text == b'{"values":'
    assert matcher.allowed(draft) == len(draft) and matcher.allowed([*draft, *draft]) < 2 * len(
        draft
    )
    assert matcher.draft(2) == draft[:2]
    vocab = matcher.vocab_size
    along = llguidance.numpy.allocate_token_bitmask(len(draft) + 1, vocab)
    matcher.fill_along(along, draft)
    again = llguidance.numpy.allocate_token_bitmask(1, vocab)
    matcher.fill(again, 0)
    assert (again[0] == along[0]).all()  # the matcher is back at the start
    for i, token in enumerate(draft):  # each position allows its draft token
        assert along[i][token // 32] >> (token % 32) & 1
    matcher.consume(draft[0])
    assert matcher.draft(64) == draft[1:]  # it moves on as tokens come


# ---- prompt-lookup speculation in the engine: a lone row -----------------------------------

REPEATING = [{"role": "user", "content": "a fox in a forest, a fox in a forest, a fox in a forest"}]


def _answer(local, body: dict) -> tuple[str, str, int]:
    import asyncio

    response = asyncio.run(local.acompletion("x", REPEATING, optional_params=dict(body)))
    choice = response.choices[0]
    return choice.message.content, choice.finish_reason, response.usage.completion_tokens


def _handler(model_dir, draft_tokens: int | None = 0, graph_mode: str | None = None):
    from tests.test_decode_graphs import handler

    local = handler(model_dir, graph_mode)
    local.engine.draft_tokens = draft_tokens
    return local


@pytest.mark.parametrize("graph_mode", [None, "static"], ids=["eager", "graph path"])
def test_greedy_answers_are_the_same_with_drafts_checked(tiny_model_dir, graph_mode):
    body = {"max_tokens": 120, "temperature": 0}
    plain = _answer(_handler(tiny_model_dir, graph_mode=graph_mode), body)
    local = _handler(tiny_model_dir, draft_tokens=7, graph_mode=graph_mode)
    assert _answer(local, body) == plain
    engine = local.engine
    assert engine.drafted > 0  # drafts were checked, not just skipped
    assert 0 <= engine.accepted <= engine.drafted


def test_a_row_that_may_not_draft_never_does(tiny_model_dir):
    local = _handler(tiny_model_dir, draft_tokens=7)
    _answer(local, {"max_tokens": 60, "temperature": 0, "logprobs": True})
    assert local.engine.drafted == 0
    # A constrained row drafts only what its grammar forces (tests/test_grammar_forward.py),
    # never from the prompt.
    json_object = {"type": "json_object"}
    _answer(local, {"max_tokens": 60, "temperature": 0, "response_format": json_object})
    assert local.engine.drafted == local.engine.forced_drafted


@pytest.mark.parametrize(
    "penalties",
    [{"presence_penalty": 1.0}, {"frequency_penalty": 0.7, "repetition_penalty": 1.3}],
    ids=["presence", "frequency and repetition"],
)
def test_greedy_answers_with_penalties_are_the_same_with_drafts_checked(tiny_model_dir, penalties):
    # The penalties at each position of a draft count the draft's tokens before it; after the
    # pass, the counts hold what was written, not the rejected part of the draft.
    body = {"max_tokens": 120, "temperature": 0, **penalties}
    plain = _answer(_handler(tiny_model_dir), body)
    local = _handler(tiny_model_dir, draft_tokens=7)
    assert _answer(local, body) == plain
    assert local.engine.drafted > 0


def test_sampled_rows_draft_only_without_a_seed(tiny_model_dir):
    local = _handler(tiny_model_dir, draft_tokens=7)
    seeded = {"max_tokens": 80, "temperature": 1.0, "seed": 11}
    first = _answer(local, seeded)
    assert local.engine.drafted == 0  # seeded: as in a batch, where it could not draft
    assert first == _answer(_handler(tiny_model_dir), seeded)
    answer = _answer(local, {"max_tokens": 80, "temperature": 1.0})
    assert answer[2] <= 80 and local.engine.drafted > 0


def test_by_default_the_cpu_drafts_and_cuda_does_not(tiny_model_dir):
    from types import SimpleNamespace

    from custom_handlers.inference.scheduler import DRAFT_TOKENS_CPU

    local = _handler(tiny_model_dir, draft_tokens=None)
    assert local.engine.scheduler.drafts(local.holder.get()) == DRAFT_TOKENS_CPU
    on_cuda = SimpleNamespace(model=SimpleNamespace(device="cuda:0"))
    assert local.engine.scheduler.drafts(on_cuda) == 0  # until a GPU run measures it
    _answer(local, {"max_tokens": 60, "temperature": 0})
    assert local.engine.drafted > 0
