"""Prompts' KV kept after their prefill, so a later prompt that starts the same way skips that part.

Z-Explorer sends the same system prompt with every request, and a chat sends its earlier turns
again: their keys and values are the same each time. After a prefill the engine keeps the prompt's
per-layer KV tensors here (no copy: the batch never writes into a tensor, it makes new ones); a new
prompt looks for the entry sharing its longest beginning, starts its cache from that many tokens,
and prefills only the rest. Entries are evicted least recently used past a byte budget
(``LOCAL_LLM_PREFIX_CACHE_MB``), and dropped when the model is unloaded or a step runs out of
memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# Prompts shorter than this are not kept: their prefill is cheap, the bookkeeping is not free.
MIN_TOKENS = 32


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    layers: list[tuple[Any, Any]]  # (keys, values) per layer, [1, heads, tokens, head_dim]
    nbytes: int


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0  # prompts that reused a prefix
        self.reused_tokens = 0  # prompt tokens not prefilled again, over all hits

    def longest(self, tokens: list[int]) -> tuple[_Entry | None, int]:
        """The entry sharing the longest beginning with ``tokens``, and how many tokens to reuse
        (at least ``MIN_TOKENS``, and never the last: its logits are needed)."""
        best, best_len = None, 0
        for entry in self._entries.values():
            shared = _shared(entry.tokens, tokens)
            if shared > best_len:
                best, best_len = entry, shared
        best_len = min(best_len, len(tokens) - 1)
        if best is None or best_len < MIN_TOKENS:
            return None, 0
        self._entries.move_to_end(best.tokens)
        self.hits += 1
        self.reused_tokens += best_len
        return best, best_len

    def add(self, tokens: list[int], cache: Any) -> None:
        """Keep a prompt's KV (the prefill's ``DynamicCache`` of exactly these tokens)."""
        if self.budget <= 0 or len(tokens) < MIN_TOKENS:
            return
        key = tuple(tokens)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.budget:
            return
        self._drop(key)
        self._entries[key] = _Entry(key, layers, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def state(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "hits": self.hits,
            "reused_tokens": self.reused_tokens,
        }

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes


def start_cache(entry: _Entry, length: int, config: Any, rows: int = 1):
    """A new ``DynamicCache`` holding the first ``length`` tokens of ``entry``, for ``rows``
    prompts that all start with them (not copied here: the prefill's update makes new tensors)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (keys, values) in enumerate(entry.layers):
        keys, values = keys[:, :, :length], values[:, :, :length]
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), i)
    return cache


def _shared(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
