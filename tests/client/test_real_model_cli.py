"""``z-explorer enhance`` and ``vars`` end to end on a real instruct model: the real gateway serves
SmolLM2-135M-Instruct (scripts/real_model.py) as qwen3-4b, and the CLI runs against it.

The model is small and its answers are sampled, so only what a caller can rely on is checked:
the command succeeds, the text is text (no chat markup, no think block, no label or quotes left,
one line), the values are distinct one-line values saved to the library (or the command gives up
in one line). One gateway for the
module; torch on one thread in it (faster on a busy 2-core machine, see tests/test_real_model.py).
"""

from __future__ import annotations

import pytest

from client._prompts import SHORT_VALUE_CHARS
from client._values import clean_prompt, not_a_value
from tests.servers import Gateway

from .conftest import assert_one_line_error

pytestmark = pytest.mark.integration

MARKUP = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>", "</think>", "\ufffd", "```")


@pytest.fixture(scope="module")
def real_gateway(real_model_dir, fake_openai, tmp_path_factory):
    gateway = Gateway(
        env=fake_openai.gateway_env(str(real_model_dir), OMP_NUM_THREADS="1"),
        workdir=tmp_path_factory.mktemp("real-gateway"),
    )
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture
def on_real_gateway(real_gateway, monkeypatch):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", real_gateway.base_url)
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", real_gateway.key)
    return real_gateway


def assert_text(line: str) -> None:
    assert line.strip() and line == line.strip() and "\n" not in line
    assert not any(mark in line for mark in MARKUP), line
    assert line.isprintable(), line


def test_the_gateway_ends_a_turn_where_the_model_does_streamed_or_not(on_real_gateway):
    from openai import OpenAI

    gateway = on_real_gateway
    sdk = OpenAI(base_url=f"{gateway.base_url}/v1", api_key=gateway.key, max_retries=0)
    ask = {
        "model": "qwen3-4b",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    whole = sdk.chat.completions.create(**ask)
    chunks = list(sdk.chat.completions.create(stream=True, **ask))
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and whole.usage.completion_tokens < 24
    assert_text(choice.message.content)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_enhance_returns_one_line_of_plain_text(on_real_gateway, cli):
    result = cli("enhance", "a red fox in the snow", "--instruction", "watercolor")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    prompt = result.stdout[:-1]
    assert_text(prompt)
    assert clean_prompt(prompt) == prompt  # nothing left for the client to clean
    assert len(prompt.split()) >= 3


def test_vars_saves_distinct_one_line_values_or_says_in_one_line_why_not(
    on_real_gateway, cli, library_dir
):
    """A 135M model at temperature 0.9 often writes identifiers ("cat_breed_name_1") or the same
    value again: the client then asks for the rest, and after three weak rounds gives up. Either
    outcome keeps the contract: values that are distinct one-line text, saved; or one error line
    and nothing saved."""
    result = cli("vars", "cat_breed", "--count", "3", "--context", "a __cat_breed__ on a sofa")
    saved = library_dir / "cat_breed.md"
    if result.exit_code != 0:
        assert_one_line_error(result, "distinct values for __cat_breed__")
        assert not saved.exists()
        return
    values = result.stdout.splitlines()
    assert len(values) == 3 and len({v.casefold() for v in values}) == 3
    for value in values:
        assert_text(value)
        assert len(value) <= SHORT_VALUE_CHARS and '"' not in value
        assert not not_a_value(value, "cat_breed")
    assert [line for line in saved.read_text().splitlines() if not line.startswith("#")] == values
