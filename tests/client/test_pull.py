"""``z-explorer pull`` and ``custom_handlers.inference.download`` against a fake Hugging Face Hub on
loopback (``tests/hf_fake.py``): which files come, progress on a pipe and on a terminal, resuming
after a dropped connection and after Ctrl-C, offline loading of what came, and each failure as
one line. Nothing reaches huggingface.co: the fake is ``HF_ENDPOINT`` (in-process calls name it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from custom_handlers.inference import download as dl
from custom_handlers.inference.settings import LocalModelSettings
from tests.client.test_cli import run_on_terminal
from tests.hf_fake import FakeHub, hub_environment
from tests.servers import free_port

PLAIN, Z_IMAGE, BIG, GATED = "test/tiny-qwen3", "test/z-image-tiny", "test/big", "test/gated"
LOADER_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
BIG_SIZE = 24 * 1024 * 1024  # more than huggingface_hub's 10 MiB chunk, so a cut keeps a chunk
CHUNK = 10 * 1024 * 1024
CONFIG = """\
model_list:
  - model_name: tiny
    litellm_params:
      model: zlocal/test/tiny-qwen3
  - model_name: zimage
    litellm_params:
      model: zlocal/test/z-image-tiny
    model_info:
      subfolder: text_encoder
      tokenizer_subfolder: tokenizer
  - model_name: big
    litellm_params:
      model: zlocal/test/big
  - model_name: missing
    litellm_params:
      model: zlocal/test/no-such-repo
  - model_name: folder
    litellm_params:
      model: zlocal/{folder}
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
"""


def plain_repo(tiny_model_dir: Path, root: Path) -> Path:
    """The tiny checkpoint beside what a real repo also holds: other weight formats, docs."""
    shutil.copytree(tiny_model_dir, root)
    shutil.copy(root / "model.safetensors", root / "pytorch_model.bin")
    for junk in ("original/consolidated.pth", "onnx/model.onnx", "model-q4.gguf", "README.md"):
        (root / junk).parent.mkdir(exist_ok=True)
        (root / junk).write_bytes(b"not for the loader\n" * 100)
    return root


def z_image_repo(tiny_model_dir: Path, root: Path) -> Path:
    """Z-Image's layout: the text encoder and its tokenizer beside an image model's weights."""
    for folder, names in {
        "text_encoder": ("config.json", "model.safetensors", "generation_config.json"),
        "tokenizer": ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
    }.items():
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(tiny_model_dir / name, root / folder / name)
    for name, size in {
        "transformer/diffusion_pytorch_model.safetensors": 3_000_000,
        "vae/diffusion_pytorch_model.safetensors": 1_000_000,
        "scheduler/scheduler_config.json": 100,
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))
    (root / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    return root


def big_repo(tiny_model_dir: Path, root: Path) -> Path:
    """A repo whose weights file is large enough to interrupt halfway (it is not a real model)."""
    root.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, root / name)
    (root / "model.safetensors").write_bytes(os.urandom(BIG_SIZE))
    return root


@pytest.fixture(scope="module")
def repos(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-repos")
    return {
        PLAIN: plain_repo(tiny_model_dir, root / "plain"),
        Z_IMAGE: z_image_repo(tiny_model_dir, root / "z-image"),
        BIG: big_repo(tiny_model_dir, root / "big"),
        GATED: tiny_model_dir,
    }


@pytest.fixture(scope="module")
def module_hub(repos):
    hub = FakeHub().start()
    for repo_id, folder in repos.items():
        hub.add(repo_id, folder, gated=repo_id == GATED)
    yield hub
    hub.stop()


@pytest.fixture
def hub(module_hub) -> FakeHub:
    module_hub.reset()
    yield module_hub
    module_hub.release()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf" / "hub"


@pytest.fixture
def project(_isolated, tiny_model_dir) -> Path:
    """The working folder holds a proxy_config.yaml with local entries of every kind."""
    (_isolated / "proxy_config.yaml").write_text(CONFIG.format(folder=tiny_model_dir))
    return _isolated


@pytest.fixture
def env(hub, tmp_path) -> dict[str, str]:
    """A child process's environment: the fake Hub, a cache of its own, no token."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LOCAL_LLM_"))}
    keep.pop("Z_EXPLORER_GATEWAY_CONFIG", None)
    return {**keep, **hub_environment(hub, tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}


def fetch(settings: LocalModelSettings, hub: FakeHub, cache: Path, **kwargs) -> dl.DownloadResult:
    return dl.download(settings, endpoint=hub.endpoint, cache_dir=cache, token=False, **kwargs)


def z_explorer() -> str:
    return str(Path(sys.executable).with_name("z-explorer"))


def pull(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [z_explorer(), "pull", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- which files ---------------------------------------------------------------------------------


def test_only_the_files_the_loader_reads_are_chosen():
    qwen = [
        ".gitattributes",
        "README.md",
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model.bin.index.json",
        "consolidated.safetensors",
        "original/consolidated.00.pth",
        "onnx/model.onnx",
        "qwen3-4b-q4.gguf",
        "flax_model.msgpack",
        "tf_model.h5",
        "merges.txt",
        "vocab.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "additional_chat_templates/tool_use.jinja",
        "modeling_qwen3.py",
    ]
    assert dl.files_needed(qwen, LocalModelSettings(model="q/q")) == [
        "additional_chat_templates/tool_use.jinja",
        "chat_template.jinja",
        "generation_config.json",
        "merges.txt",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "config.json",  # last: a cache that has it has everything
    ]
    remote_code = dl.files_needed(qwen, LocalModelSettings(model="q/q", trust_remote_code=True))
    assert "modeling_qwen3.py" in remote_code
    only_bin = [n for n in qwen if ".safetensors" not in n]
    chosen = dl.files_needed(only_bin, LocalModelSettings(model="q/q"))
    weights = [name for name in chosen if "model" in name]
    assert weights == ["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]


def test_z_images_encoder_is_two_folders_of_its_repo():
    z_image = [
        "model_index.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00003.safetensors",
        "text_encoder/model-00002-of-00003.safetensors",
        "text_encoder/model-00003-of-00003.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    settings = LocalModelSettings(
        model="z/z", subfolder="text_encoder", tokenizer_subfolder="tokenizer"
    )
    chosen = dl.files_needed(z_image, settings)
    assert {name.split("/")[0] for name in chosen} == {"text_encoder", "tokenizer"}
    assert len(chosen) == 9 and chosen[-1] == "text_encoder/config.json"


def test_plain_lines_come_per_file_and_per_tenth_never_per_chunk():
    lines: list[str] = []
    progress = dl.LogProgress(lines.append, every_s=3600)
    files = (dl.PlannedFile("config.json", 1_000, False), dl.PlannedFile("w", 99_000, False))
    progress.planned(dl.Plan("org/model", Path("/cache/x"), files, "0" * 40))
    for planned in files:
        progress.file_started(planned.name, planned.size, 0)
        for _ in range(planned.size // 100):
            progress.advanced(100)  # a thousand chunks
        progress.file_finished(planned.name)
    assert lines[0].startswith("Downloading org/model: 2 of 2 files, 97.7 KiB, into /cache/x")
    percents = [line for line in lines if "%" in line]
    assert [p.split()[1] for p in percents] == [f"{n}%" for n in range(10, 101, 10)]
    assert len(lines) == 1 + 2 * 2 + 10


# ---- the download API ----------------------------------------------------------------------------


def test_the_downloaded_files_load_offline(hub, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = LocalModelSettings(model=PLAIN)
    assert not dl.is_cached(settings, cache_dir=cache)
    result = fetch(settings, hub, cache)
    assert set(hub.fetched(PLAIN)) == LOADER_FILES  # no .bin, .pth, .onnx, .gguf, README
    assert set(result.files) == LOADER_FILES and result.fetched_files == 6
    assert result.folder.parent.parent.name == "models--test--tiny-qwen3"
    assert dl.is_cached(settings, cache_dir=cache)
    tokenizer = AutoTokenizer.from_pretrained(PLAIN, cache_dir=cache, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(PLAIN, cache_dir=cache, local_files_only=True)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a fox"}], tokenize=False)

    hub.reset()
    again = fetch(settings, hub, cache)
    assert again.already_present and again.folder == result.folder
    assert [(method, status) for method, *_, status in hub.requests] == [("GET", 200)]  # the list


def test_z_images_text_encoder_comes_without_the_image_model(hub, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = LocalModelSettings(
        model=Z_IMAGE, subfolder="text_encoder", tokenizer_subfolder="tokenizer"
    )
    result = fetch(settings, hub, cache)
    assert hub.fetched(Z_IMAGE) == [
        "text_encoder/config.json",
        "text_encoder/generation_config.json",
        "text_encoder/model.safetensors",
        "tokenizer/chat_template.jinja",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ]
    assert sum(hub.served.values()) == result.total_bytes < 1_000_000  # the image model: 4 MB
    assert dl.is_cached(settings, cache_dir=cache)
    options = dict(cache_dir=cache, local_files_only=True)
    AutoTokenizer.from_pretrained(Z_IMAGE, subfolder="tokenizer", **options)
    AutoModelForCausalLM.from_pretrained(Z_IMAGE, subfolder="text_encoder", **options)


def test_a_wrong_subfolder_is_refused_before_anything_is_downloaded(hub, cache):
    settings = LocalModelSettings(model=Z_IMAGE)  # no subfolder: the top level has no model
    with pytest.raises(dl.NotLoadableError) as caught:
        fetch(settings, hub, cache)
    assert caught.value.message.startswith(f"{Z_IMAGE} cannot be loaded: the repo has no config")
    assert "subfolder" in caught.value.message and "\n" not in caught.value.message
    assert hub.served == {}


def test_a_dropped_connection_resumes_within_the_same_run(hub, cache, repos):
    hub.cut(BIG, "model.safetensors", after=CHUNK + 2_000_000)  # then the connection closes
    result = fetch(LocalModelSettings(model=BIG), hub, cache)
    weights = result.folder / "model.safetensors"
    assert sha256(weights) == sha256(repos[BIG] / "model.safetensors")
    ranges = [r for method, path, r, _ in hub.requests if method == "GET" and r]
    assert ranges == [f"bytes={CHUNK}-"]  # the chunk written before the cut was kept


@pytest.mark.parametrize("trouble", ["no network", "outage"])
def test_the_hub_unreachable_uses_a_complete_cached_copy_else_says_so(hub, cache, trouble):
    settings = LocalModelSettings(model=PLAIN)
    endpoint = f"http://127.0.0.1:{free_port()}" if trouble == "no network" else hub.endpoint
    hub.down = trouble == "outage"
    with pytest.raises(dl.HubUnreachableError) as caught:
        dl.download(settings, endpoint=endpoint, cache_dir=cache, token=False)
    start = {
        "no network": f"Cannot reach the Hugging Face Hub at {endpoint} to download {PLAIN} (",
        "outage": f"The Hugging Face Hub ({endpoint}) answered 503 for {PLAIN}; try again later",
    }[trouble]
    assert caught.value.message.startswith(start) and "\n" not in caught.value.message
    hub.down = False
    fetch(settings, hub, cache)
    hub.down = trouble == "outage"
    offline = dl.download(settings, endpoint=endpoint, cache_dir=cache, token=False)
    assert offline.already_present and not offline.hub_checked
    assert set(offline.files) == LOADER_FILES


def test_a_cache_missing_a_shard_is_not_complete(cache):
    snapshot = cache / "models--org--sharded" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--org--sharded" / "refs").mkdir()
    (cache / "models--org--sharded" / "refs" / "main").write_text("a" * 40)
    shards = {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
        (snapshot / name).write_text("{}")
    settings = LocalModelSettings(model="org/sharded")
    assert not dl.is_cached(settings, cache_dir=cache)
    (snapshot / "model-00002-of-00002.safetensors").write_text("{}")
    assert dl.cached_folder(settings, cache_dir=cache) == snapshot
    (snapshot / "tokenizer.json").unlink()
    assert not dl.is_cached(settings, cache_dir=cache)


@pytest.mark.parametrize(
    ("repo", "error", "start"),
    [
        ("test/no-such-repo", dl.RepoNotFoundError, "test/no-such-repo was not found on the Hug"),
        (GATED, dl.GatedRepoError, f"{GATED} is a gated model: accept its terms at http://127"),
    ],
)
def test_hub_refusals_are_one_line_that_says_what_to_do(hub, cache, repo, error, start):
    with pytest.raises(error) as caught:
        fetch(LocalModelSettings(model=repo), hub, cache)
    assert caught.value.message.startswith(start)
    assert "HF_TOKEN" in caught.value.message and "\n" not in caught.value.message


def test_too_little_disk_space_is_said_before_downloading(hub, cache, monkeypatch):
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(dl.DiskFullError) as caught:
        fetch(LocalModelSettings(model=PLAIN), hub, cache)
    assert caught.value.message.startswith(f"Not enough disk space to download {PLAIN}: it needs")
    assert "has 1000 B free" in caught.value.message and "HF_HOME" in caught.value.message
    assert hub.served == {}


# ---- the command ---------------------------------------------------------------------------------


def test_a_local_folder_is_already_present(project, cli, tiny_model_dir):
    result = cli("pull", "folder", "gpt-4o-mini")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"folder: {tiny_model_dir} is a local folder (6 files, ")
    assert result.stdout.rstrip().endswith("already present, nothing to download.")
    assert "gpt-4o-mini is not a local model (openai/gpt-4o-mini): it needs no download" in (
        result.stderr
    )


def test_the_default_checkpoint_comes_from_the_env_file_as_for_the_gateway(
    _isolated, cli, tiny_model_dir
):
    (_isolated / "proxy_config.yaml").write_text(
        "model_list:\n  - model_name: qwen3-4b\n    litellm_params:\n      model: zlocal/qwen3-4b\n"
    )
    (_isolated / ".env").write_text(f"LOCAL_LLM_MODEL={tiny_model_dir}\n")
    result = cli("pull")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"qwen3-4b: {tiny_model_dir} is a local folder")
    assert "LOCAL_LLM_MODEL" not in os.environ


def test_an_unknown_name_exits_2_naming_the_local_models(project, cli):
    result = cli("pull", "tiny", "nope")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "error: proxy_config.yaml has no model named 'nope'; its local models: tiny, zimage, "
        "big, missing, folder."
    )


def test_piped_progress_is_plain_lines_and_a_second_pull_finds_it_present(project, env, hub):
    done = pull(["tiny"], project, env)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr + done.stdout and "\x1b" not in done.stderr + done.stdout
    progress = done.stderr.splitlines()
    assert progress[0].startswith(f"Downloading {PLAIN}: 6 of 6 files, ")
    assert "  model.safetensors (453.2 KiB)" in progress and "  config.json: done" in progress
    assert progress[-1].startswith(f"Downloaded {PLAIN}: 6 files, ")
    cache = Path(env["HF_HUB_CACHE"])
    snapshot = cache / "models--test--tiny-qwen3" / "snapshots"
    [line] = done.stdout.splitlines()
    assert line.startswith(f"tiny: {PLAIN}: 6 files, ") and f"to {snapshot}/" in line
    assert set(hub.fetched(PLAIN)) == LOADER_FILES

    again = pull([], project, env | {"HF_HUB_OFFLINE": "1"})  # every local model; no Hub
    lines = dict(line.split(": ", 1) for line in again.stdout.splitlines())
    assert lines["tiny"].endswith("(the Hub was not reached to look for updates)")
    assert "already present in" in lines["tiny"] and "nothing to download" in lines["folder"]
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and all("HF_HUB_OFFLINE is set" in e for e in errors), again.stderr
    assert again.returncode == 1


def test_on_a_terminal_a_bar_is_drawn(project, env, hub):
    terminal = env | {"TERM": "xterm-256color", "COLUMNS": "120"}
    status, output = run_on_terminal([z_explorer(), "pull", "zimage"], terminal, cwd=project)
    assert status == 0, output
    assert "━" in output and "\x1b[" in output  # rich's bar, drawn with cursor control
    assert "zimage: test/z-image-tiny (text_encoder/, tokenizer/): 6 files, " in output


def test_a_missing_repo_is_one_error_line(project, env, hub):
    (project / ".env").write_text("HF_TOKEN=hf_from_the_env_file\n")  # read as the gateway would
    done = pull(["missing"], project, env)
    assert hub.authorizations == ["Bearer hf_from_the_env_file"]
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: missing: test/no-such-repo was not found on the Hugging Face Hub "
        f"({hub.endpoint}): check the repo id after zlocal/ in proxy_config.yaml; if the repo is "
        "private, set HF_TOKEN to a token that can read it."
    ]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_keeps_what_came_and_the_next_pull_resumes(project, env, hub, repos):
    hub.cut(BIG, "model.safetensors", after=CHUNK + 5_000_000, stall=True)
    child = subprocess.Popen(
        [z_explorer(), "pull", "big"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal delivers it: a child inherits an ignored SIGINT from its parent
        # (a test worker in which something left it ignored), and Python then never installs its
        # KeyboardInterrupt handler: the interrupt went unanswered in full runs.
        preexec_fn=_default_sigint,
    )
    blobs = Path(env["HF_HUB_CACHE"]) / "models--test--big" / "blobs"
    deadline = time.monotonic() + 60
    while not [p for p in blobs.glob("*.incomplete") if p.stat().st_size >= CHUNK]:
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert out == "" and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "error: interrupted while downloading big: what was downloaded is kept; run z-explorer "
        "pull again to resume."
    )

    hub.release()
    hub.reset()
    done = pull(["big"], project, env)
    assert done.returncode == 0, done.stderr
    assert "  model.safetensors (24.0 MiB, resuming at 10.0 MiB)" in done.stderr.splitlines()
    assert hub.served[f"{BIG}/model.safetensors"] == BIG_SIZE - CHUNK
    [blob] = [p for p in blobs.iterdir() if p.stat().st_size == BIG_SIZE]
    assert sha256(blob) == sha256(repos[BIG] / "model.safetensors")
    assert not list(blobs.glob("*.incomplete"))
