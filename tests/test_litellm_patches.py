"""The work-arounds for LiteLLM defects (``custom_handlers.gateway.litellm_patches``), unit by unit.

The gateway-level effects are tested where they show: the crash (tests/test_soak.py) and the
start-up log (tests/test_gateway.py).
"""

from __future__ import annotations

import logging

from litellm._logging import verbose_proxy_logger

from custom_handlers.gateway import litellm_patches


def test_the_stream_wrapper_finalizer_is_removed_once_and_stays_removed():
    from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

    litellm_patches.apply()
    assert "__del__" not in CustomStreamWrapper.__dict__
    assert not hasattr(CustomStreamWrapper, "__del__")  # nor inherited from a base
    assert litellm_patches.disarm_stream_finalizer() is False  # a second call changes nothing


def _passes(message: str) -> bool:
    record = logging.LogRecord("LiteLLM Proxy", logging.WARNING, __file__, 1, message, None, None)
    return all(f.filter(record) for f in verbose_proxy_logger.filters)


def test_the_common_checks_warning_is_dropped_without_a_database_and_nothing_else(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    litellm_patches.apply()
    litellm_patches.apply()
    assert (
        sum(isinstance(f, litellm_patches._DropMessages) for f in verbose_proxy_logger.filters) == 1
    )
    assert not _passes(litellm_patches.COMMON_CHECKS_WARNING + ". Problem: budgets...")
    assert _passes("Any other warning")


class _Refused(Exception):
    status_code = 400
    model = "qwen3-4b"


class _Broken(Exception):
    status_code = 500


def _record(error: Exception) -> logging.LogRecord:
    try:
        raise error
    except Exception:
        import sys

        info = sys.exc_info()
    message = litellm_patches.REQUEST_FAILED + " - litellm_call_id=%s - %s"
    return logging.LogRecord(
        "LiteLLM Proxy", logging.ERROR, __file__, 1, message, ("id", error), info
    )


def test_a_4xx_is_logged_as_one_info_line_and_a_5xx_keeps_its_traceback():
    one_line = litellm_patches._RefusalsOnOneLine()
    refused = _record(_Refused("'top_p' must be above 0\n\nLiteLLM: model group ..."))
    assert one_line.filter(refused)
    assert refused.getMessage() == "Refused with 400 (model qwen3-4b): 'top_p' must be above 0"
    assert refused.exc_info is None and refused.levelno == logging.INFO
    broken = _record(_Broken("boom"))
    assert one_line.filter(broken)
    assert broken.exc_info is not None and broken.levelno == logging.ERROR
