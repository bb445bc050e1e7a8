"""What a step of several tokens a row costs against a step of one (issue 24, speculation).

Prompt-lookup speculation and grammar drafts win only if a pass over ``k + 1`` tokens a row costs
little more than a pass over one: on a GPU a decoding step is bound by reading the weights, so a
few more tokens are nearly free; on a CPU the matrix products grow with the tokens. This measures
it on a checkpoint, in process: rows whose KV sits in the slot pool (a prompt of ``--prompt``
tokens each) take steps of ``T`` tokens a row through ``decode.block_forward`` (T = 1 through the
same function), median of ``--repeat`` rounds (the sizes in turn in each round), each step's KV
written and then forgotten (the rows' lengths do not move, so every step sees the same pool).

    uv run python -m bench.block_cost --model DIR [--rows 1 4] [--tokens 1 2 3 5 8]

It prints one Markdown table: per row count, the median step time for each T and its ratio to
T = 1. Speculation with ``k`` draft tokens accepted at rate ``a`` emits ``1 + a + a^2 + ...``
tokens a step: it pays when that is above the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time


def block_times(
    model, dtype: str, prompt: list[int], rows: int, sizes: list[int], rounds: int, sync=None
) -> dict[int, float]:
    """Median seconds of a ``block_forward`` pass taking each of ``sizes`` tokens in each of
    ``rows`` rows whose KV holds ``prompt``; the sizes in turn in each of ``rounds`` rounds (2 more
    first, to warm up), each pass's KV written and then forgotten. ``sync``, if given, is called
    around each pass (CUDA: ``torch.cuda.synchronize``). Also ``bench/gpu.py``'s "block" row."""
    import torch
    from transformers import DynamicCache

    from custom_handlers.inference.decode import block_forward
    from custom_handlers.inference.kvbatch import KVBatch, KVBudget, columns_for, kv_token_bytes

    device, length = model.device, len(prompt)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        batch = KVBatch(KVBudget(0, kv_token_bytes(model.config, dtype), rows))
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompt], device=device), cache=cache, use_cache=True)
        batch.add(cache, rows, length, length + max(sizes) + 1)
        steps = {}
        for t in sizes:
            ids = torch.randint(0, model.config.vocab_size, (rows, t), generator=generator)
            positions = (torch.arange(t) + length).expand(rows, t)
            steps[t] = (ids.to(device), positions.to(device), [t] * rows, columns_for(length + t))
        seconds: dict[int, list[float]] = {t: [] for t in sizes}
        for round_ in range(rounds + 2):  # the sizes in turn, in rounds: drift is shared
            for t in sizes:
                if sync is not None:
                    sync()
                started = time.perf_counter()
                block_forward(model, batch, *steps[t])
                if sync is not None:
                    sync()
                if round_ >= 2:
                    seconds[t].append(time.perf_counter() - started)
    return {t: statistics.median(s) for t, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 5, 8])
    parser.add_argument("--prompt", type=int, default=200, help="tokens in each row's KV")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    import torch

    from custom_handlers.inference.loader import load_model
    from custom_handlers.inference.settings import LocalModelSettings

    loaded = load_model(LocalModelSettings(model=args.model))
    model = loaded.model
    print(
        f"{args.model}: {model.config.num_hidden_layers} layers, {loaded.device}, {loaded.dtype}, "
        f"torch threads {torch.get_num_threads()}, prompt {args.prompt} tokens a row, "
        f"median of {args.repeat} rounds (the sizes in turn)"
    )
    print()
    print("| rows | " + " | ".join(f"T={t}" for t in args.tokens) + " |")
    print("|---|" + "---|" * len(args.tokens))
    generator = torch.Generator().manual_seed(0)
    for rows in args.rows:
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt,), generator=generator)
        times = block_times(model, loaded.dtype, prompt.tolist(), rows, args.tokens, args.repeat)
        base = times[args.tokens[0]]
        cells = [f"{times[t] * 1e3:.1f} ms ({times[t] / base:.2f}x)" for t in args.tokens]
        print(f"| {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
