"""Sampling controls on the local model (issue 21): presence/frequency/repetition penalties,
logit_bias, min_p and top_k, per row of the batch.

Three levels: the vectorised processing on small hand-made tensors (exact values), the engine on
the tiny random model (guarantees, never text quality), and the real proxy with the openai SDK.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.penalties import PenaltyCounts, RowPenalties
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.request import SamplingParams, parse_chat_request
from custom_handlers.inference.sampling import RowSampling, kept_logits, row_sampling, sample
from custom_handlers.inference.settings import LocalModelSettings

FOX = [{"role": "user", "content": "a fox in a misty forest"}]
LOCAL = "qwen3-4b"
INF = float("-inf")


# ---- the processing, on hand-made tensors -------------------------------------------------------


def _counted(pool: PenaltyCounts, rows: list, history: list[list[int]], vocab: int = 6):
    """Give ``rows`` their slots (one apply on zeros) and count ``history`` (token lists per row)
    as if each token had been sampled at a step."""
    pool.apply(torch.zeros(len(rows), vocab), rows)
    for step in range(max(map(len, history))):
        tokens = [h[step] if step < len(h) else 0 for h in history]
        counted = [p if step < len(h) else None for p, h in zip(rows, history, strict=True)]
        pool.count(counted, tokens)


def test_presence_and_frequency_subtract_from_the_generated_tokens_counts():
    pool = PenaltyCounts()
    row = RowPenalties(presence=0.5, frequency=0.25)
    _counted(pool, [row], [[1, 1, 1, 3]])
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    pool.apply(logits, [row])
    # token 1: 2 - 0.5 - 3 * 0.25; token 3: 4 - 0.5 - 0.25; the rest as they were
    assert logits.tolist() == [[1.0, 0.75, 3.0, 3.25, 5.0, 6.0]]


def test_negative_penalties_favour_the_tokens_already_generated():
    pool = PenaltyCounts()
    row = RowPenalties(presence=-1.0, frequency=-0.5)
    _counted(pool, [row], [[2, 2]])
    logits = torch.zeros(1, 6)
    pool.apply(logits, [row])
    assert logits.tolist() == [[0.0, 0.0, 2.0, 0.0, 0.0, 0.0]]


def test_logit_bias_adds_to_the_named_tokens():
    pool = PenaltyCounts()
    row = RowPenalties(bias=((0, 100.0), (5, -100.0), (2, 0.5)))
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    pool.apply(logits, [row])
    assert logits.tolist() == [[101.0, 2.0, 3.5, 4.0, 5.0, -94.0]]
    assert pool.slots == 0  # a bias alone needs no counts


def test_repetition_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    pool = PenaltyCounts()
    row = RowPenalties(repetition=2.0, prompt_ids=[0, 1])  # the prompt saw 0 and 1
    _counted(pool, [row], [[4]])  # the output 4
    logits = torch.tensor([[4.0, -4.0, 3.0, -3.0, 8.0, -8.0]])
    pool.apply(logits, [row])
    assert logits.tolist() == [[2.0, -8.0, 3.0, -3.0, 4.0, -8.0]]


def test_repetition_comes_before_presence_and_bias_before_both():
    pool = PenaltyCounts()
    row = RowPenalties(presence=1.0, repetition=2.0, bias=((4, 2.0),))
    _counted(pool, [row], [[4]])
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 6.0, 0.0]])
    pool.apply(logits, [row])
    assert logits[0, 4].item() == (6.0 + 2.0) / 2.0 - 1.0  # vLLM's order


def test_rows_that_do_not_ask_are_unchanged_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    before = logits.clone()
    pool = PenaltyCounts()
    rows = [None, RowPenalties(presence=1.5, frequency=0.3, repetition=1.3, prompt_ids=[3]), None]
    rows.append(RowPenalties(bias=((7, -3.0),)))
    pool.apply(torch.zeros(4, 50), rows)
    pool.count(rows, [1, 2, 3, 4])
    pool.apply(logits, rows)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert not torch.equal(logits[1], before[1]) and not torch.equal(logits[3], before[3])


def test_each_row_counts_its_own_tokens_and_slots_are_reused():
    pool = PenaltyCounts()
    a, b = RowPenalties(frequency=1.0), RowPenalties(frequency=1.0)
    _counted(pool, [a, b], [[1, 1], [2]])
    logits = torch.zeros(2, 6)
    pool.apply(logits, [a, b])
    assert logits.tolist() == [[0, -2, 0, 0, 0, 0], [0, 0, -1, 0, 0, 0]]
    pool.retain([b])  # a left the batch
    c = RowPenalties(frequency=1.0)
    logits = torch.zeros(2, 6)
    pool.apply(logits, [b, c])
    assert c.slot == a.slot  # a's slot, counted afresh
    assert logits.tolist() == [[0, 0, -1, 0, 0, 0], [0] * 6]
    pool.retain([])
    assert pool.nbytes == 0  # no row with penalties: the counts are freed


def _sampled(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> RowSampling:
    return RowSampling(False, temperature, top_p, top_k, torch.Generator().manual_seed(0), min_p)


def test_min_p_drops_tokens_below_its_share_of_the_best():
    # probabilities proportional to 8, 4, 2, 1: min_p 0.3 keeps 8 and 4 (>= 2.4), drops 2 and 1
    logits = torch.log(torch.tensor([[8.0, 4.0, 2.0, 1.0], [8.0, 4.0, 2.0, 1.0]]))
    kept = kept_logits(logits, [_sampled(min_p=0.3), _sampled()])
    assert kept[0].tolist() == pytest.approx([math.log(8), math.log(4), INF, INF])
    assert torch.equal(kept[1], logits[1])  # min_p 0 beside it: untouched


def test_min_p_counts_after_the_temperature():
    logits = torch.log(torch.tensor([[8.0, 4.0, 2.0, 1.0]]))
    # temperature 2: probabilities proportional to sqrt: 2.83, 2, 1.41, 1: min_p 0.6 keeps 2
    kept = kept_logits(logits, [_sampled(temperature=2.0, min_p=0.6)])
    assert [v > INF for v in kept[0].tolist()] == [True, True, False, False]


def test_min_p_top_k_and_top_p_together():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))
    # min_p 0.11: below 0.044 goes, so 0.04 (not 0.06)
    kept = kept_logits(logits, [_sampled(min_p=0.11, top_k=4, top_p=1.0)])
    assert [v > INF for v in kept[0].tolist()] == [True, True, True, True, False]
    kept = kept_logits(logits, [_sampled(min_p=0.11, top_k=3, top_p=1.0)])
    assert [v > INF for v in kept[0].tolist()] == [True, True, True, False, False]
    # top_p over what is left: 0.4 / 0.96 and 0.3 / 0.96 make 0.73 > 0.6: two stay
    kept = kept_logits(logits, [_sampled(min_p=0.11, top_k=0, top_p=0.6)])
    assert [v > INF for v in kept[0].tolist()] == [True, True, False, False, False]


def test_greedy_rows_take_the_penalised_argmax():
    pool = PenaltyCounts()
    greedy = RowSampling(True, 1.0, 1.0, 0, None, penalties=RowPenalties(presence=2.0))
    _counted(pool, [greedy.penalties], [[0]], vocab=3)
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    pool.apply(logits, [greedy.penalties])
    assert sample(logits, [greedy]) == [1]


def test_penalties_before_the_mask_leave_forbidden_tokens_forbidden():
    pool = PenaltyCounts()
    row = RowPenalties(presence=-2.0, repetition=0.5, bias=((1, 100.0),))
    _counted(pool, [row], [[1]], vocab=3)
    logits = torch.tensor([[0.0, -5.0, 1.0]])
    pool.apply(logits, [row])
    logits[0, 1] = INF  # what the grammar's mask does next
    assert sample(logits, [RowSampling(True, 1.0, 1.0, 0, None, penalties=row)]) == [2]


def test_row_sampling_takes_penalties_from_the_request_and_the_checkpoint():
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
    params = SamplingParams(temperature=0, presence_penalty=1.0, logit_bias=((3, 0.0),))
    row = row_sampling(params, defaults, "cpu", 0, [5, 6])
    assert row.greedy and row.penalties == RowPenalties(presence=1.0)  # a 0 bias is no bias
    assert row_sampling(SamplingParams(), defaults, "cpu", 0).penalties is None
    checkpoint = {**defaults, "repetition_penalty": 1.1, "min_p": 0.05}
    row = row_sampling(SamplingParams(), checkpoint, "cpu", 0, [5, 6])
    assert row.penalties.repetition == 1.1 and row.penalties.prompt_ids == [5, 6]
    assert row.min_p == 0.05
    row = row_sampling(SamplingParams(repetition_penalty=1.0, min_p=0.0), checkpoint, "cpu", 0)
    assert row.penalties is None and row.min_p == 0.0  # the request's own values win


# ---- validation ---------------------------------------------------------------------------------


def parse(**params):
    return parse_chat_request(FOX, params)


def test_every_control_is_read():
    s = parse(
        presence_penalty=1.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        min_p=0.05,
        top_k=20,
        logit_bias={"10": -100, "11": 5.5},
    ).sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (1.5, -0.5, 1.2)
    assert (s.min_p, s.top_k, s.logit_bias) == (0.05, 20, ((10, -100.0), (11, 5.5)))


def test_a_raw_extra_body_carries_the_extensions_too():
    s = parse(extra_body={"min_p": 0.1, "repetition_penalty": 1.3, "top_k": 4}).sampling
    assert (s.min_p, s.repetition_penalty, s.top_k) == (0.1, 1.3, 4)
    assert parse(min_p=0.2, extra_body={"min_p": 0.1}).sampling.min_p == 0.2  # the body's wins


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"presence_penalty": 2.1}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": "x"}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.2}, "repetition_penalty"),
        ({"repetition_penalty": 1e30}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": "0.1"}, "min_p"),
        ({"extra_body": {"min_p": 2}}, "extra_body.min_p"),
        ({"extra_body": {"top_k": -1}}, "extra_body.top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"logit_bias": "x"}, "logit_bias"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"1": "x"}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": {"1": 1, "01": 2}}, "logit_bias"),
        ({"typical_p": 0.9}, "typical_p"),
        ({"mirostat": 2}, "mirostat"),
        ({"repeat_penalty": 1.1}, "repeat_penalty"),
        ({"extra_body": {"tfs_z": 0.9}}, "extra_body.tfs_z"),
    ],
)
def test_bad_values_are_a_400_naming_the_field(params, param):
    with pytest.raises(InvalidRequestError) as info:
        parse(**params)
    assert info.value.param == param and info.value.status_code == 400
    assert param.split(".")[-1] in info.value.message


# ---- the engine, on the tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    handler = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))
    yield handler
    handler.engine.release().done.wait(10)


async def _ask(local: LocalLLM, params: dict):
    params = {"max_tokens": 16, "logprobs": True, **params}
    return await local.acompletion("x", FOX, optional_params=params)


def ids(local: LocalLLM, response) -> list[int]:
    """The generated tokens' ids (each token's bytes, back to its id)."""
    table = _spellings(local)
    return [table[bytes(t.bytes)] for t in response.choices[0].logprobs.content]


_SPELLINGS: dict[bytes, int] = {}


def _spellings(local: LocalLLM) -> dict[bytes, int]:
    if not _SPELLINGS:
        loaded = local.holder.get()
        for token in range(len(loaded.tokenizer)):
            _SPELLINGS.setdefault(bytes(loaded.constraints.token_text(token)[1]), token)
    return _SPELLINGS


def answer(local: LocalLLM, **params):
    return asyncio.run(_ask(local, params))


def text(response) -> str:
    return response.choices[0].message.content


@pytest.fixture(scope="module")
def greedy(local):
    return answer(local, temperature=0)


def test_logit_bias_plus_100_forces_a_token_on_a_greedy_row(local, greedy):
    forced = 300  # an ordinary token of the tiny model's vocabulary (645 tokens)
    r = answer(local, temperature=0, logit_bias={str(forced): 100}, max_tokens=6)
    assert ids(local, r) == [forced] * 6


def test_logit_bias_minus_100_on_the_greedy_token_changes_the_answer(local, greedy):
    first = ids(local, greedy)[0]
    r = answer(local, temperature=0, logit_bias={str(first): -100})
    assert first not in ids(local, r)
    assert ids(local, r) != ids(local, greedy)


def test_a_huge_presence_penalty_repeats_no_token_in_a_greedy_answer(local, greedy):
    assert len(set(ids(local, greedy))) < len(ids(local, greedy))  # it did repeat without it
    r = answer(local, temperature=0, presence_penalty=2.0, max_tokens=24)
    tokens = ids(local, r)
    assert len(tokens) == 24 and len(set(tokens)) == len(tokens)


def test_repetition_penalty_changes_a_greedy_answer(local, greedy):
    r = answer(
        local, temperature=0, repetition_penalty=3.0
    )  # its logits are small: 1.5 is not enough
    assert ids(local, r) != ids(local, greedy)
    assert ids(local, answer(local, temperature=0, repetition_penalty=1.0)) == ids(local, greedy)


def test_logprobs_are_the_models_own_whatever_the_penalties(local, greedy):
    """The chosen token changes, the distribution reported for the first token does not."""
    r = answer(local, temperature=0, logit_bias={str(ids(local, greedy)[0]): -100})
    first, biased = greedy.choices[0].logprobs.content[0], r.choices[0].logprobs.content[0]
    assert [t.logprob for t in first.top_logprobs] == [t.logprob for t in biased.top_logprobs]
    assert biased.logprob < first.logprob  # the token taken instead is less likely to the model


def test_seeded_answers_stay_the_same_whatever_shares_the_batch(local):
    seeded = {"temperature": 1.0, "top_p": 1.0, "seed": 11, "max_tokens": 20}
    asks = {
        "penalties": {**seeded, "presence_penalty": 1.0, "frequency_penalty": 0.5},
        "repetition": {**seeded, "repetition_penalty": 1.3, "min_p": 0.02, "top_k": 50},
        "bias": {**seeded, "logit_bias": {"300": 5, "7": -100}},
        "plain": seeded,
    }
    alone = {name: text(answer(local, **p)) for name, p in asks.items()}

    async def together():
        names = list(asks) * 2
        others = [{"temperature": 0, "presence_penalty": -1.0}, {"temperature": 0.9}]
        out = await asyncio.gather(
            *[_ask(local, asks[name]) for name in names], *[_ask(local, o) for o in others]
        )
        return list(zip(names, map(text, out[: len(names)]), strict=True))

    assert all(got == alone[name] for name, got in asyncio.run(together()))
    # The rows leave the batch at the engine's next loop: their counts are freed then.
    deadline = time.monotonic() + 30
    while local.engine.penalty_counts.nbytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert local.engine.penalty_counts.nbytes == 0


def test_n_choices_count_their_own_tokens(local):
    r = asyncio.run(
        local.acompletion(
            "x",
            FOX,
            optional_params={"max_tokens": 12, "n": 3, "temperature": 0, "frequency_penalty": 2.0},
        )
    )
    alone = text(answer(local, temperature=0, frequency_penalty=2.0, max_tokens=12))
    assert [c.message.content for c in r.choices] == [alone] * 3


def test_a_bias_past_the_vocabulary_is_a_400_naming_the_id(local):
    from custom_handlers.inference.provider import vocab_size

    vocab = vocab_size(local.holder.get().model)
    with pytest.raises(InvalidRequestError) as info:
        answer(local, logit_bias={str(vocab): 1})
    assert info.value.param == "logit_bias" and str(vocab) in info.value.message
    answer(local, logit_bias={str(vocab - 1): 1}, max_tokens=1)  # the last id is fine


# ---- through the proxy, with the openai SDK -----------------------------------------------------


def test_extra_body_controls_reach_the_local_model(client):
    base = {"model": LOCAL, "messages": FOX, "max_tokens": 16, "temperature": 0}
    greedy = client.chat.completions.create(**base).choices[0].message.content
    penalised = client.chat.completions.create(**base, extra_body={"repetition_penalty": 3.0})
    assert penalised.choices[0].message.content != greedy
    sampled = {**base, "temperature": 1.5, "seed": 3}
    by_min_p = client.chat.completions.create(**sampled, extra_body={"min_p": 1.0})
    by_top_k = client.chat.completions.create(**sampled, extra_body={"top_k": 1})
    assert by_min_p.choices[0].message.content == greedy  # only the best token is left
    assert by_top_k.choices[0].message.content == greedy


def test_openai_penalties_and_logit_bias_reach_the_local_model(client):
    base = {"model": LOCAL, "messages": FOX, "max_tokens": 4, "temperature": 0}
    r = client.chat.completions.create(**base, logit_bias={"300": 100}, presence_penalty=0.5)
    forced = client.chat.completions.create(**{**base, "max_tokens": 1}, logit_bias={"300": 100})
    token = forced.choices[0].message.content
    assert r.choices[0].message.content.startswith(token) and r.choices[0].finish_reason == "length"
    client.chat.completions.create(**base, frequency_penalty=-2)  # the whole range is accepted


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"min_p": 3}}, "min_p"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"typical_p": 0.5}}, "typical_p"),
    ],
)
def test_bad_values_through_the_proxy_are_a_400_naming_the_field(client, kwargs, param):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=LOCAL, messages=FOX, max_tokens=2, **kwargs)
    assert info.value.status_code == 400
    assert param in str(info.value)
