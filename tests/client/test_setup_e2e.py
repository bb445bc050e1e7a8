"""From a fresh folder to a working ``z-explorer enhance``, as a new user goes: ``z-explorer
setup``, then the real gateway started from that folder's proxy_config.yaml and .env, then
``enhance``.
Once with the local model (the tiny checkpoint) and once with a cloud model (the fake OpenAI
upstream standing in for OpenAI). Each starts one gateway."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

from tests.client.conftest import CLIENT_PREFIXES
from tests.servers import CONFIG, FAKE_OPENAI_KEY, Gateway, free_port

pytestmark = pytest.mark.integration


def user_shell(**extra: str) -> dict[str, str]:
    """A shell with none of the project's settings, as on a machine that never ran it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith((*CLIENT_PREFIXES, "LOCAL_LLM_", "Z_EXPLORER_", "OPENAI_"))
        and not k.endswith("_API_KEY")
    }
    return {**env, **extra}


def z_explorer(folder: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("z-explorer")), *args]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def fresh_clone(tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    shutil.copy(CONFIG, folder / "proxy_config.yaml")
    return folder


def gateway_from(folder: Path, port: int, **shell: str) -> Gateway:
    """The gateway as its user starts it in ``folder``: that folder's config and .env."""
    settings = {k: v for k, v in dotenv_values(folder / ".env").items() if v is not None}
    return Gateway(
        env={**settings, **shell},
        workdir=folder,
        port=port,
        key=settings["LITELLM_MASTER_KEY"],
        config=folder / "proxy_config.yaml",
    )


def test_fresh_clone_to_a_local_enhance(tmp_path_factory, tiny_model_dir):
    folder = fresh_clone(tmp_path_factory, "fresh-local")
    port = free_port()  # where this user's gateway will listen (localhost:4000 for a real one)
    shell = user_shell(LITELLM_PROXY_API_BASE=f"http://127.0.0.1:{port}")

    setup = z_explorer(folder, shell, "setup", "--local", "--local-model", str(tiny_model_dir))
    assert setup.returncode == 0, setup.stderr
    assert f"add model {tiny_model_dir.name.lower()} (zlocal/{tiny_model_dir}" in setup.stderr
    assert "LOCAL_LLM_MODEL" not in (folder / ".env").read_text()  # the entry names it
    assert "✗ gateway: Nothing answers" in setup.stdout
    assert "Next: start the gateway in this folder" in setup.stderr

    gateway = gateway_from(folder, port).start()
    try:
        enhance = z_explorer(folder, shell, "enhance", "a cute fox")
        assert enhance.returncode == 0, enhance.stderr
        assert len(enhance.stdout.rstrip("\n").split("\n")) == 1 and enhance.stdout.strip()

        again = z_explorer(folder, shell, "setup", "--yes")  # the gateway is up now
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Nothing to change" in again.stderr
        checks = again.stdout.splitlines()
        assert {line[:1] for line in checks} == {"✓"} and "✓ local models: " in again.stdout
        assert 'Ready. Next: uv run z-explorer enhance "a cute fox"' in again.stderr
    finally:
        gateway.stop()


def test_fresh_clone_to_a_cloud_enhance(tmp_path_factory, fake_openai):
    folder = fresh_clone(tmp_path_factory, "fresh-cloud")
    port = free_port()
    # The user exported their OpenAI key in this shell, as setup advises.
    shell = user_shell(
        LITELLM_PROXY_API_BASE=f"http://127.0.0.1:{port}", OPENAI_API_KEY=FAKE_OPENAI_KEY
    )

    tried = z_explorer(folder, shell, "setup", "--provider", "openai", "--model", "gpt-4o")
    assert tried.returncode == 0, tried.stderr
    setup = z_explorer(folder, shell, "setup", "--provider", "openai", "--model", "gpt-4o-mini")
    assert setup.returncode == 0, setup.stderr
    assert "export OPENAI_API_KEY" not in setup.stderr  # it is set in this shell
    settings = dotenv_values(folder / ".env")
    assert settings["LLM_MODEL"] == "gpt-4o-mini" and "OPENAI_API_KEY" not in settings

    # The gateway inherits the user's shell: the key, and OPENAI_BASE_URL to the fake upstream.
    gateway = gateway_from(
        folder, port, OPENAI_API_KEY=FAKE_OPENAI_KEY, OPENAI_BASE_URL=fake_openai.base_url
    ).start()
    try:
        before = len(fake_openai.requests)
        enhance = z_explorer(folder, shell, "enhance", "a cute fox")
        assert (enhance.returncode, enhance.stdout) == (0, "echo: Idea: a cute fox\n")
        added = z_explorer(folder, shell, "enhance", "a fox", "--model", "gpt-4o")
        assert (added.returncode, added.stdout) == (0, "echo: Idea: a fox\n")
        sent = [r["body"]["model"] for r in fake_openai.requests[before:]]
        assert sent == ["gpt-4o-mini", "gpt-4o"]
        assert {r["authorization"] for r in fake_openai.requests[before:]} == {
            f"Bearer {FAKE_OPENAI_KEY}"
        }

        # A model whose key the gateway lacks: saved, and the check says why it cannot answer.
        claude = z_explorer(folder, shell, "setup", "--provider", "anthropic")
        assert claude.returncode == 1, claude.stdout + claude.stderr
        assert "export ANTHROPIC_API_KEY=<your key>" in claude.stderr
        assert "✗ answer: Model 'claude-haiku' needs Anthropic's API key" in claude.stdout
        assert dotenv_values(folder / ".env")["LLM_MODEL"] == "claude-haiku"
    finally:
        gateway.stop()
