"""Next-token choice for a batch whose rows each have their own sampling parameters.

One vectorised pass for all sampled rows (temperature, min-p, top-k, top-p) over their
candidates (the ``top_k`` best by ``topk`` when every sampled row has a ``top_k``, else the whole
vocabulary sorted), greedy rows by argmax. Penalties and ``logit_bias`` change the logits before
this, greedy rows' included (``penalties.py``). Each row draws its randomness from its own
``torch.Generator``, so a seeded request gives the same answer whatever else shares the batch.
Sampling uses the Gumbel-max trick: the argmax of ``logits + Gumbel noise`` is a draw from
``softmax(logits)``, and the noise comes per row. ``BatchSampling`` keeps the rows' settings on
the device while the batch's rows stay the same: a step then copies nothing from the host.
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
    seeded: bool = True  # the request gave a seed: the row draws from its own generator


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
        seeded=sampling.seed is not None,
    )


def _or(value, default):
    return default if value is None else value


def sample(logits, rows: list[RowSampling]) -> list[int]:
    """One token id per row of ``logits`` ([rows, vocab], float32, already masked)."""
    return BatchSampling(rows).choose(logits).tolist()


def kept_logits(logits, rows: list[RowSampling]):
    """What a draw samples from for sampled ``rows``: ``_kept``'s logits in vocabulary order."""
    import torch

    batch = BatchSampling(rows)
    ordered, order = batch.kept(logits)
    return torch.full_like(logits, float("-inf")).scatter_(1, order, ordered)


class BatchSampling:
    """The sampling settings of a set of rows, as tensors on the logits' device.

    Built for the rows of a batch and kept while they stay the same (``Runner.decode``): the
    settings reach the device once, at the first step, not at every step. ``choose`` gives the
    chosen ids as a tensor on the device; reading them (``tolist``) is the step's one wait for the
    device. Greedy rows take the argmax of every row (one reduction, cheaper than picking them out);
    the sampled rows' tokens are written over theirs (``index_copy_``, by an index on the device).
    """

    def __init__(self, rows: list[RowSampling]):
        self.rows = rows
        self.drawn = [i for i, r in enumerate(rows) if not r.greedy]
        self.min_p = any(rows[i].min_p for i in self.drawn)
        self.width = 0  # candidates per sampled row: the largest top_k, or the whole vocabulary
        self.top_k = False  # some sampled row keeps fewer than ``width`` of them
        self._for: tuple | None = None  # (device, vocabulary) the tensors below are for
        # [drawn, 1] float32 each, from one tensor: temperature, top_p, top_k, min-p floor
        self._temperature = self._top_p = self._top_k = self._floor = None
        self._ranks: Any = None  # [1, width] int64: 0 .. width-1
        self._index: Any = None  # [drawn] int64: the sampled rows, when some rows are greedy
        self._noise: Any = None  # [drawn, vocab] float32: each row's uniform noise of the step
        self._candidates: Any = None  # _noise[:, :width]: what meets the candidates
        self._scale = True  # some sampled row's temperature is not 1: the logits are divided
        self._noise_rows: list[tuple] = []  # (row of _noise, the row's generator): seeded rows
        self._shared: Any = None  # the rows without a seed: one generator, one draw for them all

    def choose(self, logits):
        """One token id per row of ``logits`` ([rows, vocab], float32, already masked): an int64
        tensor on their device."""
        if not self.drawn:
            return logits.argmax(dim=-1)
        if len(self.drawn) == len(self.rows):
            return self._draw(logits)
        self._build(logits)
        tokens = logits.argmax(dim=-1)
        return tokens.index_copy_(0, self._index, self._draw(logits.index_select(0, self._index)))

    def _build(self, logits) -> None:
        import torch

        device, vocab = logits.device, logits.shape[-1]
        if self._for == (device, vocab):
            return
        drawn = [self.rows[i] for i in self.drawn]
        # top_k past the vocabulary is no limit, nor is 0 (exact in float32: at most the vocabulary)
        top_k = [min(r.top_k or vocab, vocab) for r in drawn]
        self.width, self.top_k = max(top_k), min(top_k) < max(top_k)
        self._scale = any(r.temperature != 1.0 for r in drawn)  # x / 1.0 is x, to the bit
        settings = [
            [r.temperature, r.top_p, k, math.log(r.min_p) if r.min_p else -math.inf]
            for r, k in zip(drawn, top_k, strict=True)
        ]
        settings = torch.tensor(settings, dtype=torch.float32, device=device)
        self._temperature, self._top_p, self._top_k, self._floor = settings.split(1, dim=1)
        self._ranks = torch.arange(self.width, device=device).unsqueeze(0)
        if len(drawn) < len(self.rows):
            self._index = torch.tensor(self.drawn, device=device)
        self._noise = None  # made at the first draw (``kept`` alone needs none)
        self._for = (device, vocab)

    def _noise_buffer(self, device: Any, vocab: int) -> Any:
        """The sampled rows' noise for their candidates (``[drawn, width]``, a view of the
        ``[drawn, vocab]`` buffer) and where each row's numbers come from, made once."""
        import torch

        if self._noise is None:
            drawn = [self.rows[i] for i in self.drawn]
            self._noise = torch.empty((len(drawn), vocab), device=device)
            self._candidates = self._noise[:, : self.width]
            noise = self._noise.unbind(0)
            self._noise_rows = [(noise[i], r.generator) for i, r in enumerate(drawn) if r.seeded]
            if len(self._noise_rows) < len(drawn):
                self._shared = torch.Generator(device=device)
                self._shared.manual_seed(random.getrandbits(62))
        return self._candidates

    def _draw(self, logits):
        """The sampled rows' tokens (``logits``: theirs only), by the Gumbel-max trick.

        A seeded row's noise comes from its own generator, over the whole vocabulary as it
        always has: its random stream does not depend on the candidates or on the other rows, and
        its first ``width`` values meet the candidates, best first, as they did after a sort of
        the whole vocabulary. The rows without a seed need no stream of their own: one draw from
        a generator they share fills their noise, for the candidates only (one operation a step
        instead of one a row, and on Qwen3's vocabulary 20 numbers a row instead of 151,936).
        """
        import torch

        ordered, order = self.kept(logits)
        noise = self._noise_buffer(logits.device, logits.shape[-1])
        if self._shared is not None:
            noise.uniform_(generator=self._shared)
        for row_noise, generator in self._noise_rows:  # as torch.rand(vocab, generator=...)
            row_noise.uniform_(generator=generator)
        # In place: every number of ``noise`` is drawn again at the next step (by the shared
        # generator, or over its whole row by a seeded row's). The same values as out of place.
        gumbel = noise.clamp_(min=_TINY).log_().neg_().log_()  # minus the Gumbel noise
        choice = torch.sub(ordered, gumbel, out=gumbel).argmax(dim=-1, keepdim=True)
        return order.gather(1, choice).squeeze(1)

    def kept(self, logits):
        """The sampled rows' candidates (``logits``: theirs only), divided by their temperature,
        best first, with those that min-p, top-k and top-p leave out set to -inf; and their ids.

        The candidates are the ``width`` best (``topk``) when every sampled row has a top_k, else
        the whole vocabulary sorted. min-p (vLLM's, transformers' ``MinPLogitsWarper``): a token
        whose probability after the temperature is below ``min_p`` times the best one's is
        dropped, i.e. its scaled logit is below the best one's plus ``log(min_p)``. Then top-k;
        then top-p over what is left."""
        import torch

        self._build(logits)
        scaled = logits / self._temperature if self._scale else logits
        if self.width < logits.shape[-1]:
            ordered, order = scaled.topk(self.width, dim=-1)
        else:
            ordered, order = torch.sort(scaled, dim=-1, descending=True)
        # ``ordered`` is new here: masked in place, each mask taken before it is written.
        if self.min_p:  # rows with min_p 0: a floor of -inf leaves them as they are
            ordered.masked_fill_(ordered < ordered[:, :1] + self._floor, -math.inf)
        if self.top_k:  # rows whose top_k is below the width
            ordered.masked_fill_(self._ranks >= self._top_k, -math.inf)
        # top_p 1 is not skipped: the mass before a tail token can round to above 1.
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1).sub_(probs)  # mass of the better tokens: the first stays
        return ordered.masked_fill_(before > self._top_p, -math.inf), order


_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny: the noise's least value


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
