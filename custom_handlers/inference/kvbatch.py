"""The running batch's KV cache: rows of different lengths, left-padded to one length.

transformers' ``DynamicCache`` holds ``[batch, heads, length, head_dim]`` tensors per layer. Rows
join (their prefill cache is left-padded or the batch is) and leave (``batch_select_indices``)
between decoding steps; padding columns no row needs any more are trimmed, so the cache never
grows beyond the longest row in it. ``mask`` marks real tokens (1) and padding (0).
"""

from __future__ import annotations

from typing import Any


class KVBatch:
    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: Any = None  # [rows, length] int64

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, cache: Any, rows: int, length: int) -> None:
        """Append ``rows`` rows whose cache (from their own prefill) is ``length`` long."""
        import torch

        mask = torch.ones(rows, length, dtype=torch.long, device=self._device(cache))
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], length)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat(
                [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
            )
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)])

    def step_mask(self) -> Any:
        """The attention mask for one more token per row; becomes ``mask`` after the step."""
        import torch

        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order); frees the rest."""
        import torch

        if not indices:
            self.cache = self.mask = None
            return
        if indices == list(range(self.rows)):
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
        self.mask = self.mask[:, start:]

    @staticmethod
    def _device(cache: Any):
        return cache.layers[0].keys.device


def _left_pad(states, width: int):
    import torch.nn.functional as F

    missing = width - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states


def _left_pad_mask(mask, width: int):
    import torch.nn.functional as F

    missing = width - mask.shape[1]
    return F.pad(mask, (missing, 0)) if missing else mask
