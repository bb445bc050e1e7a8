"""Work-arounds for LiteLLM behaviour that hurts this gateway, applied when it imports our handler.

Each one says what goes wrong, how it was shown, and when it can go. The first is the one that
matters most: See docs/troubleshooting.md
("The gateway died with a segmentation fault") and docs/architecture.md ("Finalizers").

**CustomStreamWrapper.__del__ sets context variables from the garbage collector.**
LiteLLM 1.108.7's stream wrapper has a ``__del__`` that restores two logging context variables
(``trace_id``, ``session_id``) with ``ContextVar.set``. The router wraps every streamed response
in a class it defines per request (``FallbackStreamWrapper``), which puts the wrapper in a reference
cycle, so only the cyclic garbage collector frees it, and its ``__del__`` runs wherever a
collection happens to start: on any thread, inside any allocation. When that allocation is the one
``ContextVar.set`` makes while it copies the context's mapping (``_PyHamt_Assoc``), the finalizer's
own ``set`` replaces the mapping and frees it under the first one: a use-after-free in CPython
(python/cpython#148891, fix proposed in python/cpython#148928, not in any 3.11-3.13 release we can
install). The heap is corrupted and the gateway dies later with SIGSEGV, typically in
``hamt_node_bitmap_assoc`` under LiteLLM's ``service_target``. ``scripts/hamt_reentry.py``
reproduces it in 20 lines without LiteLLM, uvloop or threads.

The finalizer is a "best-effort" clean-up of a stream its caller abandoned; in the proxy each
request runs in its own asyncio task whose context dies with it, so nothing is lost without it.
Removing it lets the collector free the wrapper without running any code.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("custom_handlers.litellm_patches")


def apply() -> None:
    """Apply every work-around; a second call changes nothing."""
    disarm_stream_finalizer()
    quiet_inapplicable_warnings()
    one_line_per_refusal()


REQUEST_FAILED = "litellm.proxy.proxy_server._handle_llm_api_exception(): Exception occured"
AUTH_FAILED = "litellm.proxy.proxy_server.user_api_key_auth(): Exception occured"


class _RefusalsOnOneLine(logging.Filter):
    """A request refused with a 4xx is logged as one line: status, model, message. A request
    refused for its key too: LiteLLM wrote an ERROR line and a "Requester IP Address" line (with
    a traceback for some), so that anyone could fill the log without a key."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(AUTH_FAILED) and len(record.args or ()) >= 2:
            record.msg = "Refused before routing (from %s): %s"
            record.args = (record.args[1], str(record.args[0]).strip().splitlines()[0][:300])
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        if not str(record.msg).startswith(REQUEST_FAILED) or len(record.args or ()) < 2:
            return True
        error = record.args[1]
        status = _status_of(error)
        if status is None or not 400 <= status < 500:
            return True  # a failure of ours or of a provider: its traceback is worth reading
        record.msg = "Refused with %s (model %s): %s"
        record.args = (status, getattr(error, "model", None) or "?", _first_line(error))
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _status_of(error: object) -> int | None:
    status = getattr(error, "status_code", None) or getattr(error, "code", None)
    try:
        return int(status)
    except (TypeError, ValueError):
        return None


def _first_line(error: object) -> str:
    from custom_handlers.gateway.hooks import find_local_error

    local = find_local_error(error) if isinstance(error, BaseException) else None
    text = local.message if local is not None else str(getattr(error, "message", error))
    return text.strip().splitlines()[0][:500] if text.strip() else type(error).__name__


def one_line_per_refusal() -> None:
    """LiteLLM logs every failed request with its whole traceback, a caller's 400 included: 60
    tracebacks, 2,092 lines for a few minutes of use. A 4xx is the caller's mistake, answered
    with its reason; one INFO line says what was refused. 5xx keep their tracebacks."""
    from litellm._logging import verbose_proxy_logger

    if not any(isinstance(f, _RefusalsOnOneLine) for f in verbose_proxy_logger.filters):
        # First: LiteLLM's own filters render the message (dropping its args) before ours would.
        verbose_proxy_logger.filters.insert(0, _RefusalsOnOneLine())


COMMON_CHECKS_WARNING = "custom_auth is configured but 'custom_auth_run_common_checks' is not set"


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_inapplicable_warnings() -> None:
    """Drop LiteLLM's start-up warning about ``custom_auth_run_common_checks`` without a database.

    It warns that budgets and allowlists "configured on your DB team/project records" are not
    enforced for our key check: with no ``DATABASE_URL`` there are no such records, and a new user
    went looking for a problem that is not there. (Its other start-up warning, about
    ``trusted_proxy_ranges``, is answered in proxy_config.yaml.) With a database it stays.
    """
    if os.environ.get("DATABASE_URL"):
        return
    from litellm._logging import verbose_proxy_logger

    if not any(isinstance(f, _DropMessages) for f in verbose_proxy_logger.filters):
        verbose_proxy_logger.addFilter(_DropMessages(COMMON_CHECKS_WARNING))


def disarm_stream_finalizer() -> bool:
    """Remove ``CustomStreamWrapper.__del__``; True if it was there (and is gone now)."""
    from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

    if "__del__" not in CustomStreamWrapper.__dict__:
        return False
    del CustomStreamWrapper.__del__
    log.debug("CustomStreamWrapper.__del__ removed (python/cpython#148891)")
    return True
