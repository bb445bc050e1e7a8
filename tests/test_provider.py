"""The handler in-process through the LiteLLM SDK (sync and async), on the tiny model."""

from __future__ import annotations

import asyncio

import litellm
import pytest

from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.provider import LocalLLM
from custom_handlers.inference.settings import LocalModelSettings

FOX = [{"role": "user", "content": "a cute fox in a misty forest"}]


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    local = LocalLLM(ModelHolder(lambda: LocalModelSettings(model=str(tiny_model_dir))))
    previous = litellm.custom_provider_map
    litellm.custom_provider_map = [{"provider": "ztest", "custom_handler": local}]
    litellm.utils.custom_llm_setup()
    yield local
    litellm.custom_provider_map = previous


def transformers_greedy(loaded, messages, max_new_tokens):
    """The same request run straight through transformers, for comparison."""
    import torch

    tok = loaded.tokenizer
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = loaded.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        temperature=None,
        top_p=None,
        top_k=None,
    )[0, ids.shape[1] :].tolist()
    eos = [i for i, t in enumerate(out) if t in loaded.eos_token_ids]
    return tok.decode(out[: eos[0]] if eos else out, skip_special_tokens=True)


def test_greedy_answer_is_exactly_what_transformers_generates(handler):
    messages = [{"role": "user", "content": "fox"}]
    r = litellm.completion(model="ztest/x", messages=messages, temperature=0, max_tokens=20)
    assert r.choices[0].message.content == transformers_greedy(handler.holder.get(), messages, 20)


def test_sync_streaming_concatenates_to_the_non_streamed_answer(handler):
    kwargs = dict(model="ztest/x", messages=FOX, temperature=1.0, seed=3, max_tokens=25)
    whole = litellm.completion(**kwargs).choices[0].message.content
    chunks = list(litellm.completion(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert len([c for c in chunks if c.choices[0].delta.content]) >= 3


def test_async_requests_at_once_all_answer_and_load_once(tiny_model_dir):
    loads = []

    def factory():
        loads.append(1)
        return LocalModelSettings(model=str(tiny_model_dir))

    local = LocalLLM(ModelHolder(factory))
    loads.clear()  # read once for the model's serving settings; from now on, once per load

    async def burst():
        return await asyncio.gather(
            *(
                local.acompletion(
                    "x",
                    [{"role": "user", "content": f"fox {i}"}],
                    optional_params={"max_tokens": 5, "temperature": 0},
                )
                for i in range(6)
            )
        )

    responses = asyncio.run(burst())
    assert len(loads) == 1
    assert all(r.usage.completion_tokens <= 5 and r.choices[0].finish_reason for r in responses)


def test_cancelling_a_request_stops_its_generation(handler, cancelled_generations):
    async def cancel_midway():
        agen = handler.astreaming("x", FOX, optional_params={"max_tokens": 1500, "seed": 1})
        await agen.__anext__()
        await agen.aclose()  # what the proxy does when the client goes away

    asyncio.run(cancel_midway())
    # the next request is served once the cancelled one has left the engine
    r = litellm.completion(model="ztest/x", messages=FOX, temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    assert len(cancelled_generations) == 1
    assert cancelled_generations[0] < 50  # tokens generated of the 1500 allowed
