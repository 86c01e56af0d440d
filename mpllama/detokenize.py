"""The incremental decoder: text pieces for a growing list of token ids, for both
tokenizer kinds, never splitting a UTF-8 character. No torch, no tokenizer library: it
uses only the ``Tokenizer`` interface (``decode``, ``byte_level``, ``token_bytes``).
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


def out_of_range(ids: list[int], n_words: int) -> ValueError:
    bad = sorted({i for i in ids if not 0 <= i < n_words})
    return ValueError(
        f"cannot decode token ids {bad[:8]}: the tokenizer has {n_words} pieces "
        f"(ids 0..{n_words - 1}); is the model's vocab_size larger than the tokenizer's?"
    )


# UTF-8 lead byte -> (character length, range of its second byte). The narrow second-byte
# ranges exclude overlong forms (E0, F0), surrogates (ED) and code points past U+10FFFF
# (F4): sentencepiece never decodes those, so such a start can never become a character.
_UTF8_LEADS: dict[int, tuple[int, int, int]] = {
    **{b: (2, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    **{b: (3, 0x80, 0xBF) for b in range(0xE1, 0xF0)},
    0xE0: (3, 0xA0, 0xBF),
    0xED: (3, 0x80, 0x9F),
    **{b: (4, 0x80, 0xBF) for b in range(0xF1, 0xF4)},
    0xF0: (4, 0x90, 0xBF),
    0xF4: (4, 0x80, 0x8F),
}


def _unfinished_char(tail: bytes) -> int:
    """How many of the last bytes of ``tail`` (at most 3) start a character that more bytes
    could still complete; 0 if none. sentencepiece shows such bytes as U+FFFD, one per
    byte, until the character is whole; a byte no continuation can make valid is U+FFFD
    for good, whatever follows."""
    for back in range(1, len(tail) + 1):
        lead = tail[-back]
        if 0x80 <= lead < 0xC0:
            continue  # a continuation byte: the lead, if any, is further back
        if lead not in _UTF8_LEADS:
            return 0  # ASCII, or a byte that starts no character
        length, low, high = _UTF8_LEADS[lead]
        unfinished = back < length and (back == 1 or low <= tail[-back + 1] <= high)
        return back if unfinished else 0
    return 0


class IncrementalDecoder:
    """Text pieces for a growing list of token ids, without re-decoding the whole output.

    ``"".join(d.add(t) for t in ids) + d.flush() == tokenizer.decode(ids)`` for any ids.

    Byte-level tokenizers (tiktoken): ``decode`` is the UTF-8 decoding (errors replaced)
    of the tokens' bytes joined, so Python's incremental UTF-8 decoder gives the same text
    piece by piece, holding back only the bytes of a character not yet whole (a character
    may span several tokens, and a token may end partway through one).

    sentencepiece: like vLLM's and TGI's detokenizers, each step decodes a small window,
    not the whole output: the context (the tokens of the last non-empty piece) and the
    tokens after it; the new piece is what those add to the context's text. The context
    is needed because sentencepiece drops the leading space of the first piece that shows
    text: a window starting at, say, </s> would drop one that the full decode keeps, while
    a context that shows text (or has already had its space dropped) makes the window
    agree with it. Text is held back only while the window ends partway through a
    byte-fallback character, so the window stays a few tokens long however long the
    output grows.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = (
            codecs.getincrementaldecoder("utf-8")(errors="replace")
            if tokenizer.byte_level
            else None
        )
        self._ids: list[int] = []  # the window: context, then tokens not yet shown
        self._read = 0  # len(context)
        self._tail = b""  # the last bytes of the window's trailing byte-fallback tokens
        self._last_control = False  # whether the window's last token is a control piece

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def add(self, token_id: int) -> str:
        """The text ``token_id`` completes: "" while it ends partway through a character."""
        tok = self._tokenizer
        if not 0 <= token_id < tok.n_words:
            raise out_of_range([token_id], tok.n_words)
        piece = tok.token_bytes(token_id)
        if self._utf8 is not None:
            assert piece is not None  # byte-level: every token has its own bytes
            return self._utf8.decode(piece)
        # sentencepiece: b"" is a control piece (shows nothing), one byte a byte-fallback
        # piece, None a piece whose text depends on its place (the leading space).
        control = piece == b""
        if control and self._ids and self._last_control:
            # A second control token in a row changes nothing that decode shows (no text,
            # the byte run was already cut): skipping it keeps runs of </s> out of the window.
            return ""
        self._ids.append(token_id)
        self._last_control = control
        if piece:
            self._tail = self._tail[-2:] + piece
        else:
            self._tail = b""  # a non-byte piece ends the byte run, complete or not
        return self._emit(len(self._ids) - _unfinished_char(self._tail))

    def flush(self) -> str:
        """What is still held back at the end: an unfinished character, as U+FFFD."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        self._tail = b""
        return self._emit(len(self._ids))

    def _emit(self, end: int) -> str:
        """Show the window's tokens up to ``end``; those after it stay unread."""
        if end <= self._read:
            return ""
        # Cutting a byte run before an unfinished character's lead byte leaves the bytes
        # before it decoding as they will with the rest: a lead is nobody's continuation.
        context = self._tokenizer.decode(self._ids[: self._read])
        piece = self._tokenizer.decode(self._ids[:end])[len(context) :]
        if piece:
            del self._ids[: self._read]  # the tokens just shown are the next context
            end -= self._read
        self._read = end
        return piece
