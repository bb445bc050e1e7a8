"""Draft tokens and their check: prompt-lookup drafts, and accepting a draft without changing what
a row would have written (issue 24).

A row that feeds a draft of ``k`` tokens after its last one gets, in one forward pass, the model's
distribution at each of the ``k + 1`` positions (``decode.block_forward``). ``accept`` then keeps
the longest prefix of the draft the row would have written itself, and one more token:

- **greedy**: draft token ``i`` is kept while it is the argmax at position ``i``; the first that
  is not is replaced by the argmax (the correction); all kept: the argmax after the last is added.
  The output is exactly greedy decoding's, token for token.
- **sampled** (speculative sampling with a draft that proposes one token with certainty, as
  vLLM's n-gram drafts are checked): draft token ``d`` at a position whose distribution is ``p`` is
  kept with probability ``p(d)``; otherwise the token is drawn from ``p`` without ``d``
  (renormalised), and the rest is dropped. Each emitted token is then distributed as drawing from
  ``p`` itself: ``P(d) = p(d)``, and ``P(x) = (1 - p(d)) p(x) / (1 - p(d)) = p(x)`` for ``x != d``.
  The row's own generator draws every number, so a seeded request is reproducible (though not
  the same answer as without a draft: the draws differ).

``p`` is the row's distribution after everything that shapes it (temperature, top-k/top-p/min-p,
the grammar's mask): the caller passes logits already processed, one row a position.

Grammar drafts (``forced_draft``): the tokens a constrained row's grammar forces from where it
stands, checked with the grammar's mask at each position of the pass (``constraints.mask_along``).

Drafts (``PromptLookup``): the tokens that followed the last earlier occurrence of the row's last
``n`` tokens (``n`` from ``max_ngram`` down to ``min_ngram``) in its prompt and answer so far, as
transformers' ``prompt_lookup_num_tokens`` and vLLM's n-gram speculator do; kept in an index of
n-grams updated as tokens come, so a draft costs a dictionary look-up, not a scan of the prompt.
"""

from __future__ import annotations

from typing import Any


class PromptLookup:
    """One row's tokens (prompt, then answer) and the draft they suggest."""

    def __init__(self, tokens: list[int], max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = list(tokens)
        # n-gram -> where the token after its first and its last occurrence stands
        self._first: dict[tuple[int, ...], int] = {}
        self._last: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # tokens[:_indexed] are in the index

    def extend(self, tokens) -> None:
        """The row's new tokens. Indexed at the next draft, not here: a row in a batch of more
        than ``scheduler.LOOKUP_ROWS`` rows does not draft, and indexing here ran for every row at
        every step (3-8 us each on this CPU, the largest part of a step's text work; issue 23,
        item 4). The same index either way."""
        self.tokens.extend(tokens)

    def _index(self) -> None:
        tokens, first, last = self.tokens, self._first, self._last
        for end in range(self._indexed + 1, len(tokens) + 1):
            # The n-grams ending at the token before this one: their next token is now known.
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - 1 - n >= 0:
                    gram = tuple(tokens[end - 1 - n : end - 1])
                    first.setdefault(gram, end - 1)
                    last[gram] = end - 1
        self._indexed = len(tokens)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest match of the last tokens: after its most
        recent occurrence, or after its first if that one is followed by more (a run that repeats
        itself: its last occurrence overlaps the tokens just written)."""
        if k <= 0:
            return []
        if self._indexed < len(self.tokens):
            self._index()
        end = len(self.tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if n > end:
                continue
            gram = tuple(self.tokens[end - n :])
            at = self._last.get(gram)
            if at is not None:
                recent = self.tokens[at : at + k]
                if len(recent) < k:
                    first = self.tokens[self._first[gram] : self._first[gram] + k]
                    return first if len(first) > len(recent) else recent
                return recent
        return []


def forced_draft(matcher: Any, limit: int, least: int = 1) -> list[int]:
    """A constrained row's draft: the tokens its grammar forces from here (``JsonMatcher.draft``,
    llguidance's fast-forward tokens), at most ``limit``, cut where the grammar would refuse one
    (never seen; it keeps ``fill_along`` safe), none if fewer than ``least``. Checked as any draft:
    the model may prefer another split of the same bytes, and then writes its own."""
    draft = allowed_part(matcher, matcher.draft(limit))
    return draft if len(draft) >= max(least, 1) else []


def allowed_part(matcher: Any, draft: list[int]) -> list[int]:
    """``draft`` up to the first token the row's grammar would refuse from here (``JsonMatcher``:
    nothing consumed): what ``constraints.mask_along`` can check."""
    return draft[: matcher.allowed(draft)] if draft else draft


def accept(logits: Any, draft: list[int], greedy: bool, generator: Any = None) -> list[int]:
    """The tokens a row writes from one pass over its last token and ``draft``: ``logits`` is
    ``[len(draft) + 1, vocab]``, the row's processed logits at each position (-inf: not allowed).
    1 to ``len(draft) + 1`` tokens: the draft's kept prefix, then a correction or a bonus token."""
    import torch

    if greedy:
        best = logits.argmax(dim=-1).tolist()
        out = []
        for i, token in enumerate(draft):
            if best[i] != token:
                return [*out, best[i]]
            out.append(token)
        return [*out, best[len(draft)]]
    probs = logits.float().softmax(dim=-1)
    device = logits.device
    chances = torch.rand(len(draft), generator=generator, device=device).tolist() if draft else []
    drafted = torch.tensor(draft, device=device, dtype=torch.long)
    kept = probs[torch.arange(len(draft), device=device), drafted].tolist() if draft else []
    out = []
    for i, token in enumerate(draft):
        if chances[i] < kept[i]:
            out.append(token)
            continue
        rest = probs[i].clone()
        rest[token] = 0.0
        return [*out, _draw(rest, generator)]
    return [*out, _draw(probs[len(draft)], generator)]


def _draw(probs: Any, generator: Any) -> int:
    import torch

    if float(probs.sum()) <= 0.0:  # nothing left: the draft token had all the mass (kept above)
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))
