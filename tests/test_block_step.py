"""A step in which each row advances by its own number of tokens (issue 24's foundation).

``decode.block_forward`` runs rows that take 0 to T tokens in one forward pass over the slot pool:
a prefill chunk, forced tokens or a draft, next to rows taking one. Checked on the real tiny model
against a plain forward pass over each row's whole sequence: the logits at every token taken, and
the pool's keys and values, must be the same, in any mix of counts, and one-token steps after
block steps must go on as before.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from custom_handlers.inference.decode import block_forward, decode_forward
from custom_handlers.inference.kvbatch import KVBatch, KVBudget, columns_for, kv_token_bytes
from custom_handlers.inference.loader import load_model
from custom_handlers.inference.settings import LocalModelSettings

PROMPTS = [[5, 17, 99, 3, 42], [8, 8, 120, 7, 19, 64, 33, 2, 11], [250, 4, 77]]  # < vocab


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(LocalModelSettings(model=str(tiny_model_dir)))


def pool_with_prompts(loaded, reserved: bool) -> KVBatch:
    model = loaded.model
    budget = KVBudget(64 * 2**20, kv_token_bytes(model.config, loaded.dtype), 4, 2048)
    batch = KVBatch(budget, keep_pool=reserved)
    if reserved:
        batch.reserve(model.config, loaded.dtype, model.device)
    for prompt in PROMPTS:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        batch.add(cache, 1, len(prompt), 300)
    return batch


def reference(model, sequence: list[int]):
    return model(input_ids=torch.tensor([sequence])).logits[0]


@pytest.mark.parametrize("reserved", [False, True], ids=["grown pool", "reserved pool"])
@torch.inference_mode()
def test_rows_advance_by_their_own_counts_as_a_plain_forward_says(loaded, reserved):
    model = loaded.model
    batch = pool_with_prompts(loaded, reserved)
    sequences = [list(p) for p in PROMPTS]
    generator = torch.Generator().manual_seed(0)
    for counts in ([1, 4, 3], [2, 1, 0], [0, 5, 1], [1, 1, 1]):
        block = max(counts)
        vocab = model.config.vocab_size
        new = torch.randint(0, vocab, (len(PROMPTS), block), generator=generator).tolist()
        ids = torch.tensor(new)
        positions = torch.tensor([[length + j for j in range(block)] for length in batch.lengths])
        width = columns_for(max(batch.lengths) + block)
        logits = block_forward(model, batch, ids, positions, counts, width)
        batch.advance(counts)
        for row, count in enumerate(counts):
            before = len(sequences[row])
            sequences[row] += new[row][:count]
            expected = reference(model, sequences[row])
            for j in range(count):
                torch.testing.assert_close(
                    logits[row, j], expected[before + j], rtol=1e-4, atol=1e-4
                )
    # One-token steps go on from there, as the engine's decoding does.
    tokens = [7, 9, 11]
    positions = torch.tensor(batch.lengths)[:, None]
    width = columns_for(max(batch.lengths) + 1)
    logits = decode_forward(model, batch, torch.tensor(tokens)[:, None], positions, width)
    for row, token in enumerate(tokens):
        expected = reference(model, [*sequences[row], token])[-1]
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_a_block_writes_only_the_tokens_taken(loaded):
    model = loaded.model
    batch = pool_with_prompts(loaded, reserved=True)
    lengths = list(batch.lengths)
    untouched = [k.clone() for k in batch.keys]
    counts = [2, 0, 1]
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    positions = torch.tensor([[n + j for j in range(3)] for n in lengths])
    block_forward(model, batch, ids, positions, counts, columns_for(max(lengths) + 3))
    for layer, before in zip(batch.keys, untouched, strict=True):
        changed = (layer != before).any(dim=(1, 3))  # [slots, columns]
        for row, (length, count) in enumerate(zip(lengths, counts, strict=True)):
            assert changed[row].nonzero().flatten().tolist() == list(range(length, length + count))
