"""The one owner of the local model: loading, device, dtype, quantization, device memory.

``ModelHolder.get()`` loads the model on first use, once, however many requests ask at the same
time. torch and transformers are imported here, on that first load, and nowhere earlier.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from custom_handlers.inference.constraints import JsonConstraints
from custom_handlers.inference.download import (
    DownloadError,
    LogProgress,
    Progress,
    download,
    is_cached,
    size_text,
)
from custom_handlers.inference.errors import ModelUnavailableError, drop_frames
from custom_handlers.inference.packed import use_packed_attention
from custom_handlers.inference.settings import (
    DEFAULT_MODEL,
    LocalModelSettings,
    gateway_workers,
    several_workers_problem,
)

log = logging.getLogger("custom_handlers.loader")

# A failed load is not retried for this long, so a burst of requests costs one attempt, not one
# each; after it, the next request tries again (the user may have fixed the path or the network).
RETRY_AFTER_FAILURE_S = 5.0


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    quantization: str  # "none", "bnb-4bit" (quantized on load) or "pre-quantized (<method>)"
    context_length: int
    max_token_chars: int  # the longest text one token stands for
    eos_token_ids: frozenset[int]
    pad_token_id: int
    generation_defaults: dict[str, Any]
    load_seconds: float
    model_bytes: int  # parameters and buffers, as placed (4-bit weights count as 4-bit)
    constraints: JsonConstraints
    packed: bool = False  # runs packed steps (packed.py: chunked prefill); SDPA models do


class DownloadWatch(LogProgress):
    """The gateway log's download lines, and how far the download is (for callers who wait)."""

    def __init__(self, sink):
        super().__init__(sink)
        self.total = self.done = 0
        self.active = False  # files are being fetched

    def planned(self, plan) -> None:
        super().planned(plan)
        self.total, self.done = plan.total_bytes, plan.present_bytes
        self.active = bool(plan.missing)

    def file_started(self, name: str, size: int | None, resumed_at: int) -> None:
        super().file_started(name, size, resumed_at)
        self.done += resumed_at

    def advanced(self, nbytes: int) -> None:
        super().advanced(nbytes)
        self.done += nbytes

    def describe(self) -> str:
        percent = int(100 * self.done / self.total) if self.total else 0
        return f"{percent}% of {size_text(self.total)}"


class Room(Protocol):
    """What a holder asks before it loads (``registry.Registry``)."""

    def admit(self, holder: ModelHolder) -> contextlib.AbstractContextManager: ...

    def free_idle(self, holder: ModelHolder) -> bool: ...


class ModelHolder:
    def __init__(self, settings_factory=LocalModelSettings):
        self.settings_factory = settings_factory
        self.room: Room | None = None  # the registry every load of several models goes through
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._failure: tuple[float, ModelUnavailableError] | None = None
        self.loading = False  # a load is under way (state reports; nothing waits on it)
        self.download: DownloadWatch | None = None  # the download of a load under way, if any
        self.last_load_seconds: float | None = None  # kept after an unload: what a reload costs
        self.label = ""  # the model loaded last, as log lines name it (settings.source_label)

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    @property
    def last_error(self) -> str | None:
        """Why the last load failed, until a load succeeds."""
        return self._failure[1].message if self._failure else None

    def get(self) -> LoadedModel:
        """The loaded model; loads it first if needed. Raises ``ModelUnavailableError``."""
        if self._loaded is not None:
            return self._loaded
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            if self._failure and time.monotonic() - self._failure[0] < RETRY_AFTER_FAILURE_S:
                raise self._failure[1]
            settings = self.settings_factory()
            self.loading = True
            try:
                with self.room.admit(self) if self.room else contextlib.nullcontext():
                    self._loaded = self._load(settings)
            except ModelUnavailableError as exc:
                drop_frames(exc)  # kept below: it must not keep what the load had built
                self._failure = (time.monotonic(), exc)
                log.error("%s", exc)
                raise
            finally:
                self.loading = False
            self._failure = None
            self.last_load_seconds = self._loaded.load_seconds
            self.label = settings.source_label
            return self._loaded

    def _load(self, settings: LocalModelSettings) -> LoadedModel:
        """``load_model``, once more after unloading idle models if it ran out of memory."""
        self.download = DownloadWatch(log)
        try:
            try:
                return load_model(settings, self.download)
            except ModelUnavailableError as exc:
                drop_frames(exc)  # before free_idle's collection: the first try's weights go
                if not exc.out_of_memory or self.room is None or not self.room.free_idle(self):
                    raise
            # Once more, outside the handler: nothing of the first try is referenced any longer.
            gc.collect()  # the half-built model's modules hold reference cycles
            _empty_device_cache(True)  # only an out-of-memory load gets here; a no-op without CUDA
            log.warning(
                "Out of memory loading %s: unloaded the idle local models, trying once more",
                settings.source_label,
            )
            return load_model(settings)
        finally:
            self.download = None

    def unload(self) -> bool:
        """Drop the model and give its memory back; the next ``get`` loads it again.

        Only the engine calls this, with its batch empty, so no request is using the model.
        """
        with self._lock:
            loaded, self._loaded = self._loaded, None
        if loaded is None:
            return False
        on_gpu = loaded.device.startswith("cuda")
        del loaded
        gc.collect()  # the model's modules hold reference cycles
        _empty_device_cache(on_gpu)
        log.info("Unloaded the local model; its memory is released")
        return True

    def memory(self) -> dict[str, int | None]:
        """Bytes held by the model, and the device's own figures when CUDA is in use.

        Never imports torch: on a gateway that has not used the local model, torch is not loaded.
        """
        loaded = self._loaded
        report: dict[str, int | None] = dict.fromkeys(
            (
                "model_bytes",
                "device_allocated_bytes",
                "device_reserved_bytes",
                "device_free_bytes",
                "device_total_bytes",
            )
        )
        report["model_bytes"] = loaded.model_bytes if loaded else None
        cuda = getattr(sys.modules.get("torch"), "cuda", None)  # None while torch is importing
        if cuda is None or not getattr(cuda, "is_initialized", lambda: False)():
            return report
        torch = sys.modules["torch"]
        device = loaded.device if loaded and loaded.device.startswith("cuda") else None
        device = device or torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(device)
        report.update(
            device_allocated_bytes=torch.cuda.memory_allocated(device),
            device_reserved_bytes=torch.cuda.memory_reserved(device),
            device_free_bytes=free,
            device_total_bytes=total,
        )
        return report

    def release_cached_memory(self) -> None:
        """Give the allocator's cached, unused device memory back (after a failed step)."""
        loaded = self._loaded
        _empty_device_cache(loaded is not None and loaded.device.startswith("cuda"))


def _empty_device_cache(on_gpu: bool) -> None:
    """The one place that empties the device cache. It never raises: on torch < 2.12 a CUDA graph
    capture that failed can leave the allocator believing a capture runs (pytorch#180395), and
    ``empty_cache`` then fails an internal assert; the memory stays cached, nothing else breaks
    (decode.py ends such a capture itself; this is the last guard)."""
    if on_gpu:
        import torch

        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:
            log.warning("Could not give cached GPU memory back: %s", str(exc).split("\n")[0])


def load_model(settings: LocalModelSettings, progress: Progress | None = None) -> LoadedModel:
    """Load tokenizer and model as ``settings`` say; every failure is ``ModelUnavailableError``."""
    if (workers := gateway_workers()) > 1:
        raise ModelUnavailableError(several_workers_problem(workers))
    source = _check_source(settings)
    if not Path(source).exists():  # a repo id: fetch what the cache lacks, with progress
        _download(settings, progress)
    started = time.perf_counter()
    try:
        import torch
        import transformers

        device = _resolve_device(settings.device, torch)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source,
            subfolder=settings.tokenizer_folder,
            trust_remote_code=settings.trust_remote_code,
        )
        config = transformers.AutoConfig.from_pretrained(
            source, subfolder=settings.model_folder, trust_remote_code=settings.trust_remote_code
        )
        dtype = _resolve_dtype(settings.dtype, device, torch)
        quant_kwargs, quantization = _quantization(settings, config, device, dtype)
        model, loading_info = transformers.AutoModelForCausalLM.from_pretrained(
            source,
            subfolder=settings.model_folder,
            dtype=dtype,
            device_map=device if device != "cpu" else None,
            trust_remote_code=settings.trust_remote_code,
            output_loading_info=True,
            **quant_kwargs,
        )
        _tie_missing_lm_head(model, loading_info, settings)
    except ModelUnavailableError:
        raise
    except Exception as exc:  # any failure to load is reported the same way: clearly, once
        error = _load_error(settings, exc)
        drop_frames(exc)  # a half-built model lives in them: on a GPU, gigabytes
        raise error from exc
    model.eval()
    packed = use_packed_attention(model)  # transformers' SDPA, and packed steps (packed.py)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=str(model.device),
        dtype=str(dtype).removeprefix("torch."),
        quantization=quantization,
        context_length=_context_length(config, tokenizer),
        max_token_chars=_max_token_chars(tokenizer),
        eos_token_ids=_eos_ids(model, tokenizer),
        pad_token_id=_pad_id(model, tokenizer),
        generation_defaults=_generation_defaults(model),
        load_seconds=time.perf_counter() - started,
        model_bytes=int(model.get_memory_footprint()),
        constraints=JsonConstraints(tokenizer),
        packed=packed,
    )
    loaded.constraints.warm_up()
    log.info(
        "Loaded %s on %s (%s, %s) in %.1f s",
        settings.source_label,
        loaded.device,
        loaded.dtype,
        loaded.quantization,
        loaded.load_seconds,
    )
    return loaded


def _check_source(settings: LocalModelSettings) -> str:
    source = settings.model.strip()
    path = Path(source).expanduser()
    if path.exists():
        if settings.model_folder and not (path / settings.model_folder / "config.json").is_file():
            raise ModelUnavailableError(
                f"The local model cannot be loaded: {settings.source_label} has no "
                f"{settings.model_folder}/config.json. Set LOCAL_LLM_SUBFOLDER to the folder of "
                "LOCAL_LLM_MODEL that holds the model's config.json (Z-Image: text_encoder), or "
                "leave it empty for a plain model folder."
            )
        if not (path / settings.model_folder / "config.json").is_file():
            raise ModelUnavailableError(
                f"The local model cannot be loaded: {settings.source_label} is a directory "
                f"without a config.json. Point {settings.checkpoint_setting} at a Hugging Face "
                f"model folder or a repo id (default {DEFAULT_MODEL!r})."
            )
        if not (path / settings.tokenizer_folder).is_dir():
            raise ModelUnavailableError(
                f"The local model cannot be loaded: {source!r} has no tokenizer folder "
                f"{settings.tokenizer_folder!r}. Set LOCAL_LLM_TOKENIZER_SUBFOLDER to the folder "
                "that holds tokenizer.json (Z-Image: tokenizer)."
            )
        return str(path)
    if settings.checkpoint_is_a_path:
        raise ModelUnavailableError(
            f"The local model cannot be loaded: {settings.source_label} does not exist. Set "
            f"{settings.checkpoint_setting} to an existing model directory or a Hugging Face "
            f"repo id (default {DEFAULT_MODEL!r}) and restart the gateway."
        )
    return source


def _download(settings: LocalModelSettings, progress: Progress | None) -> None:
    """Fetch the files of a repo id the cache lacks (nothing when it has them all), logging the
    progress, so a first request's long wait shows in the gateway's log."""
    if is_cached(settings):
        return
    try:
        download(settings, progress or LogProgress(log))
    except DownloadError as exc:
        raise ModelUnavailableError(
            f"The local model cannot be loaded from {settings.source_label}: {exc.message}"
        ) from None


def _tie_missing_lm_head(model, loading_info: dict, settings: LocalModelSettings) -> None:
    """Give a checkpoint saved without an output layer the one it was trained with.

    A text encoder such as Z-Image's is saved from the base ``Qwen3Model``: layers and embeddings,
    no ``lm_head``. ``AutoModelForCausalLM`` still builds ``Qwen3ForCausalLM`` from its config
    (it picks the class by ``model_type``, not by ``architectures``) and loads the base weights
    under ``model.``. With ``tie_word_embeddings: true`` (Qwen3-4B's) transformers ties the head
    to the embeddings itself; with it false the head would be random and the output noise. Qwen3-4B
    was trained with tied embeddings, so a missing head is the embedding matrix: tie it.
    """
    if "lm_head.weight" not in loading_info.get("missing_keys", ()):
        return
    output = model.get_output_embeddings()
    if output is None:
        return
    output.weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True
    log.warning(
        "%s has no lm_head weights (a base-model checkpoint, such as a text encoder): tied the "
        "output layer to the input embeddings.",
        settings.source_label,
    )


def _load_error(settings: LocalModelSettings, exc: Exception) -> ModelUnavailableError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if _out_of_memory(exc):
        error = ModelUnavailableError(
            f"The local model cannot be loaded from {settings.source_label}: out of memory on "
            f"its device ({reason[:200]}). Free memory (POST /local/release, a smaller or "
            "4-bit checkpoint, the image model unloaded), then retry."
        )
        error.out_of_memory = True
        return error
    return ModelUnavailableError(
        f"The local model cannot be loaded from {settings.source_label}: {reason[:300]} "
        f"Check that {settings.checkpoint_setting} names a Hugging Face repo id you can download "
        "(or is in the local Hugging Face cache) or a local model directory, then retry."
    )


def _out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (without importing torch), or an allocator's own words."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _resolve_device(requested: str, torch) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailableError(
            f"LOCAL_LLM_DEVICE={requested!r} but CUDA is not available here; set "
            "LOCAL_LLM_DEVICE=auto or cpu."
        )
    return requested


def _resolve_dtype(requested: str, device: str, torch):
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _quantization(settings: LocalModelSettings, config, device: str, dtype) -> tuple[dict, str]:
    existing = getattr(config, "quantization_config", None)
    if existing is not None:  # pre-quantized checkpoints load as they are
        method = existing.get("quant_method") if isinstance(existing, dict) else None
        method = method or getattr(existing, "quant_method", "unknown")
        return {}, f"pre-quantized ({getattr(method, 'value', method)})"
    wanted = settings.quantization
    if wanted == "none" or (wanted == "auto" and device == "cpu"):
        return {}, "none"
    if device == "cpu":
        raise ModelUnavailableError(
            "LOCAL_LLM_QUANTIZATION=4bit needs a CUDA GPU; on CPU set LOCAL_LLM_QUANTIZATION=auto."
        )
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return {"quantization_config": bnb}, "bnb-4bit"


def _context_length(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(min(tokenizer.model_max_length, 32768))


def _max_token_chars(tokenizer) -> int:
    """How many characters one token can cover, at most: bounds a prompt's length in tokens."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max(longest, 1)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def _pad_id(model, tokenizer) -> int:
    for value in (tokenizer.pad_token_id, model.generation_config.pad_token_id):
        if value is not None:
            return value
    return min(_eos_ids(model, tokenizer))


def _generation_defaults(model) -> dict[str, Any]:
    """The checkpoint's recommended sampling, falling back to Qwen3 non-thinking's (0.7/0.8/20,
    min_p 0). Its repetition_penalty applies to greedy answers too (as in ``generate`` and vLLM)."""
    gc = model.generation_config
    return {
        "temperature": gc.temperature if gc.do_sample and gc.temperature else 0.7,
        "top_p": gc.top_p if gc.do_sample and gc.top_p else 0.8,
        "top_k": gc.top_k if gc.do_sample and gc.top_k is not None else 20,
        "min_p": gc.min_p if gc.do_sample and gc.min_p else 0.0,
        "repetition_penalty": _positive(getattr(gc, "repetition_penalty", None)) or 1.0,
    }


def _positive(value: Any) -> float | None:
    """A config's number if it is a usable penalty (positive and finite), else None."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e3
    return float(value) if ok else None
