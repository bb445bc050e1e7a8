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


# ---- tokenizers' DecodeStream: the same text as the two decodes a token (issue 23, item 4) ----


@pytest.fixture(scope="module")
def real_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)  # SmolLM2's: byte-level, 49,152 tokens


def _windows(tokenizer) -> IncrementalDecoder:
    """The decoder as it was before the stream: two decodes of a window a token."""
    decoder = IncrementalDecoder(tokenizer)
    decoder._stream = None
    return decoder


def _sequences(tokenizer, rng: random.Random, count: int) -> list[list[int]]:
    """Random ids (byte tokens that split characters, special and added tokens, ids past the
    tokenizer's own, as a padded vocabulary's model may give) and real text with many multi-byte
    characters, each cut at random."""
    size = len(tokenizer)
    special = sorted(set(tokenizer.all_special_ids)) or [0]
    texts = ["café naïve über 東京 🦊 ✨ end", "😀👍🏽 日本語のテキスト ü ß €"]
    texts.append('{"a": "é"} <think>x</think>')
    out = []
    for n in range(count):
        if n % 3 == 0:
            ids = tokenizer(rng.choice(texts) * 3, add_special_tokens=False)["input_ids"]
            ids = ids[rng.randrange(len(ids)) :]
        else:
            ids = []
        for _ in range(rng.randrange(1, 80)):
            kind = rng.random()
            if kind < 0.1:
                ids.append(rng.choice(special))
            elif kind < 0.13:
                ids.append(size + rng.randrange(50))
            else:
                ids.append(rng.randrange(size))
        out.append(ids)
    return out


def _pieces(decoder: IncrementalDecoder, ids: list[int], flush_at: int) -> list[str]:
    pieces = [decoder.push(i) for i in ids[:flush_at]] + [decoder.flush()]
    return pieces + [decoder.push(i) for i in ids[flush_at:]] + [decoder.flush()]


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_the_decode_stream_gives_the_same_pieces_as_the_two_decodes(which, request):
    """Piece by piece (what each token releases, what a flush releases, pushes after a flush),
    over random sequences of the tiny and the real model's vocabulary: one call a token in Rust
    instead of two decodes, and not one character different."""
    tok = request.getfixturevalue("tokenizer" if which == "tiny" else "real_tokenizer")
    rng = random.Random(23)
    for ids in _sequences(tok, rng, 400):
        flush_at = rng.randrange(len(ids) + 1)
        streamed = IncrementalDecoder(tok)
        assert streamed._stream is not None  # byte-level: the stream is used
        assert _pieces(streamed, ids, flush_at) == _pieces(_windows(tok), ids, flush_at), ids


class _EveryStage(TextPipeline):
    """A pipeline that never hands the decoder's text straight on."""

    def push(self, token_id: int) -> str:
        self._plain = False
        return super().push(token_id)


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_pipelines_with_the_stream_give_the_same_text_and_stops(which, request):
    """Through the whole pipeline (think filter, stop strings, skipped special tokens): the same
    pieces, the same stop, the same reasoning count, with the stream and the text handed straight
    on once nothing can change it as without either."""
    tok = request.getfixturevalue("tokenizer" if which == "tiny" else "real_tokenizer")
    rng = random.Random(7)
    for ids in _sequences(tok, rng, 200):
        full = tok.decode(ids, skip_special_tokens=True)
        start = rng.randrange(len(full) + 1)
        stops = [full[start : start + rng.randrange(1, 4)]] if full else []
        got, drop_think = [], rng.random() < 0.5
        for streamed in (True, False):  # False: the reference, every stage at every token
            pipeline = (TextPipeline if streamed else _EveryStage)(tok, stops, drop_think)
            if not streamed:
                pipeline._decoder._stream = None
            pieces = []
            for i in ids:
                pieces.append(pipeline.push(i))
                if pipeline.stopped:
                    break
            pieces.append(pipeline.flush())
            got.append((pieces, pipeline.stopped, pipeline.reasoning_tokens))
        assert got[0] == got[1], ids


def test_a_window_the_stream_refuses_goes_on_with_the_two_decodes(tokenizer):
    """The stream's check (the new window's text starts with the old one's) failing mid-row: the
    row's text goes on from the windows kept beside it, the same as without the stream."""

    class Refusing:
        def __init__(self, stream, after: int):
            self._stream, self._left = stream, after

        def step(self, backend, token_id):
            self._left -= 1
            if self._left < 0:
                raise Exception("Invalid prefix encountered")
            return self._stream.step(backend, token_id)

    rng = random.Random(3)
    for ids in _sequences(tokenizer, rng, 60):
        decoder = IncrementalDecoder(tokenizer)
        decoder._stream = Refusing(decoder._stream, rng.randrange(len(ids) + 1))
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        reference = _windows(tokenizer)
        assert pieces == [reference.push(i) for i in ids] + [reference.flush()]


def test_a_decoder_other_than_byte_level_keeps_the_two_decodes(tokenizer):
    from tokenizers import decoders

    class Other(type(tokenizer)):
        pass

    other = Other.from_pretrained(tokenizer.name_or_path)
    other.backend_tokenizer.decoder = decoders.Metaspace()
    assert IncrementalDecoder(other)._stream is None
    assert IncrementalDecoder(tokenizer)._stream is not None


def test_past_its_start_without_stop_strings_the_text_skips_the_stages(tokenizer):
    """Most rows: no stop string, and the think filter decided at the first words. From there the
    decoder's text is the text; the two stages are not called for each token."""
    calls = []

    class Counting(ThinkFilter):
        def push(self, text: str) -> str:
            calls.append(text)
            return super().push(text)

    pipeline = TextPipeline(tokenizer)
    pipeline._think = Counting()
    ids = tokenizer("A fox at dawn, " * 20, add_special_tokens=False)["input_ids"]
    text = "".join(pipeline.push(i) for i in ids) + pipeline.flush()
    assert text == "A fox at dawn, " * 20
    assert len(calls) <= 3 < len(ids)  # the start, then only the flush
    stopping = TextPipeline(tokenizer, stops=["zebra"])
    stopping._think = Counting()
    calls.clear()
    for i in ids:
        stopping.push(i)
    assert len(calls) == len(ids)  # a stop string to look for: every token goes through
