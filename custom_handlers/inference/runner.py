"""The runner: a step's plan in, one forward pass, logits out (issue 24's second room).

It owns what lives on the device: the KV pool (``KVBatch``, one slot a row), the decoding steps
(``Decoder``: CUDA graphs or eager) and the steady rows' inputs (``Steady``). Its passes:

- ``prefill``: prompts that join whole, right-padded to the longest, in one pass;
- ``decode``: every row takes one token, from inputs that stay on the device while the rows stay
  the same (the CUDA graphs' step);
- ``packed``: each row takes its own number of tokens (a prefill chunk, a draft to check, one
  token, or none), packed into one sequence (packed.py); ``block`` is the same for a lone row on
  a model without the packed attention.

It writes no token and emits nothing (outputs.py), and decides nothing about who advances
(scheduler.py); ``advance`` moves the rows' lengths once outputs know how many tokens each kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from custom_handlers.inference.decode import CudaApi, Decoder, block_forward
from custom_handlers.inference.kvbatch import (
    KVBatch,
    KVBudget,
    columns_for,
    kv_shape,
    kv_token_bytes,
)
from custom_handlers.inference.loader import LoadedModel
from custom_handlers.inference.outputs import ChoicePlan, Row
from custom_handlers.inference.packed import packed_forward
from custom_handlers.inference.prefix import start_cache
from custom_handlers.inference.sampling import BatchSampling

GRAPHS_OFF_BY_SETTING = "turned off (cuda_graphs: false)"


@dataclass
class Steady:
    """What the next step feeds the device while the batch's rows stay the same."""

    inputs: Any  # [2, rows] int64 on the model's device: each row's next token id, its position
    sampling: BatchSampling  # the rows' sampling settings, on the device once used
    plan: ChoicePlan | None = (
        None  # what ``Outputs.choose`` looks at in each row, made at its first
    )

    def __post_init__(self) -> None:
        self.tokens, self.positions = self.inputs.unbind(0)  # views: written in place

    def plan_for(self, rows: list[Row]) -> ChoicePlan:
        if self.plan is None:
            self.plan = ChoicePlan.of(rows)
        return self.plan


class Runner:
    """The KV pool, the decoding steps and the forward passes of one engine."""

    def __init__(self, label: str, kv_cache_bytes: int, max_rows: int, cuda_graphs: bool):
        self.label = label  # the model's name, in the graphs' log lines
        self.kv_cache_bytes = kv_cache_bytes  # the running rows' KV pool at most (0: no limit)
        self.max_rows = max_rows
        self.cuda_graphs = cuda_graphs  # decode steps replayed from CUDA graphs, on CUDA
        self.graph_mode: str | None = None  # forces a Decoder mode ("static": tests on the CPU)
        self.cuda_api: CudaApi | None = None  # the CUDA calls of graphs (a stand-in: CPU tests)
        self.batch = KVBatch()
        self.decoder: Decoder | None = None  # the loaded model's decoding steps
        self.steady: Steady | None = None  # the rows' step state on the device; None: rebuild
        self.peak_kv_bytes = 0  # the KV pool at its largest so far
        self.peak_prefill = 0  # the most prompts prefilled in one forward pass so far

    # ---- the pool and the graphs ---------------------------------------------------------------

    def kv_budget(self, loaded: LoadedModel) -> KVBudget:
        """The KV pool's limit for ``loaded``: bytes, bytes per token, slots."""
        token_bytes = kv_token_bytes(loaded.model.config, loaded.dtype)
        return KVBudget(self.kv_cache_bytes, token_bytes, self.max_rows, loaded.context_length)

    def kv_state(self) -> dict[str, int]:
        batch = self.batch  # the engine thread may replace it meanwhile
        return {
            "bytes": batch.nbytes,
            "budget_bytes": self.kv_cache_bytes,
            "slots": batch.slots,
            "columns": batch.columns,
            "peak_bytes": self.peak_kv_bytes,
        }

    def graphs_state(self) -> dict[str, object]:
        decoder = self.decoder  # the engine thread may replace it meanwhile
        if decoder is not None:
            return decoder.state()
        reason = None if self.cuda_graphs else GRAPHS_OFF_BY_SETTING
        return {
            "enabled": None,
            "graphs": 0,
            "captured": 0,
            "capture_seconds": 0.0,
            "memory_bytes": 0,
            "eager_steps": 0,
            "off_reason": reason,
        }

    def use_cuda_graphs(self, on: bool) -> None:
        if self.decoder is not None:
            self.decoder.release()
        self.cuda_graphs, self.decoder = on, None

    def decoder_for(self, loaded: LoadedModel) -> Decoder:
        """The decoding steps of ``loaded``: CUDA graphs on CUDA unless turned off."""
        if self.decoder is not None and self.decoder.is_for(loaded.model):
            return self.decoder
        if self.graph_mode is not None:
            mode, reason = self.graph_mode, None
        elif not self.cuda_graphs:
            mode, reason = "eager", GRAPHS_OFF_BY_SETTING
        elif not str(loaded.model.device).startswith("cuda"):
            mode, reason = "eager", f"not on CUDA ({loaded.model.device})"
        else:
            mode, reason = "cuda", None
        if self.decoder is not None:
            self.decoder.release()
        self.decoder = Decoder(loaded.model, mode, self.label, reason, self.cuda_api)
        return self.decoder

    def prepare_graphs(self, loaded: LoadedModel) -> None:
        """With CUDA graphs, before the first rows join a model (none runs): reserve the whole KV
        pool and capture the graphs of its shape (at load: the requests that wait, wait for it)."""
        decoder = self.decoder_for(loaded)
        if not decoder.graphs:
            return
        budget = self.kv_budget(loaded)
        if self.batch.budget != budget or not self.batch.keys:
            batch = KVBatch(budget, keep_pool=True)
            if not batch.can_reserve():  # no budget (0: no limit): the pool grows as before
                return
            self.batch.free()
            batch.reserve(loaded.model.config, loaded.dtype, loaded.model.device)
            self.batch = batch
        decoder.capture_missing(loaded.model, self.batch)

    def capture_while_idle(self, loaded: LoadedModel | None, stop) -> None:
        """No row runs: capture what the pool's shape still misses, until ``stop()``."""
        decoder = self.decoder
        if decoder is None or loaded is None or not decoder.is_for(loaded.model):
            return
        decoder.capture_missing(loaded.model, self.batch, stop=stop)

    def enter(self, loaded: LoadedModel, rows: int, kv, length: int, tokens: int, first: bool):
        """``rows`` new rows take slots holding ``kv``'s first ``length`` tokens, room for
        ``tokens`` in all; ``first``: no other row runs (a pool for the model loaded now)."""
        decoder, budget = self.decoder_for(loaded), self.kv_budget(loaded)
        if first and self.batch.budget != budget:
            self.batch = KVBatch(budget)
        self.batch.keep_pool = decoder.graphs  # graphs point into it: kept while loaded
        self.batch.add(kv, rows, length, tokens)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.batch.nbytes)
        self.steady = None

    def keep(self, indices: list[int]) -> None:
        """Only the rows at ``indices`` stay (the others' slots are freed)."""
        self.batch.keep(indices)
        self.steady = None

    def advance(self, counts: list[int] | None = None) -> None:
        """Each row's KV grew by ``counts[i]`` tokens (one each: None)."""
        self.batch.advance(counts)
        if counts is not None:
            self.steady = None

    def row_kv(self, i: int) -> RowKV:
        """A copy of row ``i``'s KV so far (for the prefix cache)."""
        batch = self.batch
        return RowKV(zip(batch.keys, batch.values, strict=True), i, batch.lengths[i])

    def unload(self) -> None:
        """The model goes: the pool and the graphs with it."""
        if self.decoder is not None:
            self.decoder.release()
        self.forget()

    def forget(self) -> None:
        """A fresh start: no pool, no decoding steps, no steady inputs (nothing released: what
        is dropped goes with the collector)."""
        self.batch, self.decoder, self.steady = KVBatch(), None, None

    def drop(self) -> None:
        """A step failed: the pool goes now, not at the collector's next pass (the batch is a
        reference cycle: KVBatch -> SlotCache -> SlotLayer -> KVBatch), so the next one is not
        allocated beside it; the graphs, which point into it, go too."""
        self.batch.free()
        self.batch, self.steady = KVBatch(), None
        if self.decoder is not None:
            self.decoder.drop()

    # ---- passes --------------------------------------------------------------------------------

    def prefill(self, loaded: LoadedModel, prompts: list[list[int]], entry, reused: int, every):
        """One forward pass over ``prompts`` that share their first ``reused`` tokens (from the
        prefix cache's ``entry``, or none), each right-padded to the longest: causal attention
        keeps a prompt's tokens from ever seeing the padding after them. Yields, per prompt, its
        KV and its next token's logits ``[1, vocab]``; with ``every`` (one prompt), the logits
        of every position ``[prompt, vocab]`` as the third item (else None)."""
        import torch
        from transformers import DynamicCache

        model, rows = loaded.model, len(prompts)
        cache = (
            start_cache(entry, reused, model.config, rows)
            if entry
            else DynamicCache(config=model.config)
        )
        rests = [prompt[reused:] for prompt in prompts]
        width = max(len(rest) for rest in rests)
        ids = [rest + [loaded.pad_token_id] * (width - len(rest)) for rest in rests]
        last = sorted({len(rest) - 1 for rest in rests})  # where each prompt's next token comes
        keep = 0 if every else 1 if rows == 1 else torch.tensor(last, device=model.device)
        input_ids = torch.tensor(ids, device=model.device)
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=keep)
        self.peak_prefill = max(self.peak_prefill, rows)
        for i, prompt in enumerate(prompts):
            if rows == 1:
                yield cache, out.logits[:, -1], out.logits[0] if every else None
            else:
                layers = ((layer.keys, layer.values) for layer in cache.layers)
                logits = out.logits[i : i + 1, last.index(len(rests[i]) - 1)]
                yield RowKV(layers, i, len(prompt)), logits, None

    def decode(self, loaded: LoadedModel, rows: list[Row]) -> tuple[Any, Steady]:
        """One token a row: the logits ``[rows, vocab]`` and the steady inputs they came from.
        While the rows stay the same, what it feeds the device stays there: the token ids just
        chosen (``fed``) and the positions (plus one, on the device), and the rows' sampling
        settings. Rows joining or leaving rebuild them: one copy from the host then."""
        import torch

        batch, steady = self.batch, self.steady
        if steady is None:  # row i is slot i: its last token, at its length so far
            device = loaded.model.device
            inputs = torch.tensor([[r.last for r in rows], batch.lengths], device=device)
            steady = self.steady = Steady(inputs, BatchSampling([r.sampling for r in rows]))
        decoder = self.decoder_for(loaded)
        logits = decoder.step(loaded.model, batch, steady.inputs, max(batch.lengths) + 1)
        batch.advance()
        return logits, steady

    def fed(self, steady: Steady, chosen) -> None:
        """The tokens just chosen (on the device) are the next step's inputs."""
        steady.tokens.copy_(chosen)
        steady.positions.add_(1)

    def packed(self, loaded: LoadedModel, inputs: list[list[int]], keep: list[int]):
        """Row ``i`` takes ``inputs[i]`` at its next positions (packed.py); the logits at the
        packed indices ``keep``. The rows' lengths stay: ``advance`` once the tokens kept are
        known. A model without the packed attention: a lone row's pass (``block_forward``)."""
        import torch

        if loaded.packed:
            return packed_forward(loaded.model, self.batch, inputs, keep)
        (tokens,) = inputs  # the scheduler plans several tokens only for a lone row then
        batch, device = self.batch, loaded.model.device
        length, block = batch.lengths[0], len(tokens)
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(length, length + block, device=device)[None, :]
        width = min(batch.columns, columns_for(length + block))
        logits = block_forward(loaded.model, batch, ids, positions, [block], width)[0]
        return logits[keep]


class NoKV:
    """No token's KV yet, shaped as a cache of one row (``KVBatch.add`` of a row joining in
    chunks with no prefix reused)."""

    def __init__(self, loaded: LoadedModel):
        import torch

        layers, heads, dim = kv_shape(loaded.model.config)
        dtype, device = getattr(torch, loaded.dtype, torch.float32), loaded.model.device
        empty = torch.zeros(1, heads, 0, dim, dtype=dtype, device=device)
        self.layers = [LayerKV(empty, empty) for _ in range(layers)]


class RowKV:
    """Row ``i`` of a cache's layers (``(keys, values)`` pairs: a batched prefill's cache, or the
    slot pool), its first ``length`` tokens, copied (the prefix cache may keep it: a view would
    keep the whole batch's tensors alive)."""

    def __init__(self, layers, i: int, length: int):
        self.layers = [
            LayerKV(keys[i : i + 1, :, :length].clone(), values[i : i + 1, :, :length].clone())
            for keys, values in layers
        ]


@dataclass
class LayerKV:
    keys: Any
    values: Any
