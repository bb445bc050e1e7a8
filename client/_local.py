"""The gateway's local model, as its ``/local/state`` and ``/local/release`` routes report it.

The transport (``client._llm``) makes the calls; this module reads their JSON into small frozen
dataclasses and words them for ``doctor`` and ``release-gpu``. Unknown keys are ignored, so a newer
gateway that reports more still works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client._errors import ResponseError

STATE_ROUTE = "/local/state"
RELEASE_ROUTE = "/local/release"
DEFAULT_RELEASE_TIMEOUT = 600.0  # the release waits for the generations already running


@dataclass(frozen=True)
class LocalModelState:
    """What the gateway's local model is doing. ``None`` means unknown or not applicable.

    The ``device_*`` byte counts are None on CPU (or before CUDA is initialised).
    ``idle_seconds`` is None while requests run or wait; ``unload_in_seconds`` is None when no
    unload is pending; ``keep_alive_seconds`` is the gateway's default (-1: never unload).
    """

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
    gateway_restarts: int = 0  # times z-explorer-gateway restarted the gateway after it died
    last_restart: str | None = None  # how it died the last time, and what it was serving


@dataclass(frozen=True)
class ReleaseResult:
    """What ``release_gpu`` did: ``released`` is False when no model was loaded."""

    released: bool
    waited_seconds: float
    state: LocalModelState


# ---- reading the JSON ----------------------------------------------------------------------------


def state_of(data: Any, route: str = STATE_ROUTE) -> LocalModelState:
    if not isinstance(data, dict) or not isinstance(data.get("loaded"), bool):
        raise _unreadable(route, data)
    memory = _dict(data.get("memory"))
    requests = _dict(data.get("requests"))
    gateway = _dict(data.get("gateway"))
    keep_alive = _float(data.get("keep_alive_seconds"))
    return LocalModelState(
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
        gateway_restarts=_int(gateway.get("restarts")) or 0,
        last_restart=_describe_death(_dict(gateway.get("last_restart"))),
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
    if not isinstance(data, dict) or not isinstance(data.get("released"), bool):
        raise _unreadable(RELEASE_ROUTE, data)
    return ReleaseResult(
        released=data["released"],
        waited_seconds=_float(data.get("waited_seconds")) or 0.0,
        state=state_of(data.get("state"), RELEASE_ROUTE),
    )


def _unreadable(route: str, data: Any) -> ResponseError:
    shown = repr(data)
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    return ResponseError(
        f"The gateway's {route} answered something this client cannot read: {shown}. Is "
        "LITELLM_PROXY_API_BASE the gateway's address, and the gateway this project's?"
    )


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


def describe_restarts(state: LocalModelState) -> str | None:
    """A warning when the gateway process died and was restarted, else None."""
    if not state.gateway_restarts:
        return None
    times = "once" if state.gateway_restarts == 1 else f"{state.gateway_restarts} times"
    return (
        f"The gateway process died and z-explorer-gateway restarted it {times}; the last time: "
        f"{state.last_restart}. Please report it (docs/troubleshooting.md, 'The gateway died')."
    )


def describe_release(before: LocalModelState | None, result: ReleaseResult) -> str:
    """What a release freed, from the state before it (when known) and the one after."""
    after = result.state
    device = after.device or (before.device if before else None) or "the device"
    free = _free(after, device)
    if not result.released:
        return f"The local model ({after.source}) was not loaded: nothing to release{free}."
    text = f"Released the local model ({after.source}) after waiting {result.waited_seconds:.1f} s"
    freed = _freed(before, after, device)
    return f"{text}{': ' + freed if freed else ''}{free}."


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


def _freed(before: LocalModelState | None, after: LocalModelState, device: str) -> str:
    if before is None or not before.loaded:
        return ""
    if before.device_reserved_bytes is not None and after.device_reserved_bytes is not None:
        freed = max(0, before.device_reserved_bytes - after.device_reserved_bytes)
        return f"{size(freed)} returned to {device}"
    if before.model_bytes is not None:
        return f"{size(before.model_bytes)} of weights freed"
    return ""


def _free(state: LocalModelState, device: str) -> str:
    if state.device_free_bytes is None or state.device_total_bytes is None:
        return ""
    free, total = size(state.device_free_bytes), size(state.device_total_bytes)
    return f"; {device} has {free} free of {total}"


def size(count: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (``2.4 GiB``)."""
    value, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
