"""The running batch's KV cache: one slot per row, allocated ahead and written in place.

Per layer, keys and values live in ``[slots, kv_heads, columns, head_dim]`` tensors. Row ``i`` is
slot ``i``; its tokens fill columns ``0 .. length-1`` (right-padded). A decoding step writes each
row's new key and value at that row's own column (``index_put_``, in place) and attends over the
columns ``0 .. longest`` as a view, a mask hiding each row's padding. Nothing is reallocated per
step: the step that grew a transformers ``DynamicCache`` by ``torch.cat`` copied the whole cache
each time (for Qwen3-4B at 4k tokens, ~1.2 GB per row per step on a GPU).

- **Joining** rows copy their prefill's KV into their slots (``n`` choices: the one prompt into
  ``n`` slots); nobody else's KV moves. Room is reserved for each row's whole answer (prompt +
  max_new_tokens), so a running row never needs more columns.
- **Growing**: the pool starts small and grows, slots by powers of two up to the batch size and
  columns to the longest reservation (rounded up to ``COLUMN_STEP``): a copy, only when a row
  joins that does not fit, never during decoding.
- **Leaving** rows free their slots; the rows after them move down (rows leave in order), so the
  rows in use stay ``0 .. rows-1``. The last row leaving frees the pool: an idle model holds no KV
  (``keep_pool``: it stays while the model is loaded, for CUDA graphs that point into it; the
  engine frees it with the model).
- **Reserved whole, for CUDA graphs** (``reserve``): graphs point into the pool, so a pool that
  grew by moving to new tensors would drop every graph. With graphs and a budget, the budget is
  allocated at once (at most ``max_slots`` rows of the model's whole context), as one block per
  layer, and the pool's shape is a view of it: ``slots x columns`` with the most slots whose
  columns hold the longest reservation. A row needing more columns than the shape has changes the
  shape (the running rows' KV is moved within the block); the block never moves, so graphs
  captured for a shape stay valid and serve again when the shape comes back.
- **Budget**: the pool never takes more than ``budget_bytes`` (``LOCAL_LLM_KV_CACHE_MB``). A job
  whose rows would not fit next to the running ones waits for rows to leave (``fits``); one that
  could not fit alone is refused before it is queued (``KVBudget.check``: 400).

Why not a paged cache (vLLM, transformers' continuous batching): a page table needs an attention
kernel that reads pages (``paged|sdpa`` in transformers is their own batching's), and a gather
before plain SDPA would copy the cache every step again. Fixed slots keep plain SDPA and pay in
padding instead: a short row next to a long one reserves as many columns as the long one.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any

from custom_handlers.inference.errors import InvalidRequestError

COLUMN_STEP = 256  # columns are reserved in multiples of this many tokens


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_token_bytes(config: Any, dtype: str) -> int:
    """Bytes of keys and values one token takes in the cache, over all layers, in ``dtype`` (the
    model's compute dtype: the KV of a 4-bit model is in it too)."""
    layers, heads, head_dim = kv_shape(config)
    return 2 * layers * heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


def kv_shape(config: Any) -> tuple[int, int, int]:
    """Layers, key-value heads and head size of a model's KV cache."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def columns_for(tokens: int) -> int:
    """Columns that hold ``tokens``: a multiple of ``COLUMN_STEP``."""
    return max(COLUMN_STEP, math.ceil(tokens / COLUMN_STEP) * COLUMN_STEP)


def power_of_two(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


_POOL_IDS = itertools.count(1)


@dataclass(frozen=True)
class Step:
    """What one step calls the model with: ``rows`` rows (slots ``0 .. rows-1``) attending over
    columns ``0 .. width-1``. One token a row (``taken`` None): row ``row_index[i]`` writes its new
    key and value at column ``write_at[i]``. Several (a block, ``taken`` ``[rows, T]`` bool, the
    inputs that are tokens, the rest padding): the ``i``-th token taken, in row-major order, is
    written in row ``row_index[i]`` at column ``write_at[i]``; padding writes nothing. Packed
    (``packed``: the rows' tokens one after another in one sequence, ``packed.py``): the ``i``-th
    token is written in row ``row_index[i]`` at column ``write_at[i]``."""

    rows: int
    width: int
    row_index: Any  # int64: [rows] 0 .. rows-1, or [tokens taken]
    write_at: Any  # int64: [rows], or [tokens taken]
    taken: Any = None  # [rows, T] bool for a block step
    packed: bool = False  # the tokens of every row in one sequence [1, N]


@dataclass(frozen=True)
class KVBudget:
    """What the pool may hold: ``budget_bytes`` (0: no limit) of ``token_bytes`` each."""

    budget_bytes: int
    token_bytes: int
    max_slots: int

    context: int = 0  # the model's context (tokens): no row needs more columns; 0: unknown

    def bytes_for(self, slots: int, columns: int) -> int:
        return slots * columns * self.token_bytes

    def capacity(self) -> int:
        """Tokens a reserved pool holds (``KVBatch.reserve``): the budget, but no more than
        ``max_slots`` rows of the whole context; 0 without a budget (nothing to reserve)."""
        if self.budget_bytes <= 0:
            return 0
        tokens = self.budget_bytes // self.token_bytes
        if self.context > 0:
            tokens = min(tokens, self.max_slots * columns_for(self.context))
        return tokens

    def shape_for(self, rows: int, columns: int) -> tuple[int, int] | None:
        """A reserved pool's shape for ``rows`` rows of ``columns`` columns: the most slots
        (at most ``max_slots``) whose share of the capacity holds ``columns``; None if none."""
        capacity = self.capacity()
        for slots in range(self.max_slots, max(rows, 1) - 1, -1):
            have = capacity // slots // COLUMN_STEP * COLUMN_STEP
            if have >= columns:
                return slots, have
        return None

    def tokens_alone(self, rows: int) -> int | None:
        """The most tokens (prompt + answer) each of ``rows`` rows may reserve when alone."""
        if self.budget_bytes <= 0:
            return None
        per_row = self.budget_bytes // (max(rows, 1) * self.token_bytes)
        return per_row // COLUMN_STEP * COLUMN_STEP

    def check(self, rows: int, tokens: int) -> None:
        """400 for a job that could not fit even with the pool to itself."""
        need = self.bytes_for(rows, columns_for(tokens))
        if self.budget_bytes <= 0 or need <= self.budget_bytes:
            return
        need /= 2**20
        raise InvalidRequestError(
            f"This request needs {need:,.0f} MiB of KV cache ({rows} choice(s) x {tokens} tokens "
            f"of prompt and max_tokens), more than the local model's KV cache "
            f"({self.budget_bytes / 2**20:,.0f} MiB, LOCAL_LLM_KV_CACHE_MB). Reduce max_tokens, "
            "the prompt or n.",
            param="max_tokens",
        )


class KVBatch:
    """The batch's KV slots. ``cache`` is what the model is called with while rows exist."""

    def __init__(self, budget: KVBudget | None = None, keep_pool: bool = False) -> None:
        self.budget = budget
        self.keep_pool = keep_pool  # the pool outlives its last row (CUDA graphs point into it)
        self.pool_id = 0  # changes whenever the pool's tensors do (0: no pool)
        self.cache: Any = None  # SlotCache over the pool
        self.lengths: list[int] = []  # each row's tokens in the cache
        self.reserved: list[int] = []  # each row's most tokens (prompt + max_new_tokens)
        self.keys: list[Any] = []  # per layer, [slots, kv_heads, columns, head_dim]
        self.values: list[Any] = []
        self.step: Step | None = None  # the step the model is being called for
        self._blocks: list[Any] = []  # reserved: per layer, keys' then values' flat block

    @property
    def rows(self) -> int:
        return len(self.reserved)

    @property
    def slots(self) -> int:
        keys = self.keys  # one read: another thread may be reporting the state
        return keys[0].shape[0] if keys else 0

    @property
    def columns(self) -> int:
        keys = self.keys
        return keys[0].shape[2] if keys else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the pool (read from other threads: the lists are replaced, never filled)."""
        blocks = self._blocks
        if blocks:
            return sum(t.nbytes for t in blocks)
        keys, values = self.keys, self.values
        return sum(t.nbytes for t in keys) + sum(t.nbytes for t in values)

    def fits(self, rows: int, tokens: int) -> bool:
        """Whether ``rows`` more rows reserving ``tokens`` each fit next to the running ones."""
        if self.budget is None or self.budget.budget_bytes <= 0:
            return True
        if self._blocks:
            return self._shape_for(rows, tokens) is not None
        slots, columns = self._size_for(rows, tokens)
        return self.budget.bytes_for(slots, columns) <= self.budget.budget_bytes

    def _shape_for(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """A reserved pool's shape with ``rows`` more rows: the present one while it holds them
        (no move), else ``KVBudget.shape_for``."""
        needed = self.rows + rows
        columns = columns_for(max([tokens, *self.reserved]))
        if self.slots >= needed and self.columns >= columns:
            return self.slots, self.columns
        return self.budget.shape_for(needed, columns)

    def can_reserve(self) -> bool:
        return self.budget is not None and self.budget.shape_for(1, COLUMN_STEP) is not None

    def reserve(self, config: Any, dtype: str, device: Any) -> None:
        """Allocate the whole budget now (``KVBudget.capacity`` tokens) for a model of this
        ``config`` computing in ``dtype`` (its name), shaped with the most slots (``can_reserve``:
        there is room for one row of ``COLUMN_STEP`` columns)."""
        import torch

        layers, heads, dim = kv_shape(config)
        dtype = getattr(torch, dtype) if dtype in _DTYPE_BYTES else torch.float32
        capacity = self.budget.capacity()
        slots, columns = self.budget.shape_for(1, COLUMN_STEP)
        size = capacity * heads * dim
        # Zeros, not empty: masked columns still meet the values (0 x NaN is NaN).
        self._blocks = [torch.zeros(size, dtype=dtype, device=device) for _ in range(2 * layers)]
        self._shape_views(slots, columns, heads, dim)
        self.cache = slot_cache(self)
        self.pool_id = next(_POOL_IDS)

    def _shape_views(self, slots: int, columns: int, heads: int, dim: int) -> None:
        used = slots * heads * columns * dim
        views = [block[:used].view(slots, heads, columns, dim) for block in self._blocks]
        self.keys, self.values = views[0::2], views[1::2]

    def _reshape(self, slots: int, columns: int) -> None:
        """The reserved pool's shape becomes ``slots x columns``; the running rows' KV moves
        with it (the block stays where it is)."""
        _, heads, _, dim = self.keys[0].shape
        rows, used = self.rows, max(self.lengths, default=0)
        kept = (
            [
                (k[:rows, :, :used].clone(), v[:rows, :, :used].clone())
                for k, v in zip(self.keys, self.values, strict=True)
            ]
            if rows and used
            else []
        )
        for block in self._blocks:
            block.zero_()
        self._shape_views(slots, columns, heads, dim)
        for (k, v), mine_k, mine_v in zip(kept, self.keys, self.values, strict=False):
            mine_k[:rows, :, :used] = k
            mine_v[:rows, :, :used] = v

    def _size_for(self, rows: int, tokens: int) -> tuple[int, int]:
        """The pool's size with ``rows`` more rows: columns for the longest reservation; slots by
        powers of two (few regrowths) but never more than the budget or the batch allows."""
        needed = self.rows + rows
        columns = max(self.columns, columns_for(max([tokens, *self.reserved])))
        slots = power_of_two(needed)
        if self.budget is not None:
            slots = min(slots, self.budget.max_slots)
            if self.budget.budget_bytes > 0:
                slots = min(slots, self.budget.budget_bytes // (columns * self.budget.token_bytes))
        return max(self.slots, needed, slots), columns

    def add(self, cache: Any, rows: int, length: int, tokens: int) -> None:
        """Give ``rows`` rows the KV of their prefill (``cache``, 1 or ``rows`` rows of ``length``
        tokens), reserving ``tokens`` columns for each."""
        if self._blocks:
            shape = self._shape_for(rows, tokens)
            if shape is None:  # the engine admits only what fits: a bug if seen
                raise RuntimeError(f"{rows} row(s) of {tokens} tokens do not fit the KV pool")
            if shape != (self.slots, self.columns):
                self._reshape(*shape)
        else:
            slots, columns = self._size_for(rows, tokens)
            if not self.keys:
                self._allocate(cache, slots, columns)
            elif (slots, columns) != (self.slots, self.columns):
                self._grow(slots, columns)
        start = self.rows
        for mine_k, mine_v, theirs in zip(self.keys, self.values, cache.layers, strict=True):
            mine_k[start : start + rows, :, :length] = theirs.keys
            mine_v[start : start + rows, :, :length] = theirs.values
        self.lengths.extend([length] * rows)
        self.reserved.extend([tokens] * rows)

    def _allocate(self, cache: Any, slots: int, columns: int) -> None:
        import torch

        keys, values = [], []
        for layer in cache.layers:
            _, heads, _, dim = layer.keys.shape
            shape = (slots, heads, columns, dim)
            # Zeros, not empty: masked columns still meet the values (0 x NaN is NaN).
            keys.append(torch.zeros(shape, dtype=layer.keys.dtype, device=layer.keys.device))
            values.append(torch.zeros(shape, dtype=layer.values.dtype, device=layer.values.device))
        self.keys, self.values = keys, values
        self.cache = slot_cache(self)
        self.pool_id = next(_POOL_IDS)

    def _grow(self, slots: int, columns: int) -> None:
        import torch

        rows, used = self.rows, self.columns

        def grown(old):
            _, heads, _, dim = old.shape
            new = torch.zeros((slots, heads, columns, dim), dtype=old.dtype, device=old.device)
            new[:rows, :, :used] = old[:rows]
            return new

        self.keys = [grown(t) for t in self.keys]
        self.values = [grown(t) for t in self.values]
        self.pool_id = next(_POOL_IDS)

    def advance(self, counts: list[int] | None = None) -> None:
        """Each row holds one more token after a step, or ``counts[i]`` more after a block."""
        if counts is None:
            self.lengths = [length + 1 for length in self.lengths]
        else:
            self.lengths = [length + n for length, n in zip(self.lengths, counts, strict=True)]

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, in this order (ascending); their slots become ``0..k-1``."""
        import torch

        if not indices:
            self.lengths, self.reserved = [], []
            if not self.keep_pool:  # the pool is freed with its last row
                self.free()
            return
        if indices == list(range(self.rows)):
            return
        # Rows before the first that left stay put; the ones after it move down.
        first = next((i for i, kept in enumerate(indices) if kept != i), len(indices))
        if first < len(indices):
            moving = indices[first:]
            used = max(self.lengths[i] for i in moving)
            where = torch.tensor(moving, device=self.keys[0].device)
            for store in (self.keys, self.values):
                for tensor in store:
                    tensor[first : len(indices), :, :used] = tensor[where, :, :used]
        self.lengths = [self.lengths[i] for i in indices]
        self.reserved = [self.reserved[i] for i in indices]

    def free(self) -> None:
        """Return the pool's memory (no row may be left)."""
        self.cache, self.lengths, self.reserved, self.step = None, [], [], None
        self.keys, self.values, self.pool_id, self._blocks = [], [], 0, []


@functools.cache
def _slot_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """One layer's view of the pool, as transformers' attention calls it."""

        def __init__(self, batch: KVBatch, index: int):
            super().__init__()
            self.batch, self.index = batch, index
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            batch, step = self.batch, self.batch.step
            keys, values = batch.keys[self.index], batch.values[self.index]
            if step.packed:  # [1, heads, N, dim] -> [N, heads, dim]
                where = (step.row_index, slice(None), step.write_at)
                keys[where] = key_states[0].transpose(0, 1)
                values[where] = value_states[0].transpose(0, 1)
                return keys[: step.rows, :, : step.width], values[: step.rows, :, : step.width]
            if key_states.shape[0] != step.rows:
                raise RuntimeError(
                    f"the step has {step.rows} rows, the model gave keys for {key_states.shape[0]}"
                )
            where = (step.row_index, slice(None), step.write_at)
            if step.taken is None:
                if key_states.shape[2] != 1:
                    raise RuntimeError("a one-token step got several tokens a row")
                keys[where] = key_states[:, :, 0]
                values[where] = value_states[:, :, 0]
            else:  # [rows, heads, T, dim] -> the tokens taken, [n, heads, dim]
                keys[where] = key_states.transpose(1, 2)[step.taken]
                values[where] = value_states.transpose(1, 2)[step.taken]
            return keys[: step.rows, :, : step.width], values[: step.rows, :, : step.width]

        def get_seq_length(self) -> int:
            return self.batch.step.width - 1

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.batch.step.width - 1 + query_length, 0

        def get_max_length(self) -> int:
            return self.batch.columns

    return SlotLayer


def slot_cache(batch: KVBatch) -> Any:
    """A transformers ``Cache`` whose layers read and write ``batch``'s slots."""
    from transformers.cache_utils import Cache

    layer = _slot_layer_class()
    return Cache(layers=[layer(batch, i) for i in range(len(batch.keys))])
