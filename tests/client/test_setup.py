"""``z-explorer setup`` without a gateway: the wizard driven on a real pseudo-terminal (pexpect),
the options for scripts in-process, and what ends up in ``.env`` and ``proxy_config.yaml``.

Each test runs in its own folder with a copy of the project's proxy_config.yaml; the doctor step
at the end points at a free port, where nothing answers. The local entries setup writes are read
back with the gateway's own parser (``custom_handlers.inference.catalog``)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest
from ruamel.yaml import YAML

from custom_handlers.inference.catalog import local_entries
from tests.client.conftest import assert_one_line_error
from tests.servers import CONFIG, free_port

DOWN, ENTER, CTRL_C, CTRL_U = "\x1b[B", "\r", "\x03", "\x15"
USER_ENV = "# my settings\nexport FOO=bar\n\n# the library\nLOCAL_LIBRARY_DIR=./mine\n"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DEFAULT_CHECKPOINT = "unsloth/Qwen3-4B-Instruct-2507-bnb-4bit"
SETUP_VARS = ("LOCAL_LLM_MODEL", "LOCAL_LLM_SUBFOLDER", "LOCAL_LLM_TOKENIZER_SUBFOLDER")


@pytest.fixture
def project(_isolated, monkeypatch) -> Path:
    """The working folder: a copy of proxy_config.yaml, a user's .env, no gateway running."""
    shutil.copy(CONFIG, _isolated / "proxy_config.yaml")
    env = _isolated / ".env"
    env.write_text(USER_ENV)
    env.chmod(0o644)
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("LOCAL_LIBRARY_DIR")
    monkeypatch.delenv("Z_EXPLORER_GATEWAY_CONFIG", raising=False)
    for name in [n for n in os.environ if n.startswith("LOCAL_LLM_")]:
        monkeypatch.delenv(name)
    return _isolated


def env_of(folder: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return dict(dotenv_values(folder / ".env"))


def models_in(path: Path) -> dict[str, str]:
    data = YAML(typ="safe").load(path.read_text())
    return {m["model_name"]: m["litellm_params"]["model"] for m in data["model_list"]}


def local_models_in(path: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (checkpoint, weights folder, tokenizer folder), as the gateway reads the file."""
    data = YAML(typ="safe").load(path.read_text())
    entries = local_entries(data, foreign_keys={"disable_background_health_check"})
    return {
        e.name: (e.checkpoint, e.settings.model_folder, e.settings.tokenizer_folder)
        for e in entries
    }


def entry_in(path: Path, name: str) -> dict:
    data = YAML(typ="safe").load(path.read_text())
    return next(m for m in data["model_list"] if m["model_name"] == name)


def added_block(name: str, model: str, **info) -> str:
    """The text setup appends to proxy_config.yaml's model_list for a local model."""
    lines = [
        "",
        "  # Added by z-explorer setup.",
        f"  - model_name: {name}",
        "    litellm_params:",
        f"      model: zlocal/{model}",
        "      num_retries: 0",
        "    model_info:",
        *(f"      {key}: {value}" for key, value in info.items()),
        "      disable_background_health_check: true",
    ]
    return "\n".join(lines) + "\n"


def assert_added_to_config(folder: Path, block: str) -> None:
    """proxy_config.yaml is the shipped one with ``block`` after the last model, nothing else:
    its comments, order and layout are kept."""
    original = CONFIG.read_text()
    split = original.index("\nlitellm_settings:")
    edited = (folder / "proxy_config.yaml").read_text()
    assert edited == original[:split] + block + original[split:]


def z_image_folder(parent: Path, tiny_model_dir: Path) -> Path:
    """A downloaded Z-Image's layout: text_encoder/ with a config.json, and tokenizer/."""
    z_image = parent / "Z-Image-Turbo"
    (z_image / "text_encoder").mkdir(parents=True)
    (z_image / "tokenizer").mkdir()
    shutil.copy(tiny_model_dir / "config.json", z_image / "text_encoder")
    return z_image


def owner_only(path: Path) -> bool:
    return path.stat().st_mode & 0o777 == 0o600


def assert_kept_users_lines(folder: Path) -> None:
    text = (folder / ".env").read_text()
    assert text.startswith(USER_ENV), text


def assert_yaml_untouched(folder: Path) -> None:
    assert (folder / "proxy_config.yaml").read_text() == CONFIG.read_text()


# ---- the wizard on a terminal -------------------------------------------------------------------


class Terminal:
    """``z-explorer setup`` on a pseudo-terminal, as a person at a keyboard runs it."""

    def __init__(self, cwd: Path, *args: str):
        command = str(Path(sys.executable).with_name("z-explorer"))
        env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.child = pexpect.spawn(
            command,
            ["setup", *args],
            cwd=str(cwd),
            env=env,
            encoding="utf-8",
            timeout=30,
            dimensions=(50, 120),
        )
        self.seen = ""

    def answer(self, question: str, *keys: str) -> None:
        """Wait for ``question``, then type ``keys``."""
        self.child.expect_exact(question)
        self.seen += self.child.before + self.child.after
        for key in keys:
            self.child.send(key)

    def finish(self) -> tuple[int, str]:
        self.child.expect(pexpect.EOF)
        self.child.close()
        self.seen += self.child.before
        return self.child.exitstatus, ANSI.sub("", self.seen)


def test_wizard_cloud_with_the_key_saved_on_request(project):
    term = Terminal(project)
    term.answer("LLM:", DOWN, ENTER)  # 2. Cloud API
    term.answer("Provider:", ENTER)  # OpenAI
    term.answer("Model:", DOWN, ENTER)  # gpt-4o
    term.answer("Where should the gateway find OPENAI_API_KEY?", DOWN, ENTER)  # save in .env
    term.answer("OPENAI_API_KEY:", "sk-typed-in-the-wizard-0123", ENTER)
    term.answer("Save these changes?", ENTER)
    status, screen = term.finish()

    assert status == 0, screen
    assert "get one at https://platform.openai.com/api-keys" in screen
    assert "sk-typed-in-the-wizard-0123" not in screen  # typed hidden, shown masked
    assert "proxy_config.yaml: add model gpt-4o (openai/gpt-4o)" in screen
    env = env_of(project)
    assert env["LLM_MODEL"] == "gpt-4o"
    assert env["OPENAI_API_KEY"] == "sk-typed-in-the-wizard-0123"
    assert env["LITELLM_MASTER_KEY"].startswith("sk-") and len(env["LITELLM_MASTER_KEY"]) > 40
    assert owner_only(project / ".env")
    assert_kept_users_lines(project)
    assert models_in(project / "proxy_config.yaml")["gpt-4o"] == "openai/gpt-4o"
    assert "✗ gateway: Nothing answers at" in screen
    assert "uv run z-explorer-gateway" in screen.split("✗ gateway")[1]


def test_wizard_cloud_by_default_prints_the_export_line_and_writes_no_key(project):
    term = Terminal(project)
    term.answer("LLM:", "2", ENTER)  # the shortcut key works too
    term.answer("Provider:", "2", ENTER)  # Anthropic
    term.answer("Model:", ENTER)  # claude-haiku-4-5
    term.answer("Where should the gateway find ANTHROPIC_API_KEY?", ENTER)  # my shell
    term.answer("Save these changes?", ENTER)
    status, screen = term.finish()

    assert status == 0, screen
    assert "export ANTHROPIC_API_KEY=<your key>" in screen
    assert "https://console.anthropic.com/settings/keys" in screen
    env = env_of(project)
    assert env["LLM_MODEL"] == "claude-haiku"
    assert "ANTHROPIC_API_KEY" not in env
    assert_yaml_untouched(project)  # claude-haiku is already there


def test_wizard_local_model_from_a_folder(project, tiny_model_dir):
    name = tiny_model_dir.name.lower()
    term = Terminal(project)
    term.answer("LLM:", ENTER)  # 1. Local, the default
    term.answer("Checkpoint", CTRL_U, str(tiny_model_dir), ENTER)
    term.answer("Save these changes?", ENTER)
    status, screen = term.finish()

    assert status == 0, screen
    assert "setup adds that entry unless the file has one" in screen
    assert f"proxy_config.yaml: add model {name} (zlocal/{tiny_model_dir}, num_retries: 0" in screen
    env = env_of(project)
    assert env["LLM_MODEL"] == name
    assert not set(SETUP_VARS) & set(env)
    assert owner_only(project / ".env")
    assert_kept_users_lines(project)
    assert_added_to_config(project, added_block(name, str(tiny_model_dir)))
    assert local_models_in(project / "proxy_config.yaml")[name] == (str(tiny_model_dir), "", "")


def test_wizard_z_image_text_encoder(project, tiny_model_dir):
    z_image = z_image_folder(project, tiny_model_dir)
    term = Terminal(project)
    term.answer("LLM:", "3", ENTER)
    term.answer("Z-Image (Hugging Face repo id", CTRL_U, "./nowhere", ENTER)
    term.answer("not a folder")  # the question stays until the answer is usable
    term.child.send(CTRL_U + str(z_image) + ENTER)
    term.answer("Save these changes?", ENTER)
    status, screen = term.finish()

    assert status == 0, screen
    assert f"read from {z_image}/text_encoder" in screen
    assert "proxy_config.yaml: add model z-image-text-encoder" in screen
    env = env_of(project)
    assert env["LLM_MODEL"] == "z-image-text-encoder"
    assert not set(SETUP_VARS) & set(env)
    assert local_models_in(project / "proxy_config.yaml")["z-image-text-encoder"] == (
        str(z_image),
        "text_encoder",
        "tokenizer",
    )


def test_ctrl_c_leaves_everything_as_it_was(project):
    before = {p.name: (p.read_bytes(), p.stat().st_mode) for p in project.iterdir()}
    term = Terminal(project)
    term.answer("LLM:", DOWN, ENTER)
    term.answer("Provider:", ENTER)
    term.answer("Model:", CTRL_C)
    status, screen = term.finish()

    assert status == 130, screen
    assert "Setup cancelled: nothing was changed." in screen
    after = {p.name: (p.read_bytes(), p.stat().st_mode) for p in project.iterdir()}
    assert after == before  # same files, same bytes, same permissions, no temporary files


def test_answering_no_at_the_end_changes_nothing(project):
    before = (project / ".env").read_bytes()
    term = Terminal(project)
    term.answer("LLM:", ENTER)
    term.answer("Checkpoint", ENTER)
    term.answer("Save these changes?", "n", ENTER)
    status, screen = term.finish()
    assert (status, "Nothing was changed." in screen) == (0, True)
    assert (project / ".env").read_bytes() == before
    assert_yaml_untouched(project)


def test_rerunning_the_wizard_with_enter_throughout_changes_nothing(project, cli):
    assert cli("setup", "--provider", "openai", "--model", "gpt-4o").exit_code == 0
    env_before = (project / ".env").read_bytes()
    yaml_before = (project / "proxy_config.yaml").read_bytes()
    stamps = [(project / name).stat().st_mtime_ns for name in (".env", "proxy_config.yaml")]

    term = Terminal(project)
    term.answer("LLM:", ENTER)  # the current choice is the default: Cloud
    term.answer("Provider:", ENTER)  # OpenAI
    term.answer("Model:", ENTER)  # gpt-4o
    term.answer("Where should the gateway find OPENAI_API_KEY?", ENTER)
    status, screen = term.finish()

    assert status == 0, screen
    assert "Nothing to change" in screen and "Save these changes?" not in screen
    assert (project / ".env").read_bytes() == env_before
    assert (project / "proxy_config.yaml").read_bytes() == yaml_before
    assert [(project / n).stat().st_mtime_ns for n in (".env", "proxy_config.yaml")] == stamps


def test_rerunning_the_wizard_on_a_local_entry_changes_nothing(project, cli):
    assert cli("setup", "--local", "--local-model", "Qwen/Qwen3-1.7B").exit_code == 0
    before = {n: (project / n).read_bytes() for n in (".env", "proxy_config.yaml")}

    term = Terminal(project)
    term.answer("LLM:", ENTER)  # Local: the current choice
    term.answer("Checkpoint", ENTER)  # Qwen/Qwen3-1.7B, what the entry loads
    status, screen = term.finish()

    assert status == 0, screen
    assert "Nothing to change" in screen
    assert {n: (project / n).read_bytes() for n in before} == before


# ---- the options, for scripts -------------------------------------------------------------------


def test_local_default_uses_the_shipped_entry_and_says_what_to_run_next(project, cli):
    result = cli("setup", "--local")
    assert result.exit_code == 0, result.stderr
    env = env_of(project)
    assert env["LLM_MODEL"] == "qwen3-4b"
    assert not set(SETUP_VARS) & set(env)
    assert env["LITELLM_MASTER_KEY"].startswith("sk-")
    assert owner_only(project / ".env")
    assert_kept_users_lines(project)
    assert_yaml_untouched(project)  # zlocal/qwen3-4b is the default checkpoint
    assert local_models_in(project / "proxy_config.yaml")["qwen3-4b"][0] == DEFAULT_CHECKPOINT
    assert "✓ settings:" in result.stdout and "✗ gateway: Nothing answers" in result.stdout
    assert "Next: start the gateway in this folder" in result.stderr
    assert "uv run z-explorer-gateway" in result.stderr


def test_local_default_without_a_local_entry_adds_one(project, cli):
    config = project / "proxy_config.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: gpt-4o-mini   # cloud\n"
        "    litellm_params:\n"
        "      model: openai/gpt-4o-mini\n"
        "# the rest\n"
        "litellm_settings:\n"
        "  drop_params: false\n"
    )
    result = cli("setup", "--local")
    assert result.exit_code == 0, result.stderr
    assert config.read_text() == (
        "model_list:\n"
        "  - model_name: gpt-4o-mini   # cloud\n"
        "    litellm_params:\n"
        "      model: openai/gpt-4o-mini\n"
        f"{added_block('qwen3-4b', DEFAULT_CHECKPOINT)[1:]}"
        "# the rest\n"
        "litellm_settings:\n"
        "  drop_params: false\n"
    )
    assert env_of(project)["LLM_MODEL"] == "qwen3-4b"
    assert local_models_in(config) == {"qwen3-4b": (DEFAULT_CHECKPOINT, "", "")}


def test_local_default_on_macos_is_an_unquantized_checkpoint(project, cli, monkeypatch):
    monkeypatch.setattr("client._setup.sys", SimpleNamespace(platform="darwin"))
    result = cli("setup", "--local")
    assert result.exit_code == 0, result.stderr
    # qwen3-4b names the 4-bit checkpoint, which macOS cannot load: a name of its own.
    assert_added_to_config(
        project, added_block("qwen3-4b-instruct-2507", "Qwen/Qwen3-4B-Instruct-2507")
    )
    assert env_of(project)["LLM_MODEL"] == "qwen3-4b-instruct-2507"
    assert cli("setup", "--yes").exit_code == 0
    assert "Nothing to change" in cli("setup", "--local").stderr


def test_local_repo_id_gets_an_entry_named_after_it(project, cli):
    result = cli("setup", "--local", "--local-model", "Qwen/Qwen3-1.7B")
    assert result.exit_code == 0, result.stderr
    assert (
        "proxy_config.yaml: add model qwen3-1.7b (zlocal/Qwen/Qwen3-1.7B, num_retries: 0, "
        "disable_background_health_check: true)" in result.stderr
    )
    assert_added_to_config(project, added_block("qwen3-1.7b", "Qwen/Qwen3-1.7B"))
    assert env_of(project)["LLM_MODEL"] == "qwen3-1.7b"
    assert not set(SETUP_VARS) & set(env_of(project))
    assert local_models_in(project / "proxy_config.yaml")["qwen3-1.7b"] == (
        "Qwen/Qwen3-1.7B",
        "",
        "",
    )


def test_local_folder_is_written_as_an_absolute_path(project, cli, tiny_model_dir):
    shutil.copytree(tiny_model_dir, project / "models" / "My Qwen")
    result = cli("setup", "--local", "--local-model", "models/My Qwen")
    assert result.exit_code == 0, result.stderr
    folder = str(project / "models" / "My Qwen")  # the gateway may start in another folder
    assert_added_to_config(project, added_block("my-qwen", folder))
    assert env_of(project)["LLM_MODEL"] == "my-qwen"
    assert local_models_in(project / "proxy_config.yaml")["my-qwen"] == (folder, "", "")


def test_rerunning_a_local_choice_changes_nothing(project, cli, tiny_model_dir):
    for args in (
        ["--local"],
        ["--local", "--local-model", "Qwen/Qwen3-1.7B"],
        ["--local", "--local-model", str(tiny_model_dir)],
        ["--z-image"],
    ):
        assert cli("setup", *args).exit_code == 0
        files = {n: (project / n).read_bytes() for n in (".env", "proxy_config.yaml")}
        again = cli("setup", *args)
        assert "Nothing to change" in again.stderr, args
        assert {n: (project / n).read_bytes() for n in files} == files, args
    assert list(local_models_in(project / "proxy_config.yaml")) == [
        "qwen3-4b",
        "qwen3-1.7b",
        tiny_model_dir.name.lower(),
        "z-image-text-encoder",
    ]
    switched = cli("setup", "--local", "--local-model", "Qwen/Qwen3-1.7B")  # back to one
    assert "  .env: LLM_MODEL=qwen3-1.7b (was z-image-text-encoder)" in switched.stderr
    assert "add model" not in switched.stderr


def test_a_local_alias_is_used_once_and_taken_names_are_not(project, cli):
    args = ("setup", "--local", "--local-model", "Qwen/Qwen3-1.7B", "--alias", "small")
    assert cli(*args).exit_code == 0
    assert "Nothing to change" in cli(*args).stderr
    assert local_models_in(project / "proxy_config.yaml")["small"][0] == "Qwen/Qwen3-1.7B"
    # A derived name that another model has gets a number.
    assert cli("setup", "--local", "--local-model", "someone/small").exit_code == 0
    assert env_of(project)["LLM_MODEL"] == "small-2"
    assert local_models_in(project / "proxy_config.yaml")["small-2"][0] == "someone/small"


def test_a_new_cloud_model_is_added_keeping_the_files_comments_and_order(project, cli):
    result = cli("setup", "--provider", "openai", "--model", "gpt-4o")
    assert result.exit_code == 0, result.stderr
    original, edited = CONFIG.read_text(), (project / "proxy_config.yaml").read_text()
    added = (
        "\n  # Added by z-explorer setup.\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params:\n"
        "      model: openai/gpt-4o\n"
    )
    split = original.index("\nlitellm_settings:")
    assert edited == original[:split] + added + original[split:]
    assert list(models_in(project / "proxy_config.yaml")) == [
        "qwen3-4b",
        "gpt-4o-mini",
        "claude-haiku",
        "ollama-qwen3",
        "gpt-4o",
    ]
    assert env_of(project)["LLM_MODEL"] == "gpt-4o"
    assert "OPENAI_API_KEY" not in env_of(project)
    assert "export OPENAI_API_KEY=<your key>" in result.stderr


def test_a_users_own_yaml_keeps_its_layout(project, cli):
    custom = (
        "# my gateway\n"
        "model_list:\n"
        "- model_name: qwen3-4b   # local\n"
        "  litellm_params: {model: zlocal/qwen3-4b}\n"
        "# routing below\n"
        "router_settings:\n"
        "  fallbacks: [{qwen3-4b: [gpt-4o-mini]}]\n"
    )
    (project / "proxy_config.yaml").write_text(custom)
    assert cli("setup", "--provider", "anthropic", "--model", "claude-sonnet-4-5").exit_code == 0
    assert (project / "proxy_config.yaml").read_text() == custom.replace(
        "# routing below\n",
        "# Added by z-explorer setup.\n"
        "- model_name: claude-sonnet\n"
        "  litellm_params:\n"
        "    model: anthropic/claude-sonnet-4-5\n"
        "# routing below\n",
    )


def test_rerunning_changes_only_what_the_user_changed(project, cli):
    assert cli("setup", "--provider", "openai", "--model", "gpt-4o").exit_code == 0
    first = env_of(project)
    yaml_once = (project / "proxy_config.yaml").read_text()

    again = cli("setup", "--provider", "openai", "--model", "gpt-4o")
    assert "Nothing to change" in again.stderr
    assert (project / "proxy_config.yaml").read_text() == yaml_once  # no second entry

    switched = cli("setup", "--provider", "anthropic")
    assert switched.exit_code == 0
    assert [line for line in switched.stderr.splitlines() if line.startswith("  ")][:1] == [
        "  .env: LLM_MODEL=claude-haiku (was gpt-4o)"
    ]
    assert env_of(project) == {**first, "LLM_MODEL": "claude-haiku"}  # same gateway key
    assert (project / "proxy_config.yaml").read_text() == yaml_once


def test_switching_between_local_and_z_image(project, cli, tiny_model_dir):
    z_image = z_image_folder(project, tiny_model_dir)
    result = cli("setup", "--z-image", "--local-model", str(z_image))
    assert result.exit_code == 0, result.stderr
    assert f"The text encoder is read from {z_image}/text_encoder." in result.stderr
    assert "subfolder: text_encoder, tokenizer_subfolder: tokenizer" in result.stderr
    assert env_of(project)["LLM_MODEL"] == "z-image-text-encoder"
    assert cli("setup", "--local").exit_code == 0
    assert env_of(project)["LLM_MODEL"] == "qwen3-4b"
    assert local_models_in(project / "proxy_config.yaml") == {
        "qwen3-4b": (DEFAULT_CHECKPOINT, "", ""),
        "z-image-text-encoder": (str(z_image), "text_encoder", "tokenizer"),
    }


def test_z_image_from_the_hub_by_default(project, cli):
    result = cli("setup", "--z-image")
    assert result.exit_code == 0, result.stderr
    assert "Tongyi-MAI/Z-Image-Turbo is" in result.stderr and "Hugging Face cache" in result.stderr
    block = added_block(
        "z-image-text-encoder",
        "Tongyi-MAI/Z-Image-Turbo",
        subfolder="text_encoder",
        tokenizer_subfolder="tokenizer",
    )
    assert_added_to_config(project, block)  # comments, order and layout kept
    assert env_of(project)["LLM_MODEL"] == "z-image-text-encoder"
    assert entry_in(project / "proxy_config.yaml", "z-image-text-encoder")["model_info"] == {
        "subfolder": "text_encoder",
        "tokenizer_subfolder": "tokenizer",
        "disable_background_health_check": True,
    }


EARLIER_Z_IMAGE = (
    "LLM_MODEL=qwen3-4b\n"
    "LOCAL_LLM_MODEL=Tongyi-MAI/Z-Image-Turbo\n"
    "LOCAL_LLM_SUBFOLDER=text_encoder\n"
    "LOCAL_LLM_TOKENIZER_SUBFOLDER=tokenizer\n"
    "LITELLM_MASTER_KEY=sk-earlier-setup-key-0123456789\n"
)


def test_an_earlier_setups_local_lines_are_kept_and_new_entries_ignore_them(
    project, cli, monkeypatch
):
    """Before local models were entries, setup wrote Z-Image as LOCAL_LLM_* lines that make the
    shipped qwen3-4b load Z-Image's encoder. They stay (qwen3-4b still needs them); a new entry
    does not inherit their subfolders."""
    (project / ".env").write_text(EARLIER_Z_IMAGE)
    assert "Nothing to change" in cli("setup", "--yes").stderr  # qwen3-4b is Z-Image's, as before
    assert "Nothing to change" in cli("setup", "--z-image").stderr

    result = cli("setup", "--local", "--local-model", "Qwen/Qwen3-1.7B")
    assert result.exit_code == 0, result.stderr
    assert (
        ".env: kept LOCAL_LLM_MODEL, LOCAL_LLM_SUBFOLDER, LOCAL_LLM_TOKENIZER_SUBFOLDER (the "
        "defaults of local entries that do not set their own): qwen3-1.7b does not depend on "
        "these lines" in result.stderr
    )
    assert (project / ".env").read_text() == EARLIER_Z_IMAGE.replace(
        "LLM_MODEL=qwen3-4b", "LLM_MODEL=qwen3-1.7b"
    )
    assert_added_to_config(
        project,
        added_block("qwen3-1.7b", "Qwen/Qwen3-1.7B", subfolder="''", tokenizer_subfolder="''"),
    )
    for line in EARLIER_Z_IMAGE.splitlines()[1:4]:  # the gateway's environment, from .env
        monkeypatch.setenv(*line.split("=", 1))
    assert local_models_in(project / "proxy_config.yaml") == {
        "qwen3-4b": ("Tongyi-MAI/Z-Image-Turbo", "text_encoder", "tokenizer"),
        "qwen3-1.7b": ("Qwen/Qwen3-1.7B", "", ""),
    }


def test_save_key_stores_the_key_from_the_environment(project, cli, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-my-shell-0123456789")
    result = cli("setup", "--provider", "openai", "--model", "gpt-4o-mini", "--save-key")
    assert result.exit_code == 0, result.stderr
    assert env_of(project)["OPENAI_API_KEY"] == "sk-from-my-shell-0123456789"
    assert owner_only(project / ".env")
    assert "sk-from-my-shell-0123456789" not in result.stdout + result.stderr


def test_save_key_without_a_key_is_one_clear_line(project, cli):
    result = cli("setup", "--provider", "openai", "--save-key")
    assert_one_line_error(result, "--save-key saves OPENAI_API_KEY", "export OPENAI_API_KEY=")
    assert (project / ".env").read_text() == USER_ENV


def test_other_provider_takes_a_litellm_model_id(project, cli):
    result = cli("setup", "--provider", "other", "--model", "gemini/gemini-2.5-flash")
    assert result.exit_code == 0, result.stderr
    assert models_in(project / "proxy_config.yaml")["gemini-2.5-flash"] == "gemini/gemini-2.5-flash"
    assert env_of(project)["LLM_MODEL"] == "gemini-2.5-flash"
    assert "export GEMINI_API_KEY=<your key>" in result.stderr
    assert "https://docs.litellm.ai/docs/providers/gemini" in result.stderr


def test_ollama_needs_no_key(project, cli, monkeypatch):
    monkeypatch.setenv("OLLAMA_API_BASE", f"http://127.0.0.1:{free_port()}")
    result = cli("setup", "--provider", "ollama", "--model", "llama3.2")
    assert result.exit_code == 0, result.stderr
    assert models_in(project / "proxy_config.yaml")["ollama-llama3.2"] == "ollama_chat/llama3.2"
    assert "export" not in result.stderr
    assert "Ollama does not answer at" in result.stderr and "ollama pull llama3.2" in result.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--provider", "nope"], ["Unknown provider 'nope'", "openai, anthropic, ollama, other"]),
        (["--provider", "other", "--model", "nope/x"], ["LiteLLM does not know the provider"]),
        (["--provider", "other"], ["--provider other needs --model"]),
        (
            ["--provider", "openai", "--model", "gpt-4o", "--alias", "qwen3-4b"],
            ["already has a model named 'qwen3-4b'", "--alias"],
        ),
        (["--local", "--provider", "openai"], ["choose one of --local, --z-image and --provider"]),
        (["--local", "--local-model", "./no/such/folder"], ["is not a folder"]),
        (["--local", "--model", "gpt-4o"], ["--local-model"]),
        (
            ["--local", "--local-model", "Qwen/Qwen3-1.7B", "--alias", "gpt-4o-mini"],
            ["already has a model named 'gpt-4o-mini'", "openai/gpt-4o-mini", "--alias"],
        ),
        (
            ["--z-image", "--alias", "qwen3-4b"],  # qwen3-4b loads another checkpoint
            ["already has a model named 'qwen3-4b'", "zlocal/Tongyi-MAI/Z-Image-Turbo"],
        ),
        (["--alias", "mine", "--yes"], ["--alias goes with --provider, --local or --z-image"]),
    ],
)
def test_impossible_choices_are_one_line_and_change_nothing(project, cli, args, needles):
    assert_one_line_error(cli("setup", *args), *needles)
    assert (project / ".env").read_text() == USER_ENV
    assert_yaml_untouched(project)


def test_without_a_terminal_or_options_it_says_how_to_script_it(project, cli):
    assert_one_line_error(cli("setup"), "--local", "--provider NAME", "--yes")


def test_without_proxy_config_it_names_the_setting(project, cli):
    (project / "proxy_config.yaml").unlink()
    assert_one_line_error(cli("setup", "--local"), "proxy_config.yaml not found", "Z_EXPLORER")


def test_the_config_named_by_z_explorer_gateway_config_is_edited(project, cli, monkeypatch):
    other = project / "elsewhere.yaml"
    os.rename(project / "proxy_config.yaml", other)
    monkeypatch.setenv("Z_EXPLORER_GATEWAY_CONFIG", str(other))
    assert cli("setup", "--provider", "openai", "--model", "gpt-4o").exit_code == 0
    assert "gpt-4o" in models_in(other)


def test_yes_keeps_the_current_choice_or_takes_the_defaults(project, cli):
    assert cli("setup", "--yes").exit_code == 0
    assert env_of(project)["LLM_MODEL"] == "qwen3-4b"
    assert cli("setup", "--provider", "anthropic").exit_code == 0
    result = cli("setup", "--yes")
    assert "Nothing to change" in result.stderr
    assert env_of(project)["LLM_MODEL"] == "claude-haiku"


def test_a_shell_variable_that_would_win_over_the_file_is_pointed_out(project, cli, monkeypatch):
    monkeypatch.setenv("LLM_MODEL", "gpt-4o-mini")
    result = cli("setup", "--local")
    assert "warning: LLM_MODEL is also set in this shell's environment" in result.stderr
    assert "unset LLM_MODEL" in result.stderr


def test_client_settings_alone_need_no_proxy_config(_isolated, cli, monkeypatch):
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", f"http://127.0.0.1:{free_port()}")
    result = cli("setup", "--url", "http://gpu-box:4000", "--key", "sk-remote", "--model", "x")
    assert result.exit_code == 0, result.stderr
    assert env_of(_isolated) == {
        "LITELLM_PROXY_API_BASE": "http://gpu-box:4000",
        "LITELLM_PROXY_API_KEY": "sk-remote",
        "LLM_MODEL": "x",
    }


class _Alive(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def running_gateway(monkeypatch):
    """Something that answers /health/liveliness, as a gateway started before setup ran."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Alive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LITELLM_PROXY_API_BASE", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()


def test_a_gateway_running_with_the_old_settings_is_to_be_restarted(project, cli, running_gateway):
    result = cli("setup", "--provider", "openai", "--model", "gpt-4o")
    assert result.exit_code == 0, result.stderr
    assert "is running with the old settings" in result.stderr
    assert "uv run z-explorer-gateway" in result.stderr and "z-explorer doctor" in result.stderr
    assert result.stdout == ""  # no check against a gateway that does not know the model yet


def test_a_settings_problem_found_by_the_check_exits_1(project, cli, monkeypatch):
    monkeypatch.setenv("LLM_TIMEOUT", "soon")
    result = cli("setup", "--local")
    assert result.exit_code == 1
    assert "✗ setting: LLM_TIMEOUT='soon' is not a number" in result.stdout
    assert env_of(project)["LLM_MODEL"] == "qwen3-4b"  # saved all the same
