"""Output processing on the caller's side: token ids in, text deltas and stop-sequence matches out.

The engine thread only produces token ids; each request's text is built here, on the event loop, incrementally
(TGI's prefix/read offsets: each new token decodes a short window, never the whole output again). Stop sequences
are matched on that text; a match ends the request here and tells the engine to drop the row.
"""

from __future__ import annotations

from typing import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

# Tokens decoded before the newest ones so that spacing/merges at the window's start match a full decode.
_CONTEXT_TOKENS = 5

# Why not `tokenizers.decoders.DecodeStream` (issue 17, measured with tokenizers 0.23.3 / transformers 5.25): it gives
# the same text as this class wherever it applies -- the embedded SmolLM2's byte-level BPE (accents, CJK, emoji, a ZWJ
# sequence, special tokens skipped, a stop sequence split across tokens), the tests' word-level tokenizer, a T5-style
# Metaspace BPE, a llama-style byte-fallback SentencePiece BPE, an id past the vocabulary -- and is faster (0.3 ms vs
# 7.3 ms for 400 tokens). But it steps a `tokenizers.Tokenizer`, and the Python-only tokenizers transformers still
# ships have none (`backend_tokenizer` is None): ByT5 (a T5, which the service serves), BioGPT, CTRL, XLM, Marian,
# M2M100, ... This class needs only the model's own `decode`, so one path serves every tokenizer (and the final text
# is that same `decode` of all ids); tests/test_detokenizer.py checks it on ByT5's bytes too.


class IncrementalDetokenizer:
    """Text of a growing token list, one delta per token (empty while a multi-byte character is incomplete)."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        prefix_text = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.tokens[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing printable yet (an incomplete character, or a token that decodes to nothing)
        delta = new_text[len(prefix_text) :]
        self._read_offset = len(self.tokens)
        self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
        self.text += delta
        return delta


class OutputProcessor:
    """One request's output: incremental text (when streamed or needed for stop sequences) and the final text."""

    def __init__(self, decode: Decode, stop: Sequence[str], with_text: bool) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._detok = IncrementalDetokenizer(decode) if (with_text or self._stop) else None
        self._with_text = with_text
        self._emitted = ""  # text already handed out as deltas
        self.stopped_text: str | None = None  # the final text, cut after a matched stop sequence

    def push(self, token: int) -> str:
        """Take the next token; return the text delta to stream ("" when not streaming). Sets `stopped_text` when
        a stop sequence is complete."""
        if self._detok is None:
            return ""
        before = len(self._detok.text)
        delta = self._detok.push(token)
        if self._stop and delta:
            # Only the new text (plus a stop's length of context) can complete a stop sequence.
            window_start = max(0, before - self._longest_stop + 1)
            if any(s in self._detok.text[window_start:] for s in self._stop):
                self.stopped_text = self._cut_at_stop(self._decode(self._detok.tokens))
                return self._delta_to(self.stopped_text)
        return self._delta_to(self._detok.text) if self._with_text else ""

    def _cut_at_stop(self, text: str) -> str:
        ends = [text.find(s) + len(s) for s in self._stop if s in text]
        return text[: min(ends)] if ends else text

    def _delta_to(self, text: str) -> str:
        if not self._with_text or not text.startswith(self._emitted):
            return ""  # a later token changed how earlier bytes decode; the final text is complete regardless
        delta = text[len(self._emitted) :]
        self._emitted = text
        return delta

    def final_text(self, token_ids: Sequence[int]) -> str:
        """The whole output, decoded once (cut at the stop sequence if one matched)."""
        if self.stopped_text is not None:
            return self.stopped_text
        return self._decode(token_ids)

    def final_delta(self, final_text: str) -> str:
        """What a stream still owes its client so that all deltas add up to the final text."""
        return self._delta_to(final_text)
