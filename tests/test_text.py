"""Incremental detokenization, think-block filtering and stop strings."""

from __future__ import annotations

import random

import pytest

from custom_handlers.inference.text import (
    IncrementalDecoder,
    StopMatcher,
    TextPipeline,
    ThinkFilter,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream(stage, pieces):
    return [stage.push(p) for p in pieces] + [stage.flush()]


@pytest.mark.parametrize(
    "text", ["a cute fox in a forest", "café naïve über 東京 🦊 ✨ end", '{"values": ["a"]}', ""]
)
def test_incremental_decoding_reproduces_the_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # split characters are held, not mangled


def test_incremental_decoding_matches_a_full_decode_for_random_ids(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(60)]
        decoder = IncrementalDecoder(tokenizer)
        text = "".join([decoder.push(i) for i in ids] + [decoder.flush()])
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_decoding_cost_does_not_grow_with_the_output(tokenizer):
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    decoder = IncrementalDecoder(Counting())
    ids = tokenizer("a cute fox " * 200, add_special_tokens=False)["input_ids"]
    for i in ids:
        decoder.push(i)
    assert len(ids) > 500
    assert max(calls) <= 8  # each decode sees a few tokens, never the whole output


def test_think_block_is_removed_even_when_split_across_pieces():
    pieces = ["<th", "ink>\nI should", " think</thi", "nk>\n\nA fox", " at dawn"]
    assert "".join(stream(ThinkFilter(), pieces)) == "A fox at dawn"


def test_text_without_think_block_passes_through_unchanged():
    pieces = ["\n", "<b>bold</b>", " fox <think> later"]
    assert "".join(stream(ThinkFilter(), pieces)) == "\n<b>bold</b> fox <think> later"


def test_leading_whitespace_is_not_held_back():
    f = ThinkFilter()
    assert f.push("\n\n") == "\n\n"
    assert f.push("<think>x</think>A") == "A"


def test_unfinished_think_block_is_dropped():
    assert "".join(stream(ThinkFilter(), ["<think>reasoning that never ends"])) == ""


def test_stop_string_split_across_pieces_is_found_and_not_returned():
    m = StopMatcher(["END"])
    out = [m.push("a fox E"), m.push("N"), m.push("D and more")]
    assert "".join(out) == "a fox "
    assert m.stopped
    assert m.push("more") == "" and m.flush() == ""


def test_text_that_only_looks_like_a_stop_start_is_released():
    m = StopMatcher(["ENDING"])
    assert m.push("a fox EN") == "a fox "
    assert m.push("D") == ""
    assert m.push("!") == "END!"
    assert m.flush() == "" and not m.stopped


def test_earliest_of_several_stops_wins():
    m = StopMatcher(["zz", "b"])
    assert m.push("a b zz") == "a "


def test_pipeline_stops_on_stop_string(tokenizer):
    pipeline = TextPipeline(tokenizer, stops=["forest"])
    ids = tokenizer("a fox in a forest at night", add_special_tokens=False)["input_ids"]
    out = ""
    for i in ids:
        out += pipeline.push(i)
        if pipeline.stopped:
            break
    out += pipeline.flush()
    assert out == "a fox in a "


def test_pipeline_counts_a_think_blocks_tokens_as_reasoning(tokenizer):
    thought = tokenizer("<think>a fox, a forest</think>", add_special_tokens=False)["input_ids"]
    answer = tokenizer("A fox at dawn", add_special_tokens=False)["input_ids"]
    pipeline = TextPipeline(tokenizer)
    out = "".join(pipeline.push(i) for i in thought + answer) + pipeline.flush()
    assert out == "A fox at dawn"
    assert pipeline.reasoning_tokens == len(thought)


def test_pipeline_without_a_think_block_has_no_reasoning_tokens(tokenizer):
    pipeline = TextPipeline(tokenizer)
    for i in tokenizer("A fox <think> at dawn", add_special_tokens=False)["input_ids"]:
        pipeline.push(i)
    assert pipeline.reasoning_tokens == 0


def test_a_fast_tokenizer_without_clean_up_decodes_through_its_backend(tokenizer):
    """The same text either way; transformers' own decode stays for anything else it may do."""
    assert IncrementalDecoder(tokenizer)._decode_ids.func == tokenizer.backend_tokenizer.decode

    class Cleaning(type(tokenizer)):
        pass

    cleaning = Cleaning.from_pretrained(tokenizer.name_or_path, clean_up_tokenization_spaces=True)
    assert IncrementalDecoder(cleaning)._decode_ids.func == cleaning.decode
