"""The gateway's local models, as its ``/local/state`` and ``/local/release`` routes report them.

The gateway serves each ``zlocal/...`` entry of ``proxy_config.yaml`` as a local model, and keeps
at most ``LOCAL_LLM_MAX_LOADED_MODELS`` of them loaded at once. The transport (``client._llm``)
makes the calls; this module reads their JSON into small frozen dataclasses and words them for
``doctor`` and ``release-gpu``. Unknown keys are ignored, so a newer gateway that reports more
still works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client._errors import ModelNotFoundError, ResponseError

STATE_ROUTE = "/local/state"
RELEASE_ROUTE = "/local/release"
DEFAULT_RELEASE_TIMEOUT = 600.0  # the release waits for the generations already running


@dataclass(frozen=True)
class LocalModelState:
    """What one of the gateway's local models is doing. ``None`` means unknown or not applicable.

    ``model`` is its ``model_name`` in ``proxy_config.yaml`` and ``source`` its checkpoint (a repo
    id or a directory). The ``device_*`` byte counts are the whole device's, not this model's
    (None on CPU, or before CUDA is initialised). ``idle_seconds`` is None while requests run or
    wait; ``unload_in_seconds`` is None when no unload is pending; ``keep_alive_seconds`` is the
    gateway's default (-1: never unload).
    """

    model: str
    loaded: bool
    loading: bool
    source: str
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    load_seconds: float | None = None
    model_bytes: int | None = None
    device_allocated_bytes: int | None = None
    device_reserved_bytes: int | None = None
    device_free_bytes: int | None = None
    device_total_bytes: int | None = None
    running_requests: int = 0
    queued_requests: int = 0
    idle_seconds: float | None = None
    keep_alive_seconds: float = -1.0
    unload_in_seconds: float | None = None
    last_error: str | None = None
    preload: bool = False  # loaded when the gateway starts


@dataclass(frozen=True)
class LocalState:
    """The gateway's local models, in ``proxy_config.yaml``'s order (empty: cloud models only).

    ``max_loaded_models`` is how many may be loaded at once (LOCAL_LLM_MAX_LOADED_MODELS);
    ``gateway_restarts`` counts the times z-explorer-gateway restarted the gateway after it died,
    and ``last_restart`` says how it died the last time and what it was serving.
    """

    models: tuple[LocalModelState, ...] = ()
    max_loaded_models: int = 1
    gateway_restarts: int = 0
    last_restart: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every local model's name."""
        return tuple(m.model for m in self.models)

    @property
    def loaded(self) -> tuple[str, ...]:
        """The names of the models loaded now (empty: none)."""
        return tuple(m.model for m in self.models if m.loaded)

    def get(self, name: str) -> LocalModelState | None:
        """The model named ``name`` (its ``model_name``), or None when there is no such one."""
        return next((m for m in self.models if m.model == name), None)

    def __getitem__(self, name: str) -> LocalModelState:
        if (found := self.get(name)) is None:
            raise KeyError(f"no local model {name!r}; the local models: {_listed(self.names)}")
        return found


@dataclass(frozen=True)
class ReleaseResult:
    """What ``release_gpu`` did: ``released`` names the models it unloaded (empty: none was
    loaded), ``waited_seconds`` the wait for the requests before the release, ``state`` the state
    after it."""

    released: tuple[str, ...]
    waited_seconds: float
    state: LocalState


# ---- reading the JSON ----------------------------------------------------------------------------


def state_of(data: Any, route: str = STATE_ROUTE) -> LocalState:
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise _unreadable(route, data)
    entries = [_model_of(entry) for entry in data["models"]]
    models = tuple(m for m in entries if m is not None)
    if len(models) != len(entries):
        raise _unreadable(route, data)
    gateway = _dict(data.get("gateway"))
    return LocalState(
        models=models,
        max_loaded_models=_int(data.get("max_loaded_models")) or 1,
        gateway_restarts=_int(gateway.get("restarts")) or 0,
        last_restart=_describe_death(_dict(gateway.get("last_restart"))),
    )


def _model_of(data: Any) -> LocalModelState | None:
    """One entry of ``models``; None when it lacks its name or ``loaded``."""
    if not isinstance(data, dict) or not isinstance(data.get("loaded"), bool):
        return None
    if not isinstance(data.get("model"), str) or not data["model"]:
        return None
    memory = _dict(data.get("memory"))
    requests = _dict(data.get("requests"))
    keep_alive = _float(data.get("keep_alive_seconds"))
    return LocalModelState(
        model=data["model"],
        loaded=data["loaded"],
        loading=data.get("loading") is True,
        source=str(data.get("source") or ""),
        device=_str(data.get("device")),
        dtype=_str(data.get("dtype")),
        quantization=_str(data.get("quantization")),
        context_length=_int(data.get("context_length")),
        load_seconds=_float(data.get("load_seconds")),
        model_bytes=_int(memory.get("model_bytes")),
        device_allocated_bytes=_int(memory.get("device_allocated_bytes")),
        device_reserved_bytes=_int(memory.get("device_reserved_bytes")),
        device_free_bytes=_int(memory.get("device_free_bytes")),
        device_total_bytes=_int(memory.get("device_total_bytes")),
        running_requests=_int(requests.get("running")) or 0,
        queued_requests=_int(requests.get("queued")) or 0,
        idle_seconds=_float(data.get("idle_seconds")),
        keep_alive_seconds=-1.0 if keep_alive is None else keep_alive,
        unload_in_seconds=_float(data.get("unload_in_seconds")),
        last_error=_str(data.get("last_error")),
        preload=data.get("preload") is True,
    )


def _describe_death(death: dict) -> str | None:
    if not death:
        return None
    text = f"{death.get('exit', 'an unknown status')} at {death.get('at', '?')}"
    if (uptime := _float(death.get("uptime_seconds"))) is not None:
        text += f", {uptime:.0f} s after it started"
    last = [str(r) for r in death.get("last_requests") or []]
    return text + (f"; last requests: {'; '.join(last)}" if last else "")


def release_of(data: Any) -> ReleaseResult:
    released = data.get("released") if isinstance(data, dict) else None
    if not isinstance(released, list) or not all(isinstance(n, str) for n in released):
        raise _unreadable(RELEASE_ROUTE, data)
    return ReleaseResult(
        released=tuple(released),
        waited_seconds=_float(data.get("waited_seconds")) or 0.0,
        state=state_of(data.get("state"), RELEASE_ROUTE),
    )


def release_body(model: str | None) -> dict:
    """The body of POST /local/release: ``{}`` releases every local model."""
    if model is None:
        return {}
    if not isinstance(model, str) or not model:
        # release_gpu(30), written when the timeout was the first argument, lands here
        raise TypeError(
            f"release_gpu's first argument is a local model's name, or None for every one; got "
            f"{model!r}. Pass the timeout by name: release_gpu(timeout=...)."
        )
    return {"model": model}


def unknown_local_model(
    model: str, available: list[str] | None, base_url: str
) -> ModelNotFoundError:
    """The error for a name that is none of the gateway's local models."""
    if available:
        known = f"Its local models: {_listed(available)}; name one of them, or none for every one."
    elif available is not None:
        known = "It has no local model (no zlocal/ entry in its proxy_config.yaml)."
    else:
        known = "`z-explorer doctor` lists its local models."
    return ModelNotFoundError(
        f"The gateway at {base_url} has no local model '{model}'. {known}",
        available=available,
        model=model,
        base_url=base_url,
    )


def pick_model(state: LocalState, name: str | None, default: str, base_url: str) -> LocalModelState:
    """``name``'s state; without a name, ``default``'s when it is local, else the only one's."""
    if name is None:
        if (found := state.get(default)) is not None:
            return found
        if len(state.models) == 1:
            return state.models[0]
        name = default
    if (found := state.get(name)) is None:
        raise unknown_local_model(name, list(state.names), base_url)
    return found


def _unreadable(route: str, data: Any) -> ResponseError:
    if isinstance(data, dict) and any(
        isinstance(data.get(k), bool) for k in ("loaded", "released")
    ):
        return ResponseError(
            f"The gateway's {route} answered for one local model, as gateways older than this "
            'client do (no "models" list). Restart it in the project folder with '
            "`uv run z-explorer-gateway`."
        )
    shown = repr(data)
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    return ResponseError(
        f"The gateway's {route} answered something this client cannot read: {shown}. Is "
        "LITELLM_PROXY_API_BASE the gateway's address, and the gateway this project's?"
    )


def _listed(names: Any) -> str:
    return ", ".join(names) if names else "none"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return str(value) if value is not None else None


def _int(value: Any) -> int | None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return int(value) if is_number else None


def _float(value: Any) -> float | None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number else None


# ---- words for doctor and release-gpu ------------------------------------------------------------


def describe_models(state: LocalState) -> str:
    """One line: how many local models there are, which are loaded, how many may be at once."""
    if not state.models:
        return "none in proxy_config.yaml (no zlocal/ entry): the gateway serves other models only"
    loaded = state.loaded
    which = f" ({', '.join(loaded)})" if loaded else ""
    return (
        f"{len(loaded)} of {len(state.models)} loaded{which}; at most "
        f"{state.max_loaded_models} at once (LOCAL_LLM_MAX_LOADED_MODELS)"
    )


def describe_state(state: LocalModelState) -> str:
    """One line: where the model is, what it holds, what it is doing, when it unloads."""
    if state.loading:
        text = f"{state.source} loading now; {_requests(state)}"
    elif state.loaded:
        named = (state.device, state.dtype, state.quantization)
        on = ", ".join(p for p in named if p and p.lower() != "none")
        held = _held(state)
        where = ", ".join(p for p in (on, held) if p)
        text = f"{state.source} loaded{' on ' + where if where else ''}; {_requests(state)}"
        text += _idle(state)
    else:
        took = f", ~{state.load_seconds:.0f} s" if state.load_seconds is not None else ""
        text = f"{state.source} not loaded (loads on the next request{took})"
        if state.running_requests or state.queued_requests:
            text += f"; {_requests(state)}"
    if state.last_error:
        text += f"; the last load failed: {state.last_error}"
    return text


def describe_restarts(state: LocalState) -> str | None:
    """A warning when the gateway process died and was restarted, else None."""
    if not state.gateway_restarts:
        return None
    times = "once" if state.gateway_restarts == 1 else f"{state.gateway_restarts} times"
    return (
        f"The gateway process died and z-explorer-gateway restarted it {times}; the last time: "
        f"{state.last_restart}. Please report it (docs/troubleshooting.md, 'The gateway died')."
    )


def describe_release(
    before: LocalState | None, result: ReleaseResult, model: str | None = None
) -> str:
    """What a release freed, from the state before it (when known) and the one after: a line per
    model released (one line in all when it released one), and the device's free memory once.
    ``model`` is the name the release was asked for (None: every local model)."""
    after = result.state
    device = _device(before, after, result.released)
    free = _free(after, device)
    if not result.released:
        return f"{_not_loaded(after, model)}: nothing to release{free}."
    waited = f"after waiting {result.waited_seconds:.1f} s"
    freed = _freed(before, after, result.released, device)
    freed = f": {freed}" if freed else ""
    if len(result.released) == 1:
        return f"Released {_named(before, after, result.released[0])} {waited}{freed}{free}."
    lines = [
        f"Released {_named(before, after, name)}{_weights(before, name)}."
        for name in result.released
    ]
    lines.append(f"Released {len(result.released)} local models {waited}{freed}{free}.")
    return "\n".join(lines)


def _requests(state: LocalModelState) -> str:
    return f"{state.running_requests} running, {state.queued_requests} queued"


def _held(state: LocalModelState) -> str:
    parts = []
    if state.model_bytes is not None:
        parts.append(f"{size(state.model_bytes)} of weights")
    if state.device_reserved_bytes is not None:
        parts.append(f"{size(state.device_reserved_bytes)} reserved on the device")
    return ", ".join(parts)


def _idle(state: LocalModelState) -> str:
    if state.idle_seconds is None:
        return ""
    text = f"; idle {state.idle_seconds:.0f} s"
    if state.unload_in_seconds is not None:
        return f"{text}, unloads in {state.unload_in_seconds:.0f} s"
    if state.keep_alive_seconds < 0:
        return f"{text}, kept loaded (keep_alive -1)"
    return text


def _named(before: LocalState | None, after: LocalState, name: str) -> str:
    """``qwen3-4b (its checkpoint)``, or the bare name when neither state has it."""
    found = after.get(name) or (before.get(name) if before else None)
    return f"{name} ({found.source})" if found and found.source else name


def _not_loaded(after: LocalState, model: str | None) -> str:
    if model is not None:
        return f"{_named(None, after, model)} was not loaded"
    if not after.models:
        return "The gateway has no local model (no zlocal/ entry in its proxy_config.yaml)"
    return "No local model was loaded"


def _device(before: LocalState | None, after: LocalState, released: tuple[str, ...]) -> str:
    """The device the released models were on (the first one's), else the one reported."""
    for state in (before, after):
        for name in released:
            if state and (found := state.get(name)) and found.device:
                return found.device
    figures = _figures(after) or _figures(before)
    return figures.device if figures and figures.device else "the device"


def _figures(state: LocalState | None) -> LocalModelState | None:
    """A model whose entry carries the device's memory (each entry reports the same device)."""
    models = state.models if state else ()
    return next((m for m in models if m.device_total_bytes is not None), None)


def _weights(before: LocalState | None, name: str) -> str:
    found = before.get(name) if before else None
    if found is None or found.model_bytes is None:
        return ""
    return f": {size(found.model_bytes)} of weights"


def _freed(
    before: LocalState | None, after: LocalState, released: tuple[str, ...], device: str
) -> str:
    if before is None:
        return ""
    was, now = _figures(before), _figures(after)
    was_reserved = was.device_reserved_bytes if was else None
    now_reserved = now.device_reserved_bytes if now else None
    if was_reserved is not None and now_reserved is not None:
        return f"{size(max(0, was_reserved - now_reserved))} returned to {device}"
    weights = [m.model_bytes for n in released if (m := before.get(n)) and m.model_bytes]
    return f"{size(sum(weights))} of weights freed" if weights else ""


def _free(state: LocalState, device: str) -> str:
    figures = _figures(state)
    if figures is None or figures.device_free_bytes is None:
        return ""
    free, total = size(figures.device_free_bytes), size(figures.device_total_bytes or 0)
    return f"; {device} has {free} free of {total}"


def size(count: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (``2.4 GiB``)."""
    value, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
