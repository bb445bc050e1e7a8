"""``/v1/completions`` on a local model, around LiteLLM's text-completion path
(``litellm_settings.callbacks``).

LiteLLM turns a text completion into chat messages (one user message per prompt string) before it
calls the provider, and refuses a token-id prompt for a custom provider ("Unmapped prompt format",
a 500) before any provider code runs. So for a local model the pre-call hook keeps the request's
own ``prompt`` in ``metadata`` (``completion.PROMPT_KEY``), where the provider reads it, and gives
LiteLLM one placeholder string per token-id prompt to map (and no fallback model, which would
get those placeholders). The answer's JSON the provider makes
itself (``LocalLLM._complete_text``): LiteLLM passes a ``TextCompletionResponse`` on unchanged.
A local stream's chunks it writes too, into a channel (``completion.open_channel``) that the
stream hook sends from: LiteLLM's text-completion stream keeps only the first choice's text, so
several prompts, ``n`` and ``logprobs`` could not be streamed through it.

A cloud model's stream goes through LiteLLM's ``TextCompletionStreamWrapper``, which writes
``text: null`` on the final chunk (the one with ``finish_reason``) and an all-zero ``usage`` on
every chunk unless ``stream_options.include_usage`` asked for it. The stream hook sends OpenAI's
shape instead: every chunk has its ``text``, and ``usage`` only when asked, in a last chunk with
``choices: []``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from custom_handlers.gateway.body_checks import LOCAL_PROVIDER, served_by
from custom_handlers.inference.completion import (
    PROMPT_KEY,
    STREAM_KEY,
    close_channel,
    take_channel,
)

_TEXT_COMPLETION = ("atext_completion", "text_completion")
TOKEN_IDS_PLACEHOLDER = "(a prompt sent as token ids)"


def keep_prompt(data: dict) -> None:
    """Keep ``prompt`` for the local provider; LiteLLM gets strings it can map."""
    prompt = data.get("prompt")
    metadata = data.get("metadata")
    if not isinstance(metadata, dict):
        metadata = data["metadata"] = {}
    metadata[PROMPT_KEY] = prompt
    if data.get("stream") is True:
        metadata[STREAM_KEY] = uuid.uuid4().hex
    if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
        # A fallback model would get the placeholders: a token-id prompt has none.
        data["disable_fallbacks"] = True
        if all(isinstance(t, int) for t in prompt):
            data["prompt"] = TOKEN_IDS_PLACEHOLDER
        else:
            data["prompt"] = [p if isinstance(p, str) else TOKEN_IDS_PLACEHOLDER for p in prompt]


def _is_text_completion_route(data: Mapping[str, Any]) -> bool:
    url = str((data.get("proxy_server_request") or {}).get("url") or "")
    path = url.split("?", 1)[0].rstrip("/")
    return path.endswith("/completions") and not path.endswith("/chat/completions")


def _include_usage(data: Mapping[str, Any]) -> bool:
    options = data.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


async def openai_text_chunks(response: Any, include_usage: bool) -> AsyncIterator[Any]:
    """LiteLLM's text-completion chunks in OpenAI's shape: ``text`` always a string, no
    ``usage`` on the chunks of text; when asked, one chunk at the end with the usage and
    ``choices: []``, as OpenAI sends it (LiteLLM's own usage chunk carries an empty choice)."""
    usage, last, finished = None, None, False
    async for chunk in response:
        usage = getattr(chunk, "usage", None) or usage
        chunk.usage = None
        choices = getattr(chunk, "choices", None) or []
        if finished and not any(c.text or c.finish_reason for c in choices):
            continue  # LiteLLM's usage chunk, sent again below in OpenAI's shape
        for choice in choices:
            if choice.text is None:
                choice.text = ""
        finished = finished or any(c.finish_reason for c in choices)
        last = chunk
        yield chunk
    if include_usage and usage is not None and last is not None:
        end = {"id": last.id, "created": last.created, "model": last.model}
        yield type(last)(**end, choices=[], usage=usage)


async def local_text_chunks(response: Any, key: str, model: Any) -> AsyncIterator[str]:
    """The chunks the local provider wrote for this stream (``completion.StreamWriter``), as the
    JSON the proxy sends; LiteLLM's own chunks only say when to look."""

    def written() -> list[str]:
        chunks = take_channel(key)
        if isinstance(model, str):
            for chunk in chunks:
                chunk["model"] = model  # the name the caller asked for
        return [json.dumps(chunk, separators=(",", ":")) for chunk in chunks]

    try:
        try:
            async for _ in response:
                for chunk in written():
                    yield chunk
        except Exception:
            for chunk in written():  # what was made before the failure, then its error event
                yield chunk
            raise
        for chunk in written():
            yield chunk
    finally:
        close_channel(key)


class CompletionsHook(CustomLogger):
    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        if call_type in _TEXT_COMPLETION and served_by(data.get("model"), LOCAL_PROVIDER):
            keep_prompt(data)
        return data

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict, response, request_data
    ):
        metadata = request_data.get("metadata")
        key = metadata.get(STREAM_KEY) if isinstance(metadata, Mapping) else None
        if isinstance(key, str):
            chunks = local_text_chunks(response, key, request_data.get("model"))
        elif _is_text_completion_route(request_data):
            chunks = openai_text_chunks(response, _include_usage(request_data))
        else:
            chunks = response
        async for chunk in chunks:
            yield chunk


completions_hook = CompletionsHook()
