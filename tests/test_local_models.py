"""Local models declared in proxy_config.yaml: several of them, loaded on demand, sharing one GPU.

Through the real gateway (``litellm --config``), with two tiny checkpoints of different shapes and
tokenizers: served side by side, each with its own settings; swapped when only one may be loaded;
a wrong entry stops the gateway at start; a caller can never make it load what the YAML does not
declare.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import _load_builder
from tests.pace import Hold, paced_checkpoint
from tests.servers import CONFIG, MASTER_KEY, Gateway, _clean_environ, free_port
from tests.test_local_state import ENDLESS

pytestmark = pytest.mark.integration

FOX = [{"role": "user", "content": "a fox in the snow, at dawn, drawn in ink"}]
# A request that runs to its max_tokens, however the random model samples.
LONG = {"max_tokens": 150, "temperature": 1.0, "response_format": ENDLESS}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny checkpoints of different shapes and vocabularies (so different tokenizers)."""
    builder = _load_builder()
    root = tmp_path_factory.mktemp("two-models")
    small = builder.build(root / "small", layers=2, hidden=64, vocab=1024, seed=1)
    wide = builder.build(root / "wide", layers=3, hidden=128, vocab=320, seed=2)
    return small, wide


@pytest.fixture(scope="module")
def paced_small(two_checkpoints, tmp_path_factory) -> tuple[Path, Hold]:
    """``small``, whose model a test holds between two forward passes (tests/pace.py); served
    with ``trust_remote_code: true``."""
    return paced_checkpoint(two_checkpoints[0], tmp_path_factory.mktemp("paced") / "small")


def write_config(path: Path, local: dict[str, tuple[str, dict]]) -> Path:
    """The shipped configuration with its model_list replaced by these local entries
    (model_name -> (zlocal id, model_info))."""
    config = yaml.safe_load(CONFIG.read_text())
    config["model_list"] = [
        {
            "model_name": name,
            "litellm_params": {"model": f"zlocal/{model_id}", "num_retries": 0},
            "model_info": {"disable_background_health_check": True, **info},
        }
        for name, (model_id, info) in local.items()
    ]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start(tmp_path: Path, local: dict[str, tuple[str, dict]], **env: str) -> Gateway:
    config = write_config(tmp_path / "proxy_config.yaml", local)
    return Gateway(env=env, workdir=tmp_path, config=config).start()


def ask(gw: Gateway, model: str, **body) -> httpx.Response:
    body = {"model": model, "messages": FOX, "max_tokens": 3, "seed": 1, **body}
    return httpx.post(
        f"{gw.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {gw.key}"},
        timeout=120,
    )


def state(gw: Gateway) -> dict:
    r = httpx.get(f"{gw.base_url}/local/state", headers={"Authorization": f"Bearer {gw.key}"})
    assert r.status_code == 200, r.text
    return r.json()


def models(gw: Gateway) -> dict[str, dict]:
    return {m["model"]: m for m in state(gw)["models"]}


def loaded(gw: Gateway) -> list[str]:
    return [name for name, m in models(gw).items() if m["loaded"]]


def wait_for(condition, seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


# ---- side by side -------------------------------------------------------------------------------


def test_two_local_models_side_by_side_each_with_its_own_tokenizer_and_settings(
    two_checkpoints, paced_small, tmp_path
):
    (small, hold), (_, wide) = paced_small, two_checkpoints
    paced = {"trust_remote_code": True}
    gw = start(
        tmp_path,
        {
            "small": (str(small), {"keep_alive": 0, "max_batch_size": 1, **paced}),
            "wide": (str(wide), {}),
        },
        LOCAL_LLM_MAX_LOADED_MODELS="2",
    )
    try:
        listed = httpx.get(
            f"{gw.base_url}/v1/models", headers={"Authorization": f"Bearer {gw.key}"}
        ).json()
        assert {m["id"] for m in listed["data"]} == {"small", "wide"}
        before = models(gw)
        assert [before[n]["loaded"] for n in ("small", "wide")] == [False, False]
        assert before["small"]["source"] == f"{small.name} (a local folder)"  # never a path
        assert before["wide"]["source"] == f"{wide.name} (a local folder)"
        assert (before["small"]["max_batch_size"], before["wide"]["max_batch_size"]) == (1, 16)
        assert (before["small"]["keep_alive_seconds"], before["wide"]["keep_alive_seconds"]) == (
            0,
            300,
        )

        a, b = ask(gw, "small"), ask(gw, "wide")
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        # Same messages, two tokenizers: the prompts count differently.
        assert a.json()["usage"]["prompt_tokens"] != b.json()["usage"]["prompt_tokens"]
        assert a.json()["model"] == "small" and b.json()["model"] == "wide"
        # Every route reaches the model named: the text completion of the same words (the raw
        # prompt, no chat template) is counted by wide's tokenizer.
        from transformers import AutoTokenizer

        text = httpx.post(
            f"{gw.base_url}/v1/completions",
            json={"model": "wide", "prompt": FOX[0]["content"], "max_tokens": 2},
            headers={"Authorization": f"Bearer {gw.key}"},
            timeout=120,
        )
        assert text.status_code == 200, text.text
        counted = len(AutoTokenizer.from_pretrained(str(wide))(FOX[0]["content"])["input_ids"])
        assert text.json()["usage"]["prompt_tokens"] == counted
        # keep_alive 0 applies to small only: it is unloaded after its answer, wide stays.
        assert wait_for(lambda: loaded(gw) == ["wide"]), models(gw)

        # max_batch_size 1 applies to small only: of three concurrent requests one runs at a time.
        # The first is held after its first token until the two others are seen waiting.
        hold.decoding()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            body = {**LONG, "max_tokens": 60}
            futures = [pool.submit(ask, gw, "small", **body) for _ in range(3)]
            one_runs = {"running": 1, "queued": 2}
            assert wait_for(lambda: models(gw)["small"]["requests"] == one_runs), models(gw)
            hold.release()
            seen = []
            while not all(f.done() for f in futures):
                seen.append(models(gw)["small"]["requests"])
                time.sleep(0.02)
        assert all(f.result().status_code == 200 for f in futures)
        assert all(r["running"] <= 1 for r in seen)  # never two at once
    finally:
        hold.release()
        gw.stop()


# ---- one loaded at a time -----------------------------------------------------------------------


def test_with_one_model_loaded_at_a_time_requests_swap_them(two_checkpoints, tmp_path):
    small, wide = two_checkpoints
    gw = start(tmp_path, {"small": (str(small), {}), "wide": (str(wide), {})})
    try:
        assert state(gw)["max_loaded_models"] == 1
        for name in ("small", "wide", "small", "wide"):
            r = ask(gw, name)
            assert r.status_code == 200, r.text
            now = models(gw)
            assert loaded(gw) == [name]
            other = now["wide" if name == "small" else "small"]
            assert other["memory"]["model_bytes"] is None  # its weights were let go
            assert now[name]["memory"]["model_bytes"] > 0
        log = gw.log()
        assert "Unloaded 'small' to make room for 'wide'" in log
        assert "Unloaded 'wide' to make room for 'small'" in log
    finally:
        gw.stop()


def test_a_model_busy_is_not_unloaded_the_other_waits_then_is_served(
    two_checkpoints, paced_small, tmp_path
):
    (small, hold), (_, wide) = paced_small, two_checkpoints
    gw = start(
        tmp_path,
        {"small": (str(small), {"trust_remote_code": True}), "wide": (str(wide), {"max_queue": 2})},
    )
    try:
        # small's request is held after its first token: it runs through the checks below on
        # any machine, however fast, and goes on when released.
        hold.decoding()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = pool.submit(ask, gw, "small", **{**LONG, "max_tokens": 60})
            assert wait_for(lambda: models(gw)["small"]["requests"]["running"] == 1)
            waiting = [pool.submit(ask, gw, "wide", max_tokens=3, seed=s) for s in (1, 2)]
            # wide waits for small's request: counted as queued, small stays loaded meanwhile.
            assert wait_for(lambda: models(gw)["wide"]["requests"]["queued"] == 2)
            assert loaded(gw) == ["small"] and not running.done()
            full = ask(gw, "wide")  # wide's queue (max_queue 2) is full: a 503, at once
            assert full.status_code == 503 and full.headers["retry-after"] == "2", full.text
            assert "'wide' is busy" in full.json()["error"]["message"]
            hold.release()
            first = running.result()
            answers = [f.result() for f in waiting]
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 60
        assert [a.status_code for a in answers] == [200, 200]
        ids = {a.json()["id"] for a in [first, *answers]}
        assert len(ids) == 3  # each answered once
        assert loaded(gw) == ["wide"]
        assert "waits for a loaded model to finish its requests" in gw.log()
    finally:
        hold.release()
        gw.stop()


def test_the_release_route_releases_one_model_or_all(two_checkpoints, tmp_path):
    small, wide = two_checkpoints
    gw = start(
        tmp_path,
        {"small": (str(small), {}), "wide": (str(wide), {})},
        LOCAL_LLM_MAX_LOADED_MODELS="2",
    )
    try:
        headers = {"Authorization": f"Bearer {gw.key}"}
        assert ask(gw, "small").status_code == ask(gw, "wide").status_code == 200
        assert sorted(loaded(gw)) == ["small", "wide"]
        one = httpx.post(f"{gw.base_url}/local/release", json={"model": "wide"}, headers=headers)
        assert one.status_code == 200, one.text
        assert one.json()["released"] == ["wide"]
        assert loaded(gw) == ["small"]
        unknown = httpx.post(f"{gw.base_url}/local/release", json={"model": "x"}, headers=headers)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        assert "small, wide" in unknown.json()["error"]["message"]
        bad = httpx.post(f"{gw.base_url}/local/release", json={"model": 3}, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
        every = httpx.post(f"{gw.base_url}/local/release", headers=headers)
        assert every.json()["released"] == ["small"] and loaded(gw) == []
    finally:
        gw.stop()


# ---- preload ------------------------------------------------------------------------------------


def test_a_model_marked_preload_is_loaded_at_start(two_checkpoints, tmp_path):
    small, wide = two_checkpoints
    gw = start(tmp_path, {"small": (str(small), {}), "wide": (str(wide), {"preload": True})})
    try:
        assert wait_for(lambda: loaded(gw) == ["wide"]), models(gw)
        wide_state = models(gw)["wide"]
        assert wide_state["preload"] is True
        # It stays loaded with no request yet: no unload is pending (keep_alive counts from the
        # end of a request), rather than "still loaded after a while".
        assert wide_state["loaded"] is True and wide_state["unload_in_seconds"] is None
    finally:
        gw.stop()


# ---- wrong entries stop the gateway -------------------------------------------------------------


@pytest.mark.parametrize(
    "info,expected",
    [
        ({"quantisation": "none"}, "model_info.quantisation is not a setting of local models"),
        ({"quantization": "int8"}, "model_info.quantization: Input should be 'auto', '4bit'"),
        ({"keep_alive": "soon"}, "model_info.keep_alive: Input should be a valid number"),
    ],
    ids=["unknown key", "bad choice", "bad number"],
)
def test_a_wrong_local_entry_stops_the_gateway_with_one_line(
    tiny_model_dir, tmp_path, info, expected
):
    config = write_config(tmp_path / "proxy_config.yaml", {"broken": (str(tiny_model_dir), info)})
    env = {**_clean_environ(), "LITELLM_MASTER_KEY": MASTER_KEY}
    program = str(Path(sys.executable).with_name("litellm"))
    done = subprocess.run(
        [program, "--config", str(config), "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "cannot start" in line]
    assert len(ours) == 1, done.stdout + done.stderr
    assert f"model 'broken': {expected}" in ours[0]
    assert "Traceback" not in done.stdout + done.stderr


# ---- a caller cannot choose what is loaded ------------------------------------------------------


@pytest.fixture(scope="module")
def one_model(two_checkpoints, tmp_path_factory):
    small, _ = two_checkpoints
    gw = start(tmp_path_factory.mktemp("one-model"), {"small": (str(small), {})})
    yield gw
    gw.stop()


@pytest.mark.parametrize(
    "body",
    [
        {"model": "zlocal/Qwen/Qwen3-1.7B"},
        {"model": "zlocal//tmp/elsewhere"},
        {"model": "small", "model_info": {"device": "cuda", "quantization": "none"}},
        {"model": "small", "litellm_params": {"model": "zlocal/Qwen/Qwen3-1.7B"}},
        {"model": "small", "device": "cuda"},
        {"model": "small", "extra_body": {"model_info": {"subfolder": "x"}}},
        {"model": "small", "keep_alive": "forever"},
    ],
    ids=["repo id", "path", "model_info", "litellm_params", "device", "extra_body", "keep_alive"],
)
def test_a_body_cannot_name_a_checkpoint_or_carry_settings(one_model, body):
    r = httpx.post(
        f"{one_model.base_url}/v1/chat/completions",
        json={"messages": FOX, "max_tokens": 3, **body},
        headers={"Authorization": f"Bearer {one_model.key}"},
        timeout=60,
    )
    unknown = body["model"] != "small"  # a model name the gateway does not serve
    assert r.status_code == (404 if unknown else 400), r.text
    after = models(one_model)
    assert list(after) == ["small"]
    assert after["small"]["loaded"] is False and after["small"]["load_seconds"] is None
    assert "Traceback" not in one_model.log()


# ---- a first request that downloads -------------------------------------------------------------


def test_a_first_request_downloads_with_progress_in_the_log_and_a_clear_503_if_it_waits_long(
    two_checkpoints, tmp_path
):
    from tests.hf_fake import FakeHub, hub_environment

    small, _ = two_checkpoints
    hub = FakeHub().start()
    try:
        hub.add("fake-org/small", small)
        hub.cut("fake-org/small", "model.safetensors", after=2000, stall=True)
        env = {**hub_environment(hub, tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        env["TRANSFORMERS_OFFLINE"] = "0"
        gw = start(tmp_path, {"hub": ("fake-org/small", {})}, LOCAL_LLM_DOWNLOAD_WAIT="2", **env)
        try:
            waited = ask(gw, "hub")
            assert waited.status_code == 503, waited.text
            error = waited.json()["error"]
            assert "'hub' is still downloading" in error["message"]
            assert "z-explorer pull hub" in error["message"]
            assert waited.headers["retry-after"] == "60"
            assert "Downloading fake-org/small" in gw.log()
            assert "model.safetensors" in gw.log()
            hub.release()  # the stalled transfer ends; the download resumes and completes
            assert wait_for(lambda: ask(gw, "hub").status_code == 200, 60)
            assert loaded(gw) == ["hub"]
        finally:
            gw.stop()
    finally:
        hub.stop()
