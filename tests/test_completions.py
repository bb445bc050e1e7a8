"""``/v1/completions`` on the local model: the raw prompt continued, in OpenAI's shapes.

Integration tests against the real gateway (tiny model as ``qwen3-4b``) with the openai SDK's
``client.completions.create``; unit tests of the pure parts (``inference/completion.py``).
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from openai import BadRequestError

from custom_handlers.inference.completion import (
    DEFAULT_MAX_TOKENS,
    MAX_PROMPTS,
    Choice,
    choice_body,
    parse_completion_request,
)
from custom_handlers.inference.errors import InvalidRequestError
from tests.pace import wait_for

MODEL = "qwen3-4b"
FOX = "Once upon a time a fox"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))


def greedy_continuation(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """transformers' own greedy continuation of the raw prompt ids (no chat template)."""
    import torch

    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        temperature=None,
        top_p=None,
        top_k=None,
    )[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cut = [i for i, t in enumerate(out) if t in eos]
    return tokenizer.decode(out[: cut[0]] if cut else out, skip_special_tokens=True)


# ---- the prompt, continued ------------------------------------------------------------------


def test_a_string_prompt_is_continued_raw_as_generate_would(client, tokenizer, tiny_model):
    completion = client.completions.create(model=MODEL, prompt=FOX, max_tokens=6, temperature=0)
    ids = tokenizer(FOX)["input_ids"]
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    assert completion.model == MODEL
    assert completion.usage.prompt_tokens == len(ids)  # no chat template around it
    (choice,) = completion.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert choice.text == greedy_continuation(tiny_model, tokenizer, ids, 6)
    assert completion.usage.completion_tokens <= 6
    total = completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.total_tokens == total


def test_token_ids_are_the_prompt(client, tokenizer, tiny_model):
    ids = tokenizer(FOX)["input_ids"]
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    as_text = client.completions.create(model=MODEL, prompt=FOX, max_tokens=5, temperature=0)
    assert as_ids.usage.prompt_tokens == len(ids)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.choices[0].text == greedy_continuation(tiny_model, tokenizer, ids, 5)


def test_a_list_of_prompts_is_one_choice_per_prompt_times_n(client, tokenizer):
    prompts = ["a fox", "the forest at night is"]
    completion = client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=1.0, seed=5
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]  # prompt i, choice j: i*n + j
    assert all(c.finish_reason in ("stop", "length") for c in completion.choices)
    expected = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert completion.usage.prompt_tokens == expected  # each prompt counted once, not per choice
    # Choice 2 is the first of prompt 1: the same as that prompt alone, same seed.
    alone = client.completions.create(
        model=MODEL, prompt=prompts[1], n=2, max_tokens=4, temperature=1.0, seed=5
    )
    assert [c.text for c in completion.choices[2:]] == [c.text for c in alone.choices]


def test_a_list_of_token_id_lists(client, tokenizer):
    prompts = [tokenizer("a fox")["input_ids"], tokenizer("a misty forest")["input_ids"]]
    completion = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage.prompt_tokens == sum(map(len, prompts))
    for prompt, choice in zip(prompts, completion.choices, strict=True):
        one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
        assert choice.text == one.choices[0].text


def test_without_max_tokens_a_completion_is_at_most_16_tokens(client):
    completion = client.completions.create(model=MODEL, prompt=FOX, temperature=0)
    assert completion.usage.completion_tokens <= DEFAULT_MAX_TOKENS


def test_echo_puts_the_prompt_before_the_text(client):
    plain = client.completions.create(model=MODEL, prompt=FOX, max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model=MODEL, prompt=FOX, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == FOX + plain.choices[0].text
    assert echoed.usage == plain.usage


def test_stop_ends_the_text_before_the_stop_string(client):
    whole = client.completions.create(model=MODEL, prompt=FOX, max_tokens=12, temperature=0)
    text = whole.choices[0].text
    if len(text) < 3:
        pytest.skip("the tiny model's greedy answer is too short to cut")
    stop = text[2:4]
    cut = client.completions.create(
        model=MODEL, prompt=FOX, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_completion(client):
    kwargs = dict(model=MODEL, prompt=FOX, max_tokens=8, temperature=1.0, seed=11)
    assert client.completions.create(**kwargs).choices[0].text == (
        client.completions.create(**kwargs).choices[0].text
    )


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_keeps_the_json_guarantee(client, stream):
    schema = {
        "type": "object",
        "properties": {"fox": {"type": "boolean"}, "legs": {"enum": [2, 4]}},
        "required": ["fox", "legs"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "fox", "schema": schema}}
    for seed in range(3):
        kwargs = dict(model=MODEL, prompt="A fox as JSON:", max_tokens=40, temperature=1.0)
        kwargs |= dict(seed=seed, extra_body={"response_format": response_format})
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            text = client.completions.create(**kwargs).choices[0].text
        answer = json.loads(text)
        assert set(answer) == {"fox", "legs"} and answer["legs"] in (2, 4)


# ---- logprobs -----------------------------------------------------------------------------------


def test_logprobs_in_the_legacy_shape(client):
    completion = client.completions.create(
        model=MODEL, prompt=FOX, max_tokens=5, temperature=0, logprobs=2
    )
    choice = completion.choices[0]
    logprobs = choice.logprobs
    count = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert len(logprobs.text_offset) == len(logprobs.tokens) <= count
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert token in top and math.isclose(top[token], logprob, abs_tol=1e-4)
        assert 1 <= len(top) <= 3  # the 2 best, and the sampled token when it is not among them
        # greedy: the sampled token is the most likely one
        assert logprob >= max(top.values()) - 1e-4
    assert logprobs.text_offset[0] == 0
    assert "".join(logprobs.tokens) == choice.text


def test_echo_with_logprobs_adds_the_prompt_tokens_first_without_one(client, tokenizer):
    ids = tokenizer(FOX)["input_ids"]
    completion = client.completions.create(
        model=MODEL, prompt=FOX, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    prompt_part = logprobs.token_logprobs[1 : len(ids)]
    assert len(prompt_part) == len(ids) - 1 and all(lp <= 0 for lp in prompt_part)
    assert "".join(logprobs.tokens[: len(ids)]) == FOX
    assert logprobs.text_offset[len(ids)] == len(FOX)  # the completion's tokens follow
    assert completion.choices[0].text.startswith(FOX)
    # The same request again (the prompt's KV is cached now): the same numbers.
    again = client.completions.create(
        model=MODEL, prompt=FOX, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    assert again.choices[0].logprobs.token_logprobs == pytest.approx(
        logprobs.token_logprobs, abs=1e-4
    )


@pytest.mark.parametrize("prompt", [FOX, " ".join([FOX] * 60)])  # the second: 300+ tokens
def test_echo_with_max_tokens_0_scores_the_prompt_as_transformers_does(
    client, tokenizer, tiny_model, prompt
):
    import torch

    ids = tokenizer(prompt)["input_ids"]
    completion = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1
    )
    choice = completion.choices[0]
    assert choice.text == prompt and completion.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
    with torch.no_grad():
        expected = tiny_model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    wanted = [expected[i, token].item() for i, token in enumerate(ids[1:])]
    assert logprobs.token_logprobs[1:] == pytest.approx(wanted, abs=1e-3)
    for top in logprobs.top_logprobs[1:]:
        assert 1 <= len(top) <= 2


# ---- streams ------------------------------------------------------------------------------------


def test_a_stream_has_text_on_every_chunk_and_no_usage_unless_asked(client):
    whole = client.completions.create(model=MODEL, prompt=FOX, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=FOX, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks and all(isinstance(c.choices[0].text, str) for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert all(c.id.startswith("cmpl-") for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_a_stream_ends_with_usage_when_asked(client, tokenizer):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=FOX,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage.prompt_tokens == len(tokenizer(FOX)["input_ids"])
    assert all(c.usage is None for c in text_chunks)
    assert text_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert last.usage.completion_tokens >= 1


def test_a_streamed_echo_starts_with_the_prompt(client):
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=FOX, max_tokens=4, temperature=0, stream=True, echo=True
        )
    )
    whole = client.completions.create(
        model=MODEL, prompt=FOX, max_tokens=4, temperature=0, echo=True
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_a_stream_of_several_prompts_times_n_with_logprobs(client):
    kwargs = dict(
        model=MODEL, prompt=["a fox", "a misty forest"], n=2, max_tokens=6, temperature=1.0
    )
    kwargs |= dict(seed=4, logprobs=1, echo=True)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    texts, tokens, finishes, offsets = {}, {}, {}, {}
    for chunk in chunks:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.logprobs is not None:
            tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
            offsets.setdefault(choice.index, []).extend(choice.logprobs.text_offset)
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2, 3] == sorted(finishes)
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert finishes[choice.index] == choice.finish_reason
        assert tokens[choice.index] == choice.logprobs.tokens
        assert offsets[choice.index] == choice.logprobs.text_offset
    assert len({c.id for c in chunks}) == 1 and all(c.usage is None for c in chunks)


def test_closing_a_stream_stops_the_generation_of_every_prompt(gateway, client, gateway_hold):
    before = len(gateway.cancelled_counts())  # the session's gateway: other tests cancel too
    gateway_hold.decoding()  # both prompts held after their first token, until released
    stream = client.completions.create(
        model=MODEL,
        prompt=["a fox", "a misty forest"],
        temperature=1.0,
        seed=1,
        max_tokens=1900,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            break
    # Once the model stands still, the second prompt is running next to the first, or queued.
    assert gateway_hold.held()
    started = gateway.requests()
    assert started["running"] + started["queued"] == 2, started
    stream.close()
    # Every prompt cancelled (none counted as running) while the model stood still; then let go.
    assert wait_for(lambda: gateway.requests()["running"] == 0)
    gateway_hold.release()
    assert gateway.wait_for_requests({"running": 0, "queued": 0}) == {"running": 0, "queued": 0}
    # Each prompt that had started stopped with its first token, and at most the step held when
    # the client left; one still queued was dropped without a token.
    counts = [gateway.wait_for_cancellation(before + i) for i in range(started["running"])]
    assert all(tokens <= 2 for tokens in counts), counts
    assert len(gateway.cancelled_counts()) == before + started["running"]


# ---- refusals: 400s naming the field ------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "the end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": [999_999_999]}, "prompt"),
        ({"prompt": ["a", [999_999_999]], "stream": True}, "prompt"),
        ({"prompt": [5] * 2048, "stream": True}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a", 3]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": ["a"] * (MAX_PROMPTS + 1)}, "prompt"),
    ],
)
def test_refused_with_a_400_naming_the_field(gateway, extra, param):
    body = {"model": MODEL, "prompt": FOX, "max_tokens": 2, **extra}
    response = httpx.post(
        f"{gateway.base_url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=120,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize(
    ("prompt", "max_tokens"),
    [([5] * 2048, None), ([5] * 2000, 100), (["a fox", [5] * 2100], 2)],
)
def test_a_prompt_past_the_context_is_a_400_context_length_exceeded(client, prompt, max_tokens):
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
    assert "context_length_exceeded: " in info.value.message
    assert "prompt" in info.value.message and info.value.param == "prompt"


def test_suffix_is_a_400_through_the_sdk(client):
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=FOX, suffix="the end", max_tokens=2)
    assert "suffix" in info.value.message


def test_best_of_equal_to_n_is_accepted(client):
    completion = client.completions.create(
        model=MODEL, prompt=FOX, n=2, best_of=2, max_tokens=2, temperature=1.0
    )
    assert len(completion.choices) == 2


def test_a_cloud_model_still_completes(client):
    completion = client.completions.create(model="gpt-4o-mini", prompt="a fox", max_tokens=8)
    assert completion.choices[0].text


# ---- unit: the request and the answer's shape ----------------------------------------------------


def test_parse_keeps_the_prompts_their_order_and_form():
    request = parse_completion_request(["a", [1, 2], "b"], {"n": 2}, stream=False, max_n=8)
    assert request.prompts == ("a", (1, 2), "b")
    assert request.choices == 6 and request.sampling.max_tokens is None
    assert parse_completion_request([5, 6], {}, stream=False, max_n=8).prompts == ((5, 6),)


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        (True, {}, "prompt"),
        ([], {}, "prompt"),
        ([[1, "x"]], {}, "prompt"),
        ("a", {"echo": "yes"}, "echo"),
        ("a", {"logprobs": True}, "logprobs"),
        ("a", {"best_of": 2, "n": 3}, "best_of"),
        ("a", {"n": 9}, "n"),
        ("a", {"tools": [{"type": "function"}]}, "tools"),
        ("a", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("a", {"stream_options": "usage"}, "stream_options"),
        (["a", "b"], {"stream_options": {}}, "prompt"),
        ("a", {"stream_options": {}, "logprobs": 1}, "logprobs"),
    ],
)
def test_parse_refuses(prompt, params, param):
    """(A stream of several choices, or with logprobs, needs the gateway's stream hook.)"""
    with pytest.raises(InvalidRequestError) as info:
        streamed = "stream_options" in params
        parse_completion_request(prompt, params, stream=streamed, max_n=8, channel=False)
    assert info.value.param == param


def test_the_legacy_logprobs_block_offsets_follow_the_echoed_prompt():
    choice = Choice(
        index=3,
        text="ab",
        finish_reason="length",
        prompt_text="xy",
        prompt_logprobs=[("x", None, None), ("y", -1.0, {"y": -1.0})],
        logprobs=[("a", -0.5, {"a": -0.5}), ("b", -0.25, {"b": -0.25})],
    )
    body = choice_body(choice, echo=True, logprobs=True)
    assert body["text"] == "xyab" and body["index"] == 3
    assert body["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert body["logprobs"]["token_logprobs"] == [None, -1.0, -0.5, -0.25]
    plain = choice_body(choice, echo=False, logprobs=True)
    assert plain["text"] == "ab" and plain["logprobs"]["text_offset"] == [0, 1]
    assert choice_body(choice, echo=False, logprobs=False)["logprobs"] is None


# ---- in process, through LiteLLM's SDK alone (no gateway hook) ----------------------------------


@pytest.fixture(scope="module")
def sdk_provider(tiny_model_dir):
    import litellm

    from custom_handlers.inference.loader import ModelHolder
    from custom_handlers.inference.provider import LocalLLM
    from custom_handlers.inference.settings import LocalModelSettings

    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))
    previous = litellm.custom_provider_map
    litellm.custom_provider_map = [{"provider": "ztext", "custom_handler": local}]
    litellm.utils.custom_llm_setup()
    yield local
    litellm.custom_provider_map = previous


def test_without_the_gateway_strings_are_still_raw_prompts(sdk_provider, tokenizer):
    import asyncio

    import litellm

    async def run():
        whole = await litellm.atext_completion(
            model="ztext/x", prompt=["a fox", "a forest"], max_tokens=3, temperature=0
        )
        stream = await litellm.atext_completion(
            model="ztext/x", prompt="a fox", max_tokens=3, temperature=0, stream=True
        )
        return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(run())
    assert [c.index for c in whole.choices] == [0, 1] and whole.id.startswith("cmpl-")
    expected = len(tokenizer("a fox")["input_ids"]) + len(tokenizer("a forest")["input_ids"])
    assert whole.usage.prompt_tokens == expected
    streamed = "".join(c.choices[0].text or "" for c in chunks)
    assert streamed == whole.choices[0].text


def test_the_hook_keeps_the_prompt_and_gives_litellm_strings():
    from custom_handlers.gateway.completions import TOKEN_IDS_PLACEHOLDER, keep_prompt
    from custom_handlers.inference.completion import PROMPT_KEY, STREAM_KEY

    data = {"prompt": ["a", [1, 2]], "stream": True}
    keep_prompt(data)
    assert data["metadata"][PROMPT_KEY] == ["a", [1, 2]] and data["metadata"][STREAM_KEY]
    assert data["prompt"] == ["a", TOKEN_IDS_PLACEHOLDER] and data["disable_fallbacks"] is True
    strings = {"prompt": "a fox", "metadata": {"user": "x"}}
    keep_prompt(strings)
    assert strings["prompt"] == "a fox" and "disable_fallbacks" not in strings
    assert strings["metadata"] == {"user": "x", PROMPT_KEY: "a fox"}


def test_the_answer_size_bound_counts_every_prompt():
    from custom_handlers.gateway.body_checks import check_answer_size

    check_answer_size({"prompt": "a", "logprobs": 20}, completions=True)  # 16 (unset) x 21
    check_answer_size({"prompt": [1, 2, 3], "logprobs": 20, "max_tokens": 700}, completions=True)
    with pytest.raises(InvalidRequestError) as info:
        body = {"prompt": ["a"] * 32, "logprobs": 20, "max_tokens": 30}
        check_answer_size(body, completions=True)  # 32 x 30 x 21
    assert "32 prompts" in info.value.message and info.value.param == "max_tokens"


# ---- sampling controls (as on chat) --------------------------------------------------------------


def test_sampling_controls_reach_a_completion(client, tokenizer):
    base = dict(model=MODEL, prompt=FOX, max_tokens=4, temperature=0)
    forced = client.completions.create(**base, logit_bias={"300": 100}, presence_penalty=0.5)
    (choice,) = forced.choices
    assert choice.text == tokenizer.decode([300] * 4)  # +100 wins, whatever the penalty
    greedy = client.completions.create(**{**base, "max_tokens": 12}).choices[0].text
    penalised = client.completions.create(
        **{**base, "max_tokens": 12}, extra_body={"repetition_penalty": 3.0}
    )
    assert penalised.choices[0].text != greedy


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"extra_body": {"min_p": 3}}, "min_p"),
    ],
)
def test_bad_sampling_controls_on_a_completion_are_a_400(client, kwargs, param):
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=FOX, max_tokens=2, **kwargs)
    assert param in str(info.value)
