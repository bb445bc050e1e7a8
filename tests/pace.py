"""The model's pace, set by the test instead of guessed from the clock.

A test that needs a request to be still running, a second one to be waiting, or a stream to be cut
into pieces holds the real model between two forward passes, looks, then lets it go on. Nothing is
mocked: the model computes exactly what it would; it only waits before a pass while held.

- In the test's own process: ``Gate(loaded.model)``, a forward pre-hook on the loaded model.
- In a gateway (another process): ``paced_checkpoint(src, dst)``, a copy of a tiny checkpoint whose
  model class (``trust_remote_code``) waits while a hold file exists; ``Hold`` writes that file.

Both can hold every pass or only decoding steps: a prompt is then prefilled and its first token
sent, and the request stays running, held, until released.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import shutil
import threading
import time
from pathlib import Path

DEADLINE_S = 120.0  # what a condition waited for may take on a slow, loaded machine


def wait_for(condition, seconds: float = DEADLINE_S, every: float = 0.01) -> bool:
    """True once ``condition()`` is; False if it still is not after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(every)
    return True


def _decoding(kwargs: dict) -> bool:
    """A decoding step (custom_handlers/inference/decode.py), not a prefill: a prefill asks for
    the logits it keeps, and may have one column too (a prompt the prefix cache knew but one)."""
    return "logits_to_keep" not in kwargs


def _columns(args: tuple, kwargs: dict) -> tuple[int, ...]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return tuple(ids.shape) if ids is not None else ()


class Gate:
    """Holds a loaded model's forward passes while closed; records each pass's input shape.

    ``decode_only`` (the default) holds decoding steps only, not prefills: a prompt is
    still prefilled and its first token sent. ``let(n)`` lets ``n`` held passes go, then holds
    again; ``waits`` counts the passes that have stopped at the gate so far."""

    def __init__(self, model, *, decode_only: bool = True, look=None) -> None:
        self.decode_only = decode_only
        self.passes: list[tuple[int, ...]] = []  # (rows, columns) of every pass, in order
        self.look, self.seen = look, []  # look(): what to note before each pass, into seen
        self.waits = 0
        self._allowed = math.inf
        self._waiting = False
        self._changed = threading.Condition()
        self._handle = model.register_forward_pre_hook(self._before, with_kwargs=True)

    def _before(self, module, args, kwargs) -> None:
        shape = _columns(args, kwargs)
        self.passes.append(shape)
        if self.look is not None:
            self.seen.append(self.look())
        if self.decode_only and not _decoding(kwargs):
            return
        with self._changed:
            if not self._allowed:
                self.waits += 1
                self._waiting = True
                self._changed.notify_all()
                self._changed.wait_for(lambda: self._allowed)
                self._waiting = False
            self._allowed -= 1

    def _set(self, allowed: float) -> None:
        with self._changed:
            self._allowed = allowed
            self._changed.notify_all()

    def close(self) -> Gate:
        self._set(0)
        return self

    def open(self) -> None:
        self._set(math.inf)

    def let(self, passes: int = 1) -> None:
        """Let ``passes`` more passes go, then hold again."""
        with self._changed:
            self._allowed += passes
            self._changed.notify_all()

    def held(self, seconds: float = DEADLINE_S, after: int = 0) -> bool:
        """True once a pass waits at the gate (the ``after + 1``-th to stop there): the engine
        stands still."""
        with self._changed:
            return self._changed.wait_for(lambda: self._waiting and self.waits > after, seconds)

    def remove(self) -> None:
        self.open()
        self._handle.remove()


def arriving_together(local, count: int, run):
    """``run()``'s result, ``run`` sending ``count`` requests at once to the in-process handler
    ``local``: the first prompt the engine takes is held in its prefill until all ``count``
    have been submitted, so they arrive together on any machine, however fast it prefills."""
    gate = Gate(local.holder.get().model, decode_only=False).close()
    submitted, submit = [], local.engine.submit
    local.engine.submit = lambda job: submitted.append(job) or submit(job)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            result = pool.submit(run)
            assert gate.held() and wait_for(lambda: len(submitted) == count), len(submitted)
            gate.open()
            return result.result()
    finally:
        del local.engine.submit
        gate.remove()


# ---- a gateway's model, held through a file ---------------------------------------------------

MODELING = '''"""Qwen3, unchanged, except that it waits before a forward pass while its hold file
says so (tests/pace.py). Test-only: never shipped, never a user's model."""

import os
import time

from transformers import Qwen3ForCausalLM


class PacedQwen3ForCausalLM(Qwen3ForCausalLM):
    def forward(self, *args, **kwargs):
        hold = getattr(self.config, "hold_file", None)
        if hold and os.path.exists(hold):
            decoding = "logits_to_keep" not in kwargs  # a prefill keeps its logits
            if _holds(hold, decoding):
                with open(hold + ".waits", "a") as f:  # one line per pass held
                    f.write("1\\n")
                while _holds(hold, decoding):
                    time.sleep(0.005)
        return super().forward(*args, **kwargs)


def _holds(hold, decoding):
    try:
        with open(hold) as f:
            what = f.read().strip()
    except FileNotFoundError:
        return False
    return what != "decode" or decoding
'''


class Hold:
    """The hold file of a paced checkpoint: while it exists, the model waits before its passes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.waits = Path(f"{path}.waits")  # the model adds a line each time a pass is held
        self._before = 0

    def _held_passes(self) -> int:
        try:
            return self.waits.read_text().count("\n")
        except FileNotFoundError:
            return 0

    def _set(self, what: str) -> Hold:
        self._before = self._held_passes()
        self.path.write_text(what)
        return self

    def decoding(self) -> Hold:
        """Hold decoding steps only: prompts are prefilled (first token made), then they wait."""
        return self._set("decode")

    def everything(self) -> Hold:
        return self._set("all")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def held(self, seconds: float = DEADLINE_S) -> bool:
        """True once a pass has stopped at this hold: until released, the engine stands still
        (a pass held stays held while the hold is on)."""
        return wait_for(lambda: self._held_passes() > self._before, seconds)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def paced_checkpoint(src: Path, dst: Path) -> tuple[Path, Hold]:
    """A copy of the checkpoint ``src`` whose model holds while ``Hold`` says so (load it with
    ``trust_remote_code``); the same weights, so the same answers."""
    shutil.copytree(src, dst)
    (dst / "modeling_paced.py").write_text(MODELING)
    hold = Hold(dst / "HOLD")
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_paced.PacedQwen3ForCausalLM"}
    config["hold_file"] = str(hold.path)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, hold
