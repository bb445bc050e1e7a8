"""Penalties and biases on the logits of the rows that ask for them, one vectorised pass a step.

What each control does to row ``r``'s logits ``l`` (the order is vLLM's: bias, then repetition,
then frequency and presence; all before the JSON/tool grammar's mask, which then sets the tokens it
forbids to -inf whatever they were):

- ``logit_bias`` (OpenAI): ``l[t] += bias[t]`` for the listed token ids.
- ``repetition_penalty`` (vLLM's and transformers' ``RepetitionPenaltyLogitsProcessor``): for
  every token seen in the prompt **or** the output so far, ``l[t] /= p`` if ``l[t] > 0`` else
  ``l[t] *= p``. Both vLLM and transformers count the prompt; so do we.
- ``frequency_penalty`` and ``presence_penalty`` (OpenAI, vLLM): ``l[t] -= frequency * c[t] +
  presence * (c[t] > 0)``, where ``c[t]`` is how often ``t`` was generated so far in this row
  (this choice: each of ``n`` choices counts its own output). Output tokens only, as OpenAI and
  vLLM define them.

The counts live in one ``[slots, vocab]`` float32 tensor (``PenaltyCounts``) with a slot per row
that needs counts (presence, frequency or repetition), taken when the row first meets the
penalties, free again once it has left the batch; with no such row the tensors are freed. A step
reads the asking rows' slots (one gather), and after sampling adds each row's token (one
``index_put_``). Rows that ask for nothing are not read or written: a batch where no row asks does
not come here at all (``Outputs.choose``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RowPenalties:
    """One row's penalties and bias (at least one of them in effect)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: tuple[tuple[int, float], ...] = ()  # (token id, value), ids distinct
    prompt_ids: list[int] = field(default_factory=list)  # for repetition: tokens seen before
    slot: int | None = None  # the row's counts in PenaltyCounts, once taken

    @property
    def counts(self) -> bool:
        """Whether the row needs the counts of its tokens."""
        return bool(self.presence or self.frequency or self.repetition != 1.0)


def row_penalties(sampling, defaults: dict, prompt_ids: list[int]) -> RowPenalties | None:
    """A row's penalties from a request's ``SamplingParams`` (the checkpoint's
    ``repetition_penalty`` by default); None when none is in effect."""
    repetition = sampling.repetition_penalty
    if repetition is None:
        repetition = defaults.get("repetition_penalty", 1.0)
    penalties = RowPenalties(
        presence=sampling.presence_penalty or 0.0,
        frequency=sampling.frequency_penalty or 0.0,
        repetition=float(repetition),
        bias=tuple((t, b) for t, b in sampling.logit_bias if b),
    )
    if not (penalties.counts or penalties.bias):
        return None
    if penalties.repetition != 1.0:
        penalties.prompt_ids = list(prompt_ids)
    return penalties


class PenaltyCounts:
    """Token counts of the rows that ask for penalties; the engine thread's only."""

    def __init__(self) -> None:
        self._counts: Any = None  # [slots, vocab] float32: tokens generated per row
        self._seen: Any = None  # [slots, vocab] bool: tokens of the prompt (repetition)
        self._free: list[int] = []

    @property
    def nbytes(self) -> int:
        if self._counts is None:
            return 0
        return self._counts.nbytes + self._seen.nbytes

    @property
    def slots(self) -> int:
        return 0 if self._counts is None else self._counts.shape[0]

    def apply(self, logits: Any, rows: list[RowPenalties | None]) -> None:
        """Penalise and bias, in place, the rows of ``logits`` ([rows, vocab], float32) whose
        entry in ``rows`` is not None; the others are not touched."""
        import torch

        asking = [i for i, p in enumerate(rows) if p is not None]
        if not asking:
            return
        device = logits.device
        whole = len(asking) == logits.shape[0]  # every row asks: in place, no copy
        index = None if whole else torch.tensor(asking, device=device)
        part = logits if whole else logits[index]  # [asking, vocab]
        biased = [(k, rows[i]) for k, i in enumerate(asking) if rows[i].bias]
        if biased:
            where = torch.tensor(
                [[k, t] for k, p in biased for t, _ in p.bias], device=device
            ).T  # [2, entries]: row in part, token
            values = torch.tensor([b for _, p in biased for _, b in p.bias], device=device)
            part.index_put_((where[0], where[1]), values, accumulate=True)
        counted = [k for k, i in enumerate(asking) if rows[i].counts]
        if counted:
            penalised = [rows[asking[k]] for k in counted]
            self._take(penalised, logits.shape[-1], device)
            slots = torch.tensor([p.slot for p in penalised], device=device)
            if len(counted) == len(asking):
                self._penalise(part, slots, penalised)
            else:
                at = torch.tensor(counted, device=device)
                some = part[at]
                self._penalise(some, slots, penalised)
                part[at] = some
        if not whole:
            logits[index] = part

    def _penalise(self, logits: Any, slots: Any, rows: list[RowPenalties]) -> None:
        """Repetition, then frequency and presence, in place on ``logits`` (one row per slot)."""
        import torch

        device = logits.device
        counts = self._counts[slots]
        present = counts > 0
        repetition = [p.repetition for p in rows]
        if any(r != 1.0 for r in repetition):
            seen = present | self._seen[slots]
            penalty = torch.tensor(repetition, device=device).unsqueeze(1)
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits.copy_(torch.where(seen, scaled, logits))
        if any(p.presence or p.frequency for p in rows):
            frequency = torch.tensor([p.frequency for p in rows], device=device).unsqueeze(1)
            presence = torch.tensor([p.presence for p in rows], device=device).unsqueeze(1)
            logits.sub_(frequency * counts + presence * present)

    def count(self, rows: list[RowPenalties | None], tokens: list[int], by: float = 1.0) -> None:
        """Add each counted row's sampled token to its counts (``by`` -1: take a draft token that
        was counted back out)."""
        import torch

        taken = [(p.slot, t) for p, t in zip(rows, tokens, strict=True) if p and p.slot is not None]
        if not taken:
            return
        where = torch.tensor(taken, device=self._counts.device).T
        one = torch.full((), by, device=self._counts.device).expand(len(taken))
        self._counts.index_put_((where[0], where[1]), one, accumulate=True)

    def retain(self, rows: list[RowPenalties | None]) -> None:
        """Keep the slots of ``rows`` (the batch's rows now) and free every other: rows that left
        and rows that never joined (a join that failed after their first token). With no slot
        held, the tensors are freed."""
        held = {p.slot for p in rows if p is not None and p.slot is not None}
        if not held:
            self.clear()
        else:
            self._free = [s for s in range(self.slots - 1, -1, -1) if s not in held]

    def clear(self) -> None:
        """Forget every row (the batch failed, or the model is unloaded)."""
        self._counts = self._seen = None
        self._free = []

    def _take(self, rows: list[RowPenalties], vocab: int, device: Any) -> None:
        """Slots for the rows that have none yet: counts zero, the prompt's tokens seen."""
        import torch

        new = [p for p in rows if p.slot is None]
        if not new:
            return
        if self._counts is not None and (
            self._counts.shape[1] != vocab or self._counts.device != torch.device(device)
        ):
            self.clear()  # another model: nothing of the old one can still be running
        if len(self._free) < len(new):
            self._grow(len(new) - len(self._free), vocab, device)
        for p in new:
            p.slot = self._free.pop()
            self._counts[p.slot].zero_()
            self._seen[p.slot].zero_()
            if p.prompt_ids:
                ids = torch.tensor(p.prompt_ids, device=device)
                self._seen[p.slot, ids.clamp(0, vocab - 1)] = True
            p.prompt_ids = []  # noted: not kept twice

    def _grow(self, more: int, vocab: int, device: Any) -> None:
        import torch

        old = self.slots
        size = max(old + more, 2 * old, 4)
        counts = torch.zeros((size, vocab), dtype=torch.float32, device=device)
        seen = torch.zeros((size, vocab), dtype=torch.bool, device=device)
        if old:
            counts[:old] = self._counts
            seen[:old] = self._seen
        self._counts, self._seen = counts, seen
        self._free.extend(range(size - 1, old - 1, -1))  # lowest first (pop from the end)
