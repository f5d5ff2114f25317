"""Output processing off the model thread: incremental text and stop sequences match a full decode."""

from __future__ import annotations

import pytest

from service.detokenizer import IncrementalDetokenizer, OutputProcessor
from tests.helpers import tiny_tokenizer

TEXTS = [
    "Plain words, then numbers 12345 and symbols (a+b)*c.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀 and ZWJ 👩‍💻 end",
    "  leading spaces\nnew lines\n\n\ttabs",
]


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_decode_with_a_byte_level_tokenizer(embedded_model, text: str) -> None:
    tokenizer = embedded_model.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(decoder(tokenizer))
    deltas = [detok.push(token) for token in ids]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas), "no half characters are streamed"


@pytest.mark.slow
def test_a_stop_sequence_split_across_tokens_cuts_the_text_like_a_full_decode(embedded_model) -> None:
    tokenizer = embedded_model.tokenizer
    ids = tokenizer("The answer is 42. END of story, more text after", add_special_tokens=False)["input_ids"]
    output = OutputProcessor(decoder(tokenizer), stop=["D of st"], with_text=True)
    streamed = []
    for used, token in enumerate(ids, start=1):
        streamed.append(output.push(token))
        if output.stopped_text is not None:
            break
    full = tokenizer.decode(ids[:used], skip_special_tokens=True)
    assert output.stopped_text == full[: full.find("D of st") + len("D of st")]
    assert output.stopped_text.endswith("END of st")
    assert "".join(streamed) == output.stopped_text, "the stream stops exactly at the end of the stop sequence"
    assert used < len(ids), "matching stopped the request early"


def test_without_text_or_stops_nothing_is_decoded_until_the_end() -> None:
    calls = []
    tokenizer = tiny_tokenizer(64)

    def decode(ids):
        calls.append(list(ids))
        return tokenizer.decode(list(ids))

    output = OutputProcessor(decode, stop=(), with_text=False)
    assert [output.push(t) for t in (5, 6, 7)] == ["", "", ""]
    assert calls == []
    assert output.final_text([5, 6, 7]) == "t5 t6 t7" and len(calls) == 1


def test_each_token_decodes_a_short_window_not_the_whole_output() -> None:
    lengths = []
    tokenizer = tiny_tokenizer(64)

    def decode(ids):
        lengths.append(len(ids))
        return tokenizer.decode(list(ids))

    detok = IncrementalDetokenizer(decode)
    for token in [5 + i % 50 for i in range(400)]:
        detok.push(token)
    assert max(lengths) <= 8, "the window stays a few tokens however long the output grows"
    assert detok.text == tokenizer.decode([5 + i % 50 for i in range(400)])


def test_a_python_only_byte_tokenizer_streams_whole_characters() -> None:
    # Why the detokenizer is hand-written (service/detokenizer.py): ByT5's tokenizer has no `tokenizers` backend for
    # `DecodeStream`, and every multi-byte character arrives one byte-token at a time.
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    assert getattr(tokenizer, "backend_tokenizer", None) is None
    text = "héllo 日本語 🙂🚀 👩‍💻 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    detok = IncrementalDetokenizer(decoder(tokenizer))
    deltas = [detok.push(token) for token in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= len(ids) - len(text), "a character's leading bytes stream nothing until it is whole"
