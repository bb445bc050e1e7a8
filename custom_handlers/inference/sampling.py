"""Next-token choice for a batch whose rows each have their own sampling parameters.

One vectorised pass for all sampled rows (temperature, min-p, top-k, top-p), greedy rows by
argmax. Penalties and ``logit_bias`` change the logits before this, greedy rows' included
(``penalties.py``). Each
row draws its randomness from its own ``torch.Generator``, so a seeded request gives the same
answer whatever else shares the batch. Sampling uses the Gumbel-max trick: the argmax of
``logits + Gumbel noise`` is a draw from ``softmax(logits)``, and the noise comes per row.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from custom_handlers.inference.penalties import RowPenalties, row_penalties
from custom_handlers.inference.request import GREEDY_BELOW


@dataclass
class RowSampling:
    greedy: bool
    temperature: float
    top_p: float
    top_k: int  # 0: no top-k
    generator: Any  # torch.Generator on the model's device, or None when greedy
    min_p: float = 0.0  # 0: no min-p
    penalties: RowPenalties | None = None  # penalties and bias, when the row asks for any


def row_sampling(
    sampling, defaults: dict, device, choice: int, prompt_ids: list[int] = ()
) -> RowSampling:
    """Per-row settings from a request's ``SamplingParams`` and the checkpoint's defaults
    (``prompt_ids``: the tokens a repetition penalty counts as seen from the start)."""
    import torch

    penalties = row_penalties(sampling, defaults, prompt_ids)
    # The checkpoint's default counts too: a generation_config may say 0 (or 1e-9) as well.
    temperature = _or(sampling.temperature, defaults["temperature"])
    if sampling.greedy or temperature < GREEDY_BELOW:
        return RowSampling(True, 1.0, 1.0, 0, None, penalties=penalties)
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(62)
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + choice * 1_000_003) % 2**63)  # n > 1: each choice its own draw
    return RowSampling(
        greedy=False,
        temperature=temperature,
        top_p=_or(sampling.top_p, defaults["top_p"]),
        top_k=max(0, _or(sampling.top_k, defaults["top_k"])),  # a config's -1: no top-k either
        generator=generator,
        min_p=_or(sampling.min_p, defaults.get("min_p", 0.0)) or 0.0,
        penalties=penalties,
    )


def _or(value, default):
    return default if value is None else value


def sample(logits, rows: list[RowSampling]) -> list[int]:
    """One token id per row of ``logits`` ([rows, vocab], float32, already masked)."""
    import torch

    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.greedy]
    drawn = [i for i, r in enumerate(rows) if not r.greedy]
    if greedy:
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    if drawn:
        tokens[drawn] = _draw(logits[drawn], [rows[i] for i in drawn])
    return tokens.tolist()


def _draw(logits, rows: list[RowSampling]):
    import torch

    device, vocab = logits.device, logits.shape[-1]
    ordered, order = _kept(logits, rows)
    noise = torch.stack(
        [torch.rand(vocab, generator=r.generator, device=device) for r in rows]
    ).clamp_(min=torch.finfo(torch.float32).tiny)
    choice = (ordered - torch.log(-torch.log(noise))).argmax(dim=-1, keepdim=True)
    return order.gather(1, choice).squeeze(1)


def _kept(logits, rows: list[RowSampling]):
    """The sampled rows' logits divided by their temperature and sorted, best first, with the
    tokens that min-p, top-k and top-p leave out set to -inf; and the sorting's order.

    min-p (vLLM's, transformers' ``MinPLogitsWarper``): a token whose probability after the
    temperature is below ``min_p`` times the best one's is dropped, i.e. its scaled logit is below
    the best one's plus ``log(min_p)``. Then top-k; then top-p over what is left."""
    import torch

    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([r.temperature for r in rows], device=device).unsqueeze(1)
    # top_k past the vocabulary is no limit; past 2**63 torch.tensor could not even hold it.
    top_k = torch.tensor([min(r.top_k or vocab, vocab) for r in rows], device=device).unsqueeze(1)
    top_p = torch.tensor([r.top_p for r in rows], device=device).unsqueeze(1)
    ordered, order = torch.sort(logits / temperature, dim=-1, descending=True)
    if any(r.min_p for r in rows):  # rows with min_p 0: a threshold of -inf leaves them as they are
        floor = torch.tensor([math.log(r.min_p) if r.min_p else -math.inf for r in rows])
        floor = ordered[:, :1] + floor.to(device).unsqueeze(1)
        ordered = ordered.masked_fill(ordered < floor, float("-inf"))
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    ordered = ordered.masked_fill(ranks >= top_k, float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better tokens: the first always stays
    ordered = ordered.masked_fill(before > top_p, float("-inf"))
    return ordered, order


def kept_logits(logits, rows: list[RowSampling]):
    """What a draw samples from for sampled ``rows``: ``_kept``'s logits in vocabulary order."""
    import torch

    ordered, order = _kept(logits, rows)
    return torch.empty_like(ordered).scatter_(1, order, ordered)


def token_logprobs(distribution, tokens: list[int], top: list[int]) -> list[tuple]:
    """Per row of ``distribution`` ([rows, vocab] log-probabilities): ``(token, its logprob,
    [(alternative, logprob)] for the row's ``top`` most likely)``, on the CPU."""
    import torch

    index = torch.tensor(tokens, device=distribution.device).unsqueeze(1)
    chosen = distribution.gather(1, index).squeeze(1).tolist()
    k = max(top)
    if k:
        values, ids = distribution.topk(k, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    return [
        (token, lp, list(zip(ids[i][: top[i]], values[i][: top[i]], strict=True)) if k else [])
        for i, (token, lp) in enumerate(zip(tokens, chosen, strict=True))
    ]
