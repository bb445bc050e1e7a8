"""Keep the gateway up: ``z-explorer-gateway`` runs the proxy as a child and restarts it if it dies.

This is a safety net, not a fix: a gateway that dies is a defect to find (docs/troubleshooting.md).
But a user who left the gateway running for Z-Explorer should not come back to a dead one, with
every model gone, local and cloud alike.

- The proxy runs as a child process in a session of its own; the supervisor forwards SIGINT,
  SIGTERM and SIGHUP to it once each, and a child that exits after one of them is not restarted. On
  Linux the child also gets SIGTERM if the supervisor itself is killed.
- A child killed by a signal (SIGSEGV, SIGABRT, SIGKILL from the out-of-memory killer...) is
  restarted, and so is one that exits with an error after running ``STARTUP_SECONDS`` or more. One
  that fails sooner (a bad setting, a port in use) would fail again the same way: its status is
  passed on and the supervisor stops.
- At most ``MAX_RESTARTS`` restarts in ``RESTART_WINDOW`` seconds; past that it gives up.
- Each death is one log line on stderr: the exit status, how long the child ran, and the last
  requests it took (``journal``), those it had not answered first. The restarted child gets the
  count and the last death in ``Z_EXPLORER_GATEWAY_RESTARTS``; ``GET /local/state`` reports them
  under ``gateway`` and ``z-explorer doctor`` shows them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from custom_handlers.gateway import journal

RESTARTS_VAR = "Z_EXPLORER_GATEWAY_RESTARTS"
MAX_RESTARTS = 5
RESTART_WINDOW = 600.0  # seconds
STARTUP_SECONDS = 30.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PREFIX = "z-explorer-gateway:"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{name} (exit status {returncode})"
    return f"exit status {returncode}"


@dataclass
class RestartPolicy:
    """Whether a child that exited should be started again."""

    max_restarts: int = MAX_RESTARTS
    window: float = RESTART_WINDOW
    startup_seconds: float = STARTUP_SECONDS
    restarts: deque[float] = field(default_factory=deque)  # when each restart happened

    def decide(self, returncode: int, uptime: float, now: float) -> str | None:
        """None to restart now, else why not."""
        if returncode == 0:
            return "it exited normally"
        if returncode > 0 and uptime < self.startup_seconds:
            return f"it failed within {uptime:.0f} s of starting: it would fail again"
        while self.restarts and now - self.restarts[0] > self.window:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            minutes = self.window / 60
            return f"it was restarted {len(self.restarts)} times in {minutes:g} minutes already"
        self.restarts.append(now)
        return None


class Supervisor:
    def __init__(self, command: list[str], policy: RestartPolicy | None = None) -> None:
        self.command = command
        self.policy = policy or RestartPolicy()
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.deaths = 0
        self.last_death: dict | None = None

    def run(self) -> int:
        """Run the child until it stops for good; the exit status to leave with."""
        for signum in FORWARDED:
            signal.signal(signum, self._forward)
        with tempfile.TemporaryDirectory(prefix="z-explorer-gateway-") as scratch:
            journal_path = Path(scratch) / "requests.journal"
            while True:
                started = time.monotonic()
                returncode = self._run_child(journal_path)
                if self.stopping:
                    return _exit_status(returncode)
                uptime = time.monotonic() - started
                why_not = self.policy.decide(returncode, uptime, time.time())
                self._report(returncode, uptime, journal_path, why_not)
                if why_not is not None or self.stopping:
                    return _exit_status(returncode)

    def _run_child(self, journal_path: Path) -> int:
        env = {**os.environ, journal.JOURNAL_VAR: str(journal_path)}
        if self.last_death is not None:
            env[RESTARTS_VAR] = json.dumps({"restarts": self.deaths, "last": self.last_death})
        self.child = subprocess.Popen(
            self.command, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        return self.child.wait()

    def _forward(self, signum: int, frame) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def _report(self, returncode: int, uptime: float, journal_path: Path, why_not: str | None):
        now, uptime = time.time(), round(uptime)
        entries = journal.read(journal_path)
        unanswered = [e for e in entries if e.status == journal.IN_FLIGHT]
        answered = [e for e in entries if e.status != journal.IN_FLIGHT]
        last = [e.describe(now) for e in [*unanswered, *reversed(answered)][:5]]
        death = {
            "exit": describe_exit(returncode),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
            "uptime_seconds": uptime,
            "last_requests": last,
        }
        self.deaths, self.last_death = self.deaths + 1, death
        then = "not restarting: " + why_not if why_not else self._restart_note()
        requests = "; ".join(last) if last else "none"
        print(
            f"{PREFIX} the gateway (pid {self.child.pid}) died with {death['exit']} after "
            f"{uptime} s; last requests: {requests}; {then}",
            file=sys.stderr,
            flush=True,
        )

    def _restart_note(self) -> str:
        policy = self.policy
        return (
            f"restarting it ({len(policy.restarts)} of at most {policy.max_restarts} restarts "
            f"in {policy.window / 60:g} minutes)"
        )


def restarts_reported() -> dict | None:
    """What the supervisor told this process about earlier deaths (for ``/local/state``)."""
    raw = os.environ.get(RESTARTS_VAR)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
