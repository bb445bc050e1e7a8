"""Build a tiny random-weight Qwen3 checkpoint, offline, in a few seconds.

The checkpoint has the real Qwen3 architecture (``Qwen3ForCausalLM``), a byte-level BPE tokenizer
trained here with ``tokenizers``, Qwen3's ChatML special tokens, its tool-call tokens and its
chat template (tools, tool calls and results, and ``enable_thinking`` as the hybrid Qwen3s honour
it). Its weights are random, so it writes garbage: the tests use it to drive the real loading and
generation code, never to judge the text's quality.

    uv run python scripts/build_tiny_qwen3.py OUT_DIR [--layers 2] [--context 2048] [--hidden 64]

``--layers 12 --hidden 768`` gives a ~64M-parameter model for CPU benchmarks.
With ``--qwen3-4b-shape`` it builds a model of Qwen3-4B's real sizes instead (for GPU benchmarks;
about 8 GB in bf16), still with random weights and without any download.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3 marks its reasoning with these; they are ordinary added tokens there too (not "special").
THINK_TOKENS = ["<think>", "</think>"]

# Qwen3 writes tool calls and reads tool results between these; ordinary added tokens there too.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Qwen3-Instruct-2507's chat template (tools, tool calls and tool results as Qwen3 lays them out),
# plus the hybrid Qwen3 checkpoints' empty think block in non-thinking mode, so the handler is
# exercised as with the real model.
CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": \
<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + content }}
{%- for tool_call in message.tool_calls or [] %}
{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}
{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}"""

_WORDS = (
    "a an the cat fox dragon unicorn phoenix griffin forest castle river mountain city night "
    "day red blue green golden silver misty cinematic photo portrait studio ghibli lighting "
    "soft warm cold dramatic wide angle close up 35mm film grain detailed painting watercolor "
    "oil sketch young old tiny giant ancient futuristic cyberpunk medieval calm stormy sunset "
    "sunrise glowing with in on under over and of to for by at from is are was were has have "
    "three two one four"
).split()


def _corpus() -> list[str]:
    """A deterministic corpus: words, JSON punctuation, digits and some non-ASCII text."""
    lines = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    lines += ['{"values": ["a", "b"], "count": 3, "ok": true, "none": null}'] * 4
    lines += ["0123456789 -+.,:;!?()[]{}<>\"'/\\ \n\t", "café naïve über 東京 🦊 ✨"]
    return lines


def build_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens(THINK_TOKENS + TOOL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def _config_kwargs(layers: int, context: int, qwen3_4b_shape: bool, hidden: int = 64) -> dict:
    if qwen3_4b_shape:  # Qwen/Qwen3-4B-Instruct-2507's config.json
        return dict(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=context,
            rope_theta=5_000_000.0,
            tie_word_embeddings=True,
            vocab_size=151936,
        )
    heads = max(4, hidden // 64)  # heads of 16 (tiny) to 64 dimensions, 2 queries per KV head
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden if hidden == 64 else 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=hidden // heads,
        max_position_embeddings=context,
        tie_word_embeddings=True,
    )


def build(
    out_dir: str | Path,
    *,
    layers: int = 2,
    context: int = 2048,
    seed: int = 0,
    qwen3_4b_shape: bool = False,
    dtype: str = "float32",
    hidden: int = 64,
    vocab: int = 1024,
) -> Path:
    """Write the checkpoint to ``out_dir`` and return its path."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab)
    kwargs = _config_kwargs(layers, context, qwen3_4b_shape, hidden)
    kwargs.setdefault("vocab_size", len(tokenizer))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3Config(
        **kwargs,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    # Qwen3-Instruct-2507's generation_config.json: its recommended sampling defaults.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "TINY_MODEL.json").write_text(json.dumps({"seed": seed, **kwargs}, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (768: a ~64M model)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary learnt (tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qwen3-4b-shape", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    path = build(
        args.out_dir,
        layers=args.layers,
        context=args.context,
        seed=args.seed,
        qwen3_4b_shape=args.qwen3_4b_shape,
        hidden=args.hidden,
        dtype=args.dtype,
        vocab=args.vocab,
    )
    print(path)


if __name__ == "__main__":
    main()
