"""The z-explorer-gateway wrapper: master key creation and the litellm command line."""

from __future__ import annotations

import stat

from custom_handlers.gateway import serve


def test_creates_a_strong_key_in_an_owner_only_env_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LITELLM_MASTER_KEY", raising=False)
    env = tmp_path / ".env"
    env.write_text("# my settings\nLLM_MODEL=gpt-4o-mini")  # no trailing newline
    key, created = serve.ensure_master_key(env)
    assert created and key.startswith("sk-") and len(key) >= 40
    text = env.read_text()
    assert text.startswith("# my settings\nLLM_MODEL=gpt-4o-mini\n")
    assert f"LITELLM_MASTER_KEY={key}\n" in text
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert serve.ensure_master_key(env) == (key, False)  # found again, not replaced


def test_an_existing_key_is_used_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("LITELLM_MASTER_KEY", "sk-mine")
    env = tmp_path / ".env"
    assert serve.ensure_master_key(env) == ("sk-mine", False)
    assert not env.exists()


def test_two_keys_differ(tmp_path, monkeypatch):
    monkeypatch.delenv("LITELLM_MASTER_KEY", raising=False)
    a, _ = serve.ensure_master_key(tmp_path / "a.env")
    b, _ = serve.ensure_master_key(tmp_path / "b.env")
    assert a != b


def test_binds_to_loopback_unless_told_otherwise(tmp_path):
    command = serve.litellm_command(["--port", "4001"], tmp_path / "proxy_config.yaml")
    assert command[1:] == [
        "--config",
        str(tmp_path / "proxy_config.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        "4001",
    ]
    assert "127.0.0.1" not in serve.litellm_command(["--host", "0.0.0.0"], tmp_path)[3:4]
    assert serve.litellm_command(["--host", "0.0.0.0"], tmp_path).count("--host") == 1


def test_several_workers_are_refused_with_the_reason(monkeypatch):
    monkeypatch.delenv("NUM_WORKERS", raising=False)
    assert serve.check_one_worker(["--port", "4000"]) is None
    assert serve.check_one_worker(["--num_workers", "1"]) is None
    for args in (["--num_workers", "4"], ["--num_workers=2"]):
        message = serve.check_one_worker(args)
        assert "own copy of the local model" in message and "docs/scaling.md" in message


def test_num_workers_in_the_environment_counts_unless_the_option_says_otherwise(monkeypatch):
    monkeypatch.setenv("NUM_WORKERS", "3")  # LiteLLM reads it when --num_workers is not given
    message = serve.check_one_worker(["--port", "4000"])
    assert message.startswith("error: NUM_WORKERS=3:")
    assert "own copy of the local model" in message
    assert serve.check_one_worker(["--num_workers", "1"]) is None
