"""The tokenizer interface and its two kinds: sentencepiece (LLaMA 1, Llama 2, Code Llama;
here) and tiktoken (Llama 3.x; tokenizer_llama3.py), told apart by the content of
``tokenizer.model``, never by its name.

No torch here: the driver tokenizes prompts before any rank is started, and the tokenizer
travels to the ranks as the bytes of its model file (``Tokenizer.model_proto``), not as a
path that may not exist on another node. Every caller uses the ``Tokenizer`` interface
alone: encode, decode, the incremental decoder (detokenize.py), special tokens by name,
the stop ids and the chat format that goes with the model (chat_format.py).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from . import chat_format
from .chat_format import SPECIAL_TAGS, Dialog, Message, Role, check_dialog
from .detokenize import IncrementalDecoder, out_of_range
from .errors import CheckpointError, PromptError

__all__ = [
    "SPECIAL_TAGS",
    "Dialog",
    "IncrementalDecoder",
    "Message",
    "Role",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_dialog",
    "encode_dialog",
    "load_tokenizer",
]

FIX_HINT = (
    "point tokenizer_path at the checkpoint's tokenizer.model (sentencepiece for LLaMA 1/2 "
    "and Code Llama, tiktoken BPE for Llama 3.x), or run `mpllama init-checkpoint` to "
    "create a tiny checkpoint with its own tokenizer"
)

# ------------------------------------------------------------------------ interface


class Tokenizer(ABC):
    """What every caller may use. ``Tokenizer(path)`` and ``Tokenizer.from_bytes(data)``
    give the kind the content says (``SentencePieceTokenizer`` or ``TiktokenTokenizer``)."""

    kind: ClassVar[str]  # "sentencepiece" | "tiktoken"
    # True when decode(ids) is the UTF-8 decoding of the tokens' bytes joined, so that
    # token_bytes never returns None (the incremental decoder relies on it).
    byte_level: ClassVar[bool]
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1 where the tokenizer has no pad piece (sentencepiece Llamas)
    stop_ids: frozenset[int]  # generation ends at any of these (the model's own stops)
    special_ids: dict[str, int]  # special token name -> id

    def __new__(cls, model_path: str | os.PathLike[str]) -> Tokenizer:
        # Tokenizer(path) reads the file and returns the kind its content says.
        path = Path(model_path)
        tokenizer = _from_bytes(_read(path), repr(str(path)))
        if not isinstance(tokenizer, cls):
            raise CheckpointError(
                f"tokenizer model {str(path)!r} is a {tokenizer.kind} model, not {cls.kind}; "
                "use load_tokenizer(path), which takes either kind"
            )
        return tokenizer

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        """Load from ``model_proto`` bytes, as shipped from the driver to a rank."""
        return _from_bytes(data, "from model_proto bytes")

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # Pickled (e.g. by Ray) as its model file's bytes once, not as a path or parsed.
        return (Tokenizer.from_bytes, (self.model_proto,))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_words={self.n_words}, bos_id={self.bos_id}, "
            f"stop_ids={sorted(self.stop_ids)})"
        )

    @property
    @abstractmethod
    def model_proto(self) -> bytes:
        """The tokenizer file's bytes: what travels to the ranks."""

    @abstractmethod
    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``text``; text never becomes a special token."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes ``token_id`` decodes to wherever it stands: b"" for a token that shows
        no text, None for a sentencepiece piece whose text depends on its neighbours (the
        leading space that decode drops at the start). Byte-level kinds never give None;
        sentencepiece gives one byte for exactly its byte-fallback pieces."""

    @abstractmethod
    def vocab_bytes(self) -> list[bytes]:
        """Per id, the bytes the token stands for in the middle of a text (a sentencepiece
        word piece with its leading space), a special or control token as b"\\xff" and its
        name (llguidance's convention: no text can spell it). What a grammar engine needs
        to know which tokens continue a text."""

    @abstractmethod
    def encode_dialog(self, dialog: Dialog) -> list[int]:
        """The prompt tokens for ``dialog`` in this model's chat format, ending where the
        assistant's answer starts. PromptError, naming the message, for a bad dialog."""

    @abstractmethod
    def check_dialog(self, dialog: Dialog) -> None:
        """Raise PromptError, naming the message index, unless this chat format takes it."""

    @abstractmethod
    def _load(self, data: bytes, source: str) -> None:
        """Parse the file's bytes (``source`` names them in errors)."""

    def _check_text(self, text: Any) -> None:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer in ``path``, of the kind its content says."""
    return Tokenizer(path)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """``tokenizer.encode_dialog(dialog)``, kept for callers of the function."""
    return tokenizer.encode_dialog(dialog)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer model {str(path)!r} does not exist; {FIX_HINT}") from None
    except OSError as exc:
        raise CheckpointError(
            f"tokenizer model {str(path)!r} cannot be read ({exc.strerror or exc}); "
            "tokenizer_path must name a readable tokenizer.model file"
        ) from exc


# A tiktoken BPE file is text lines of `base64(token bytes) rank`; a sentencepiece model is
# a protobuf, whose first byte (0x0A: field 1, a piece) is never a base64 character.
_BPE_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2}[ \t]+[0-9]+")


def _from_bytes(data: bytes, source: str) -> Tokenizer:
    # tokenizer_llama3 builds on this module, so it is imported where it is needed.
    from .tokenizer_llama3 import TiktokenTokenizer

    first = data[:1024].lstrip(b"\r\n").split(b"\n", 1)[0].strip()  # a line is ~20 bytes
    kind: type[Tokenizer] = (
        TiktokenTokenizer if _BPE_LINE.fullmatch(first) else SentencePieceTokenizer
    )
    tokenizer = object.__new__(kind)  # not kind(...): that is Tokenizer(path)
    tokenizer._load(data, source)
    return tokenizer


def check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"text cannot be encoded as UTF-8: {exc.object[exc.start : exc.end]!r} at "
            f"position {exc.start} is a lone surrogate ({exc.reason}); such text usually "
            "comes from bytes decoded with errors='surrogateescape': decode the input with "
            "its real encoding, or with errors='replace'"
        ) from None


# ------------------------------------------------------------------ sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with the interface of Meta's Llama 2 reference tokenizer."""

    kind = "sentencepiece"
    byte_level = False

    def _load(self, data: bytes, source: str) -> None:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        try:
            sp.load_from_serialized_proto(data)
        except RuntimeError as exc:
            raise CheckpointError(
                f"tokenizer model {source} is neither a sentencepiece model nor a tiktoken "
                f"BPE file (lines of `base64 rank`); {FIX_HINT} (sentencepiece: "
                f"{str(exc).strip()})"
            ) from exc
        # Empty or unrelated protobuf bytes parse without error into a model with no pieces.
        if sp.vocab_size() == 0:
            raise CheckpointError(
                f"tokenizer model {source} holds no pieces (empty, or neither a sentencepiece "
                f"model nor a tiktoken BPE file); {FIX_HINT}"
            )
        self._sp = sp
        self.n_words = sp.vocab_size()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        self.pad_id = sp.pad_id()
        self.stop_ids = frozenset({self.eos_id})
        self.special_ids = {
            sp.id_to_piece(i): i for i in (sp.unk_id(), self.bos_id, self.eos_id) if i >= 0
        }
        # Per id: b"" for a control piece, the byte of a byte-fallback piece, else None.
        self._bytes: list[bytes | None] = [
            b""
            if sp.is_control(i)
            else bytes((int(sp.id_to_piece(i)[1:-1], 16),))  # the piece is "<0xE4>"
            if sp.is_byte(i)
            else None
            for i in range(self.n_words)
        ]

    @property
    def model_proto(self) -> bytes:
        return self._sp.serialized_model_proto()

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        self._check_text(text)
        try:
            ids = self._sp.encode(text)
        except (RuntimeError, UnicodeError):
            # pybind11 reports a str without a UTF-8 form as a bare RuntimeError.
            check_utf8(text)
            raise
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self._sp.decode(list(ids))
        except IndexError:
            raise out_of_range(list(ids), self.n_words) from None

    def token_bytes(self, token_id: int) -> bytes | None:
        return self._bytes[token_id]

    def vocab_bytes(self) -> list[bytes]:
        sp = self._sp
        return [
            b"\xff" + sp.id_to_piece(i).encode()
            if sp.is_control(i) or sp.is_unknown(i)
            else known
            if (known := self._bytes[i]) is not None
            else sp.id_to_piece(i).replace("\u2581", " ").encode()
            for i in range(self.n_words)
        ]

    def encode_dialog(self, dialog: Dialog) -> list[int]:
        return chat_format.encode_llama2(self, dialog)

    def check_dialog(self, dialog: Dialog) -> None:
        chat_format.check_llama2(dialog)
