"""OpenAI's legacy ``/v1/completions`` on a local model: the raw prompt, continued.

No chat template: each prompt is tokenized as ``generate`` would (the tokenizer's own special
tokens, BOS where the checkpoint wants one), or taken as token ids. Each prompt is one engine job
with ``n`` rows; choice ``i * n + j`` is row ``j`` of prompt ``i``, as OpenAI orders them.

Pure Python (no torch, no LiteLLM): the request's checks and the answer's shape. The provider
(``provider.py``) runs the jobs; the gateway's hook (``gateway/completions.py``) carries a
token-id prompt past LiteLLM, which cannot map one for a custom provider.
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.request import (
    MAX_TOP_LOGPROBS,
    ChatRequest,
    SamplingParams,
    parse_chat_request,
)

# Where the gateway's pre-call hook puts the request's own ``prompt`` (in ``metadata``, which
# reaches the provider as ``litellm_params["metadata"]`` and is never sent to a provider).
PROMPT_KEY = "zlocal_prompt"
# Where it puts the key of a stream's channel (``open_channel``), for a streamed completion.
STREAM_KEY = "zlocal_stream"
# OpenAI's legacy default, which vLLM keeps too: a completion without max_tokens is 16 tokens.
DEFAULT_MAX_TOKENS = 16
# Prompts in one request (each one job of the engine's queue, with n rows).
MAX_PROMPTS = 32
# Keys of /v1/completions that the chat checks do not know, or read differently.
_OWN_KEYS = ("echo", "logprobs", "suffix", "best_of", "stream_options", PROMPT_KEY, STREAM_KEY)

Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[Prompt, ...]
    chat: ChatRequest  # sampling, response_format, keep_alive (its messages are not used)
    echo: bool = False
    logprobs: int | None = None  # None: no logprobs; else alternatives per token (0..20)
    include_usage: bool = False  # a stream ends with a usage chunk (stream_options)
    prompt_only: bool = False  # echo with max_tokens 0: the prompt (and its logprobs), no text

    @property
    def sampling(self) -> SamplingParams:
        return self.chat.sampling

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.sampling.n


def prompts_of(raw: Any, messages: Any) -> Any:
    """The request's ``prompt``: as the hook kept it, else rebuilt from the messages LiteLLM made
    of it (one user message per string)."""
    if raw is not None:
        return raw
    if isinstance(messages, Sequence) and all(
        isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in messages
    ):
        texts = [m["content"] for m in messages]
        return texts[0] if len(texts) == 1 else texts
    raise InvalidRequestError(
        "'prompt' must be a string, an array of strings, an array of token ids or an array of "
        "arrays of token ids.",
        param="prompt",
    )


def parse_completion_request(
    prompt: Any, params: Mapping[str, Any], *, stream: bool, max_n: int, channel: bool = True
) -> CompletionRequest:
    """Check a text completion's ``prompt`` and parameters; ``InvalidRequestError`` (400).

    ``channel``: a stream's chunks reach the caller as the provider writes them (the gateway's
    stream hook, ``open_channel``); without it (LiteLLM's SDK alone) a stream carries one choice's
    text and no logprobs, all that LiteLLM's text-completion stream keeps."""
    prompts = _prompts(prompt)
    _refuse(params)
    chat_params = {k: v for k, v in params.items() if k not in _OWN_KEYS}
    # echo with max_tokens 0 scores the prompt alone (lm-evaluation-harness asks so); one token
    # is computed and left out of the answer, as vLLM does.
    prompt_only = params.get("echo") is True and params.get("max_tokens") == 0
    if prompt_only:
        chat_params["max_tokens"] = 1
    placeholder = [{"role": "user", "content": ""}]
    chat = parse_chat_request(placeholder, chat_params, stream=False, max_n=max_n)
    n = chat.sampling.n
    _check_best_of(params.get("best_of"), n)
    if stream and not channel and len(prompts) * n > 1:
        raise InvalidRequestError(
            "A streamed completion has one choice on the local model: send one prompt with n 1 "
            "per streaming request, or stream false for several prompts or n > 1.",
            param="n" if n > 1 else "prompt",
        )
    logprobs = _logprobs(params.get("logprobs"))
    if stream and not channel and logprobs is not None:
        raise InvalidRequestError(
            "'logprobs' with stream true is not supported on the local model's /v1/completions "
            "(LiteLLM's text-completion stream keeps only the text): send stream false.",
            param="logprobs",
        )
    echo = params.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise InvalidRequestError(f"'echo' must be true or false, got {echo!r}.", param="echo")
    return CompletionRequest(
        prompts,
        chat,
        echo=bool(echo),
        logprobs=logprobs,
        include_usage=_include_usage(params.get("stream_options")) if stream else False,
        prompt_only=prompt_only,
    )


def _prompts(prompt: Any) -> tuple[Prompt, ...]:
    shape = (
        "'prompt' must be a string, an array of strings, an array of token ids or an array of "
        "arrays of token ids"
    )
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, Sequence) and prompt and all(_is_id(t) for t in prompt):
        prompts = [tuple(prompt)]
    elif isinstance(prompt, Sequence) and prompt:
        prompts = []
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                prompts.append(item)
            elif isinstance(item, Sequence) and item and all(_is_id(t) for t in item):
                prompts.append(tuple(item))
            else:
                raise InvalidRequestError(f"{shape}; prompt[{i}] is {_kind(item)}.", param="prompt")
    else:
        raise InvalidRequestError(f"{shape}.", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequestError(
            f"'prompt' holds {len(prompts)} prompts; the local model takes at most {MAX_PROMPTS} "
            "in one request.",
            param="prompt",
        )
    return tuple(prompts)


def _is_id(token: Any) -> bool:
    return isinstance(token, int) and not isinstance(token, bool)


def _kind(item: Any) -> str:
    if isinstance(item, Sequence) and not item:
        return "empty"
    return f"a {type(item).__name__}" if not isinstance(item, list) else "a list of non-integers"


def _refuse(params: Mapping[str, Any]) -> None:
    if params.get("suffix") not in (None, ""):
        raise InvalidRequestError(
            "'suffix' is not supported by this model: it has no fill-in-the-middle tokens. "
            "Leave it unset, or use a model that can insert text.",
            param="suffix",
        )
    for name, why in (
        ("tools", "a completion continues a prompt; call tools through /v1/chat/completions"),
        ("tool_choice", "a completion continues a prompt; call tools through /v1/chat/completions"),
        ("reasoning_effort", "a completion has no chat template, so no thinking switch"),
        ("enable_thinking", "a completion has no chat template, so no thinking switch"),
    ):
        if params.get(name) not in (None, [], False, "none"):
            raise InvalidRequestError(
                f"'{name}' is not supported on /v1/completions: {why}.", param=name
            )


def _check_best_of(best_of: Any, n: int) -> None:
    if best_of is None:
        return
    if isinstance(best_of, bool) or not isinstance(best_of, int):
        raise InvalidRequestError(
            f"'best_of' must be an integer, got {best_of!r}.", param="best_of"
        )
    if best_of not in (1, n):
        raise InvalidRequestError(
            f"'best_of' {best_of} is not supported by the local model (it would rank {best_of} "
            "candidates server-side by log-probability): leave it unset or equal to n, and send "
            "n with logprobs to rank them yourself.",
            param="best_of",
        )


def _logprobs(asked: Any) -> int | None:
    if asked is None:
        return None
    if isinstance(asked, bool) or not isinstance(asked, int):
        raise InvalidRequestError(
            f"'logprobs' on /v1/completions is the number of alternatives per token (0 to "
            f"{MAX_TOP_LOGPROBS}), got {asked!r}.",
            param="logprobs",
        )
    if not 0 <= asked <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {asked}.",
            param="logprobs",
        )
    return asked


def _include_usage(options: Any) -> bool:
    if options is None:
        return False
    if not isinstance(options, Mapping):
        raise InvalidRequestError(
            "'stream_options' must be an object such as {\"include_usage\": true}.",
            param="stream_options",
        )
    return options.get("include_usage") is True


# ---- the answer ---------------------------------------------------------------------------


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


@dataclass
class Choice:
    """One choice's parts, as the provider gathered them."""

    index: int
    text: str
    finish_reason: str | None
    prompt_text: str = ""  # echoed before the text
    prompt_logprobs: list | None = None  # [(token, logprob or None, {alternative: logprob})]
    logprobs: list | None = None  # [(token, logprob, {alternative: logprob})] of the text


def logprobs_block(entries: list[tuple[str, float | None, dict | None]], start: int = 0) -> dict:
    """OpenAI's legacy ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict
    token -> logprob per position) and ``text_offset`` (where each token starts in the text)."""
    tokens, offsets, at = [], [], start
    for token, _, _ in entries:
        tokens.append(token)
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [top for _, _, top in entries],
        "text_offset": offsets,
    }


def choice_body(choice: Choice, echo: bool, logprobs: bool) -> dict[str, Any]:
    """One choice of the answer, as OpenAI writes it."""
    text = (choice.prompt_text if echo else "") + choice.text
    block = None
    if logprobs:
        entries = list(choice.prompt_logprobs or []) if echo else []
        start = len(choice.prompt_text) if echo else 0
        prompt_part = logprobs_block(entries) if entries else None
        text_part = logprobs_block(choice.logprobs or [], start)
        block = text_part
        if prompt_part is not None:
            block = {key: prompt_part[key] + text_part[key] for key in text_part}
    return {
        "index": choice.index,
        "text": text,
        "logprobs": block,
        "finish_reason": choice.finish_reason,
    }


def response_body(
    response_id: str,
    model: str,
    choices: list[Choice],
    usage: dict[str, int],
    echo: bool,
    logprobs: bool,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice_body(c, echo, logprobs) for c in sorted(choices, key=lambda c: c.index)],
        "usage": usage,
    }


class StreamWriter:
    """A streamed completion's chunks, as OpenAI sends them: one choice per chunk, its ``text``
    always a string, ``logprobs`` of the tokens behind it with offsets that run on through the
    choice's text, and the usage (when asked) in a last chunk with ``choices: []``."""

    def __init__(self, model: str, logprobs: bool):
        self.id, self.created, self.model = completion_id(), int(time.time()), model
        self.logprobs = logprobs
        self._offsets: dict[int, int] = {}

    def chunk(
        self, index: int, text: str, entries: list | None = None, finish: str | None = None
    ) -> dict[str, Any]:
        start = self._offsets.get(index, 0)
        self._offsets[index] = start + len(text)
        block = logprobs_block(entries or [], start) if self.logprobs else None
        choice = {"index": index, "text": text, "logprobs": block, "finish_reason": finish}
        return self._chunk([choice])

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._chunk([]), "usage": usage}

    def _chunk(self, choices: list) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


# Streams whose chunks the provider writes and the gateway's stream hook sends: key -> chunks.
# The hook makes the key (``STREAM_KEY`` in the request's metadata) and drops the channel when
# its stream ends, however it ends.
_CHANNELS: dict[str, collections.deque] = {}


def open_channel(key: str) -> collections.deque:
    return _CHANNELS.setdefault(key, collections.deque())


def take_channel(key: str) -> list[dict[str, Any]]:
    """The chunks written since the last take, oldest first."""
    channel = _CHANNELS.get(key)
    taken = []
    while channel:
        taken.append(channel.popleft())
    return taken


def close_channel(key: str) -> None:
    _CHANNELS.pop(key, None)
