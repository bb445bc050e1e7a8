"""A step in which each row takes its own number of tokens, packed into one sequence (issue 24).

A prefill chunk of a few hundred tokens next to rows decoding one token each: padded to a
``[rows, T]`` block (``decode.block_forward``) the one-token rows would cost as much as the chunk
each (on this CPU, 5 rows x 256 tokens instead of 260: the linear layers are most of a pass).
Packed, the rows' tokens go through the model as one sequence ``[1, N]``: every linear layer,
norm and rotary embedding runs once over the ``N`` tokens the rows really take. Only attention
needs the rows apart (each token sees its own row's columns up to its position): the model's
attention function is ours (``ATTENTION``, registered with transformers' ``AttentionInterface``,
the documented way to plug in an attention), and for a packed step it attends row by row:

- the rows taking one token: one ``scaled_dot_product_attention`` over slots ``0 .. rows-1``,
  a query per slot (a row that takes several tokens has a dummy query there, its output unused),
  each masked to its own columns, as a decoding step;
- each row taking several: its own call, its queries against its slot's columns up to its last
  position, causal among themselves.

Every other step (one token a row, the CUDA graphs, a prefill, ``generate``) goes to
transformers' own SDPA attention unchanged: ``ATTENTION`` is that function whenever the call
carries no ``packed`` plan. The KV writes are the slot pool's (``SlotLayer.update`` with a packed
``Step``): the ``i``-th token writes in slot ``row_index[i]`` at column ``write_at[i]``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from custom_handlers.inference.kvbatch import KVBatch, Step

log = logging.getLogger("custom_handlers.engine")

ATTENTION = "zlocal_sdpa"  # the attention the local models run with (SDPA, packed steps too)


@dataclass(frozen=True)
class Segment:
    """Row ``slot``'s tokens in a packed step: ``count`` of them from packed index ``start``,
    at positions ``position .. position + count - 1`` of the row."""

    slot: int
    start: int
    count: int
    position: int


@dataclass
class Packed:
    """The attention's plan for one packed step (built once, read by every layer)."""

    rows: int  # the batch's rows (slots 0 .. rows-1)
    one_mask: Any  # bool [rows, 1, 1, width]: the one-token rows' columns
    one_index: Any  # int64 [k]: packed indices of the one-token rows' tokens
    one_slots: Any  # int64 [k]: their slots
    many: list[Segment]  # the rows taking several tokens
    many_masks: list[Any]  # bool [1, 1, count, position + count] each


@functools.cache
def register() -> None:
    """Make ``ATTENTION`` known to transformers (once; before a model is set to it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, slot_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_packed_attention(model: Any) -> bool:
    """Switch a model that runs transformers' SDPA attention to ``ATTENTION`` (the same for every
    call but packed steps); False for a model with another attention (eager, flash): it keeps it
    and gets no packed steps."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == ATTENTION:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        register()
        model.set_attn_implementation(ATTENTION)
    except Exception as exc:  # another transformers than this was written for: no chunks
        log.warning("Chunked prefill is off: the packed attention could not be set (%s)", exc)
        return False
    return model.config._attn_implementation == ATTENTION


def slot_attention(module, query, key, value, attention_mask, packed: Packed | None = None, **kw):
    """transformers' SDPA attention; for a packed step (``packed``), row by row (module doc).
    ``query`` is ``[1, heads, N, dim]``; ``key`` and ``value`` the pool's slots ``[rows,
    kv_heads, width, dim]`` (``SlotLayer.update``). Returns ``[1, N, heads, dim]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    _, heads, tokens, dim = query.shape
    out = query.new_empty(1, tokens, heads, dim)
    if packed.one_index.numel():
        queries = query.new_zeros(packed.rows, heads, 1, dim)
        queries[packed.one_slots] = query[0, :, packed.one_index].transpose(0, 1)[:, :, None]
        width = packed.one_mask.shape[-1]
        rows = packed.rows
        attended, _ = sdpa_attention_forward(
            module, queries, key[:rows, :, :width], value[:rows, :, :width], packed.one_mask, **kw
        )  # [rows, 1, heads, dim]
        out[0, packed.one_index] = attended[packed.one_slots, 0]
    for segment, mask in zip(packed.many, packed.many_masks, strict=True):
        end = segment.position + segment.count
        slot, first = segment.slot, segment.start
        attended, _ = sdpa_attention_forward(
            module,
            query[:, :, first : first + segment.count],
            key[slot : slot + 1, :, :end],
            value[slot : slot + 1, :, :end],
            mask,
            **kw,
        )  # [1, count, heads, dim]
        out[:, first : first + segment.count] = attended
    return out, None


def packed_forward(model: Any, batch: KVBatch, rows: list[list[int]], keep: list[int]) -> Any:
    """Logits ``[len(keep), vocab]`` of one packed step: row ``i`` (slot ``i``) takes the tokens
    ``rows[i]`` (none: it sits this step out) at its next positions; ``keep`` are the packed
    indices whose logits are wanted (a row's tokens are numbered in order, the rows one after
    another)."""
    import torch

    device = model.device
    lengths = batch.lengths
    ids, positions, slots, segments = [], [], [], []
    ones = [-1] * len(rows)
    for slot, tokens in enumerate(rows):
        start, position = len(ids), lengths[slot]
        ids += tokens
        positions += range(position, position + len(tokens))
        slots += [slot] * len(tokens)
        if len(tokens) == 1:
            ones[slot] = start
        elif tokens:
            segments.append(Segment(slot, start, len(tokens), position))
    one_slots = [slot for slot, index in enumerate(ones) if index >= 0]
    width = max((lengths[s] + 1 for s in one_slots), default=0)
    columns = torch.arange(max(width, 1), device=device)
    # A row with no token of its own here attends to its column 0 only (its output is dropped):
    # a row masked whole would give NaN, and NaN times nothing is still NaN downstream.
    seen = [lengths[s] if ones[s] >= 0 else 0 for s in range(len(rows))]
    seen = torch.tensor(seen, device=device)
    plan = Packed(
        rows=len(rows),
        one_mask=(columns[None, :] <= seen[:, None])[:, None, None, :],
        one_index=torch.tensor([ones[s] for s in one_slots], device=device, dtype=torch.int64),
        one_slots=torch.tensor(one_slots, device=device, dtype=torch.int64),
        many=segments,
        many_masks=[_causal(s, device) for s in segments],
    )
    position_ids = torch.tensor([positions], device=device)
    widest = max([width, *(s.position + s.count for s in segments)])
    batch.step = Step(
        len(rows),
        widest,
        torch.tensor(slots, device=device),
        position_ids[0],
        packed=True,
    )
    out = model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=position_ids,
        # A 4D mask: transformers passes it on as it is and builds none (the plan is the mask).
        attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),
        cache=batch.cache,
        use_cache=True,
        logits_to_keep=torch.tensor(keep, device=device, dtype=torch.int64),
        packed=plan,
    )
    return out.logits[0]


def _causal(segment: Segment, device: Any) -> Any:
    """``[1, 1, count, position + count]``: token ``j`` of the segment sees columns up to
    ``position + j``."""
    import torch

    columns = torch.arange(segment.position + segment.count, device=device)
    last = torch.arange(segment.count, device=device) + segment.position
    return (columns[None, :] <= last[:, None])[None, None]
