"""Starting the gateway as a new user would, with and without a master key."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.servers import CONFIG, _clean_environ, free_port, start_wrapper, wait_until_up

pytestmark = pytest.mark.integration


def test_wrapper_creates_a_key_says_where_and_serves_with_it(tmp_path):
    port = free_port()
    env = {**_clean_environ(), "Z_EXPLORER_GATEWAY_CONFIG": str(CONFIG)}
    log = tmp_path / "out.log"
    process = start_wrapper(port, tmp_path, env, log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, process)
        env_file = tmp_path / ".env"
        key = next(
            line.split("=", 1)[1]
            for line in env_file.read_text().splitlines()
            if line.startswith("LITELLM_MASTER_KEY=")
        )
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert f"saved it as LITELLM_MASTER_KEY in {env_file}" in log.read_text()
        assert key not in log.read_text()  # the key itself is not printed to the log
        assert (
            httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
        )
        assert httpx.get(f"{base}/v1/models").status_code == 401
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_plain_litellm_refuses_to_start_without_a_key(tmp_path):
    litellm = Path(sys.executable).with_name("litellm")
    result = subprocess.run(
        [str(litellm), "--config", str(CONFIG), "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=tmp_path,
        env=_clean_environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "LITELLM_MASTER_KEY" in result.stdout + result.stderr
