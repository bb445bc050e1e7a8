"""scripts/real_model.py's cache: converted once, complete or absent, safe to run concurrently.

The wheel's installation and the conversion are replaced by quick stand-ins here (the real ones
run in the ``real_model_dir`` fixture): what is checked is the cache's own logic.
"""

from __future__ import annotations

import threading

import pytest

from tests.conftest import _load_script


@pytest.fixture
def script(monkeypatch, tmp_path):
    module = _load_script("real_model")
    calls: list[str] = []
    release = threading.Event()

    def wheel_files(into):
        into.mkdir(parents=True)
        return into

    def convert(gguf_dir, out):
        calls.append(str(out))
        release.wait(10)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"weights")
        (out / module.DONE).write_text("{}")
        return out

    monkeypatch.setattr(module, "_wheel_files", wheel_files)
    monkeypatch.setattr(module, "convert", convert)
    module.calls, module.release = calls, release
    return module


def test_concurrent_runs_convert_once_and_agree(script, tmp_path):
    results: list = []
    runs = [
        threading.Thread(target=lambda: results.append(script.real_model_dir(tmp_path)))
        for _ in range(3)
    ]
    for run in runs:
        run.start()
    script.release.set()
    for run in runs:
        run.join(30)
    target = tmp_path / script.checkpoint_name()
    assert results == [target] * 3 and len(script.calls) == 1
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert not list(tmp_path.glob(".building-*"))  # the scratch folder is gone
    assert script.real_model_dir(tmp_path) == target and len(script.calls) == 1  # cached


def test_an_incomplete_folder_is_converted_again_and_a_failure_leaves_nothing(
    script, tmp_path, monkeypatch
):
    script.release.set()
    target = tmp_path / script.checkpoint_name()
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")  # no completion marker: a crash
    assert script.real_model_dir(tmp_path) == target
    assert (target / "model.safetensors").read_bytes() == b"weights"

    def broken(gguf_dir, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(script, "convert", broken)
    other = tmp_path / "other"
    with pytest.raises(RuntimeError, match="killed halfway"):
        script.real_model_dir(other)
    assert [p.name for p in other.iterdir()] == [".lock"]


def test_the_cache_folder_follows_the_environment(script, monkeypatch, tmp_path):
    monkeypatch.setenv("Z_EXPLORER_REAL_MODEL_CACHE", str(tmp_path / "mine"))
    assert script.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("Z_EXPLORER_REAL_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert script.cache_root() == tmp_path / "xdg" / "z-explorer" / "real-model"
    assert script.WHEEL_SHA256[:12] in script.checkpoint_name()
