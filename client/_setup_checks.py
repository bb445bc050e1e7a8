"""What ``z-explorer setup`` checks on this machine before it writes anything: a model folder's
shape, whether Z-Image is already in the Hugging Face cache, whether Ollama answers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx

from client._providers import SetupError

OLLAMA_DEFAULT = "http://localhost:11434"
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or Path(text).exists()


def check_local_folder(source: str, folders: dict[str, str] | None = None) -> str:
    """``source`` as a repo id, or as the absolute path of an existing folder with the model's
    files where the loader looks (``folders``: the ``subfolder`` and ``tokenizer_subfolder`` a
    model_info gives). Absolute, because the gateway may run from another folder, and a bare
    relative name there (``zlocal/mymodel``) would mean the default model."""
    source = source.strip()
    if not source:
        raise SetupError("Please enter a Hugging Face repo id or a folder.")
    if not looks_like_path(source):
        if not _REPO_ID.fullmatch(source):
            raise SetupError(f"{source!r} is neither a folder here nor a repo id (owner/name).")
        return source
    path = Path(os.path.abspath(Path(source).expanduser()))
    model = (folders or {}).get("subfolder", "")
    tokenizer = (folders or {}).get("tokenizer_subfolder", "")
    if not path.is_dir():
        raise SetupError(f"{source} is not a folder.")
    if not (path / model / "config.json").is_file():
        raise SetupError(f"{path / model} has no config.json: is it a model folder?")
    if tokenizer and not (path / tokenizer).is_dir():
        raise SetupError(f"{path} has no {tokenizer}/ folder.")
    return str(path)


def z_image_cache_note(source: str) -> str:
    """Whether loading Z-Image's text encoder from ``source`` downloads anything."""
    if looks_like_path(source):
        return f"The text encoder is read from {Path(source).expanduser()}/text_encoder."
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "text_encoder/config.json")
    except Exception:  # an odd cache or repo id: say nothing certain
        cached = None
    if isinstance(cached, str):
        return f"{source} is in your Hugging Face cache: nothing to download."
    return (
        f"{source} is not in your Hugging Face cache: the first request downloads its "
        "text_encoder and tokenizer (about 8 GB), not the whole image model."
    )


def ollama_status(tag: str, base: str | None = None) -> str:
    """One line: whether Ollama answers and has ``tag`` pulled."""
    base = (base or os.environ.get("OLLAMA_API_BASE") or OLLAMA_DEFAULT).rstrip("/")
    try:
        response = httpx.get(f"{base}/api/tags", timeout=2.0)
        response.raise_for_status()
        names = {m.get("name") for m in response.json().get("models", [])}
    except (httpx.HTTPError, ValueError):
        return (
            f"Ollama does not answer at {base}: install it from https://ollama.com, start it "
            f"(`ollama serve`) and run `ollama pull {tag}` (set OLLAMA_API_BASE if it runs "
            "elsewhere)."
        )
    if tag in names or f"{tag}:latest" in names:
        return f"✓ Ollama answers at {base} and has {tag}."
    return f"Ollama answers at {base} but has no {tag}: run `ollama pull {tag}`."
