"""A gateway started with several worker processes says so at start and never loads the model.

Each worker would load its own copy of the local model onto the GPU. Plain ``litellm`` accepts
``--num_workers`` (and ``NUM_WORKERS``); the handler sees it, warns in the log at start, and the
local model answers 503 with the fix, so a fallback in the YAML (if any) takes over. Cloud
models are served by every worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import Gateway

pytestmark = pytest.mark.integration

FOX = [{"role": "user", "content": "a fox"}]
PROBLEM = "The gateway runs 2 worker processes (--num_workers / NUM_WORKERS)"


@pytest.fixture(scope="module")
def two_workers(tiny_model_dir, fake_openai, tmp_path_factory):
    gw = Gateway(
        env=fake_openai.gateway_env(str(tiny_model_dir)),
        workdir=tmp_path_factory.mktemp("two-workers"),
        args=["--num_workers", "2"],
    ).start()
    yield gw
    gw.stop()


def test_several_workers_are_named_in_the_log_at_start(two_workers):
    assert PROBLEM in two_workers.log()


def test_the_local_model_is_refused_with_the_fix_and_cloud_is_served(two_workers):
    for _ in range(4):  # whichever worker answers
        r = two_workers.chat({"model": "qwen3-4b", "messages": FOX, "max_tokens": 2})
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert PROBLEM in message and "one worker" in message
        cloud = two_workers.chat({"model": "gpt-4o-mini", "messages": FOX, "max_tokens": 2})
        assert cloud.status_code == 200, cloud.text
    maps = _group_maps(two_workers.process.pid)
    assert len(maps) >= 3  # the supervisor and two workers
    assert not any("libtorch" in m for m in maps)  # no worker loaded anything


def _group_maps(group: int) -> list[str]:
    """The memory maps of every process in the gateway's process group."""
    maps = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:  # field 5 of /proc/PID/stat: the process group
                maps.append((stat.parent / "maps").read_text())
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return maps
