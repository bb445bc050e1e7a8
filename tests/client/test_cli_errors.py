"""Each failure, end to end against real servers: one ``error:`` line naming the fix, status 1."""

from __future__ import annotations

import pytest

from tests.servers import Gateway, free_port

from .conftest import assert_one_line_error

pytestmark = pytest.mark.integration

WRONG_UPSTREAM_KEY = "sk-wrong-upstream-key"


@pytest.fixture(scope="module")
def misconfigured_gateway(tiny_model_dir, fake_openai, tmp_path_factory):
    """A second gateway whose cloud keys are wrong (OpenAI) or missing (Anthropic).

    A provider's 401 makes LiteLLM pause that model for a few seconds, so these errors are never
    provoked on the shared gateway; here each model is called once.
    """
    fake_openai.invalid_keys.add(WRONG_UPSTREAM_KEY)
    gw = Gateway(
        env=fake_openai.gateway_env(str(tiny_model_dir), OPENAI_API_KEY=WRONG_UPSTREAM_KEY),
        workdir=tmp_path_factory.mktemp("misconfigured-gateway"),
    ).start()
    yield gw
    gw.stop()
    fake_openai.invalid_keys.discard(WRONG_UPSTREAM_KEY)


def test_gateway_unreachable_names_the_url_and_how_to_start_it(cli, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", url)
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", "sk-anything")
    for command in (["enhance", "a fox"], ["models"], ["vars", "cat_breed"], ["release-gpu"]):
        assert_one_line_error(cli(*command), url, "uv run z-explorer-gateway")


def test_doctor_says_the_gateway_is_down(cli, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", url)
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", "sk-anything")
    result = cli("doctor")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1].startswith(f"✗ gateway: Nothing answers at {url}")
    assert result.stderr == ""  # the checks say it all; no extra error line


def test_wrong_gateway_key(on_gateway, cli, monkeypatch):
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", "sk-not-the-key")
    for command in (["enhance", "a fox"], ["models"], ["release-gpu"]):
        line = assert_one_line_error(cli(*command), "refused the key", "LITELLM_PROXY_API_KEY")
        assert "sk-not-the-key" not in line
    doctor = cli("doctor")
    assert doctor.exit_code == 1
    assert "✗ key: The gateway at" in doctor.stdout


def test_no_key_at_all_is_caught_before_any_request(on_gateway, cli, monkeypatch):
    monkeypatch.delenv("LITELLM_PROXY_API_KEY")
    assert_one_line_error(cli("enhance", "a fox"), "No gateway key", "LITELLM_PROXY_API_KEY")


def test_every_configuration_problem_at_once(cli, monkeypatch):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", "localhost:4000")
    monkeypatch.setenv("LLM_TIMEOUT", "0")
    assert_one_line_error(
        cli("enhance", "a fox"), "3 configuration problems", "LITELLM_PROXY_API_BASE", "LLM_TIMEOUT"
    )
    doctor = cli("doctor")
    assert doctor.exit_code == 1
    assert [line[:1] for line in doctor.stdout.splitlines()] == ["✗", "✗", "✗"]


def test_unknown_model_lists_what_the_gateway_serves(on_gateway, cli, monkeypatch):
    monkeypatch.setenv("LLM_MODEL", "openai/gpt-4o")
    line = assert_one_line_error(
        cli("vars", "cat_breed", "-n", "2"),
        "has no model 'openai/gpt-4o' (from LLM_MODEL)",
        "claude-haiku, gpt-4o-mini, ollama-qwen3, qwen3-4b",
        "Set LLM_MODEL",
    )
    assert "Traceback" not in line
    doctor = cli("doctor")
    assert doctor.exit_code == 1 and "✗ model: The gateway at" in doctor.stdout


def test_rate_limit_says_when_to_retry(on_gateway, cli, fake_openai, monkeypatch):
    monkeypatch.setattr(fake_openai, "retry_after", 1)  # LiteLLM itself retries twice, waiting it
    assert_one_line_error(
        cli("enhance", "a fox [fake:429]", "-m", "gpt-4o-mini"),
        "rate limited by its provider; retry in 1 s",
    )


def test_timeout_names_the_setting(on_gateway, cli, fake_openai, monkeypatch):
    # The fake answers after 3 s: had the 1 s timeout not fired, the command would succeed, so
    # the error itself shows it fired (no duration to assert: a loaded machine starts slowly).
    monkeypatch.setattr(fake_openai, "slow_seconds", 3)
    monkeypatch.setenv("LLM_TIMEOUT", "1")
    assert_one_line_error(
        cli("enhance", "a fox [fake:slow]", "-m", "gpt-4o-mini"), "within 1 s", "LLM_TIMEOUT"
    )


def test_a_wrong_provider_key_names_the_providers_variable(misconfigured_gateway, cli, monkeypatch):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", misconfigured_gateway.base_url)
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", misconfigured_gateway.key)
    line = assert_one_line_error(
        cli("enhance", "a fox", "-m", "gpt-4o-mini"),
        "OpenAI refused the API key",
        "set OPENAI_API_KEY where the gateway runs",
    )
    assert "LITELLM_PROXY_API_KEY" not in line


def test_a_missing_provider_key_names_the_providers_variable(
    misconfigured_gateway, cli, monkeypatch
):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", misconfigured_gateway.base_url)
    monkeypatch.setenv("LITELLM_PROXY_API_KEY", misconfigured_gateway.key)
    result = cli("doctor", "-m", "claude-haiku")
    assert result.exit_code == 1
    last = result.stdout.splitlines()[-1]
    assert last.startswith("✗ answer: Model 'claude-haiku' needs Anthropic's API key")
    assert "set ANTHROPIC_API_KEY where the gateway runs" in last
    # The local model on the same gateway is unaffected.
    assert cli("enhance", "a fox", "-m", "qwen3-4b").exit_code == 0
