"""The tokenizer interface and its two kinds: sentencepiece (LLaMA 1, Llama 2, Code Llama)
and tiktoken (Llama 3.x), told apart by the content of ``tokenizer.model``, never by
its name.

No torch here: the driver tokenizes prompts before any rank is started, and the tokenizer
travels to the ranks as the bytes of its model file (``Tokenizer.model_proto``), not as a
path that may not exist on another node. Every caller uses the ``Tokenizer`` interface
alone: encode, decode, the incremental decoder (detokenize.py), special tokens by name,
the stop ids and the chat format that goes with the model (chat_format.py).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
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
    "TiktokenTokenizer",
    "Tokenizer",
    "check_dialog",
    "encode_dialog",
    "load_tokenizer",
]

_FIX = (
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
        raise CheckpointError(f"tokenizer model {str(path)!r} does not exist; {_FIX}") from None
    except OSError as exc:
        raise CheckpointError(
            f"tokenizer model {str(path)!r} cannot be read ({exc.strerror or exc}); "
            "tokenizer_path must name a readable tokenizer.model file"
        ) from exc


# A tiktoken BPE file is text lines of `base64(token bytes) rank`; a sentencepiece model is
# a protobuf, whose first byte (0x0A: field 1, a piece) is never a base64 character.
_BPE_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2}[ \t]+[0-9]+")


def _from_bytes(data: bytes, source: str) -> Tokenizer:
    first = data[:1024].lstrip(b"\r\n").split(b"\n", 1)[0].strip()  # a line is ~20 bytes
    kind = TiktokenTokenizer if _BPE_LINE.fullmatch(first) else SentencePieceTokenizer
    tokenizer = object.__new__(kind)  # not kind(...): that is Tokenizer(path)
    tokenizer._load(data, source)
    return tokenizer


def _check_utf8(text: str) -> None:
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
                f"BPE file (lines of `base64 rank`); {_FIX} (sentencepiece: "
                f"{str(exc).strip()})"
            ) from exc
        # Empty or unrelated protobuf bytes parse without error into a model with no pieces.
        if sp.vocab_size() == 0:
            raise CheckpointError(
                f"tokenizer model {source} holds no pieces (empty, or neither a sentencepiece "
                f"model nor a tiktoken BPE file); {_FIX}"
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
            _check_utf8(text)
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


# ----------------------------------------------------------------------- tiktoken

# Meta's Llama 3 pre-tokenizer pattern (llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta's special tokens, in order from id n_base (128000 in the released file); the
# rest of the 256 are `<|reserved_special_token_N|>` from N = 2.
_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
N_SPECIALS = 256
# As Meta's encoder: tiktoken handles at most ~400k characters per call, and slows down
# badly on very long runs of whitespace or of non-whitespace (tiktoken issue 195), so the
# text is cut into pieces first. The cuts change the ids, so they are Meta's exactly.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


def special_token_names() -> list[str]:
    reserved = range(2, 2 + N_SPECIALS - len(_NAMED_SPECIALS))
    return [*_NAMED_SPECIALS, *(f"<|reserved_special_token_{n}|>" for n in reserved)]


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer: byte-level BPE over Meta's pre-tokenizer pattern, with
    256 special tokens after the base vocabulary."""

    kind = "tiktoken"
    byte_level = True

    def _load(self, data: bytes, source: str) -> None:
        import tiktoken

        ranks = _parse_bpe(data, source)
        self._data = data
        n_base = len(ranks)
        self.special_ids = {name: n_base + i for i, name in enumerate(special_token_names())}
        # Built in-process from the parsed ranks: no cache file, no download.
        self._enc = tiktoken.Encoding(
            name="llama3",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
        )
        self.n_words = n_base + N_SPECIALS
        self.bos_id = self.special_ids["<|begin_of_text|>"]
        self.eos_id = self.special_ids["<|end_of_text|>"]
        self.pad_id = self.special_ids["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset(
            self.special_ids[name] for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
        )

    @property
    def model_proto(self) -> bytes:
        return self._data

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        self._check_text(text)
        if not text.isascii():
            _check_utf8(text)  # tiktoken would silently replace a lone surrogate
        ids = [self.bos_id] if bos else []
        for part in _pieces(text):
            # Special-token text stays text: a prompt cannot forge a header or end a turn.
            ids += self._enc.encode(part, allowed_special=set(), disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self._enc.decode(list(ids))
        except (KeyError, OverflowError, ValueError):
            raise out_of_range(list(ids), self.n_words) from None

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def vocab_bytes(self) -> list[bytes]:
        special = set(self.special_ids.values())
        token = self._enc.decode_single_token_bytes
        return [b"\xff" + token(i) if i in special else token(i) for i in range(self.n_words)]

    def encode_dialog(self, dialog: Dialog) -> list[int]:
        return chat_format.encode_llama3(self, dialog)

    def check_dialog(self, dialog: Dialog) -> None:
        chat_format.check_llama3(dialog)


def _parse_bpe(data: bytes, source: str) -> dict[bytes, int]:
    """Token bytes -> rank from the lines of a tiktoken BPE file; ranks must be 0..n-1."""

    def bad(line: int, why: str) -> CheckpointError:
        return CheckpointError(
            f"tokenizer model {source} looks like a tiktoken BPE file but line {line} {why}; "
            f"every line must be `base64(token bytes) rank`; {_FIX}"
        )

    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise bad(n, f"is {line[:60]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except binascii.Error:
            raise bad(n, f"has invalid base64 {parts[0][:60]!r}") from None
        if token in ranks:
            raise bad(n, f"repeats the token of rank {ranks[token]}")
        ranks[token] = int(parts[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(
            f"tokenizer model {source}: the ranks of its {len(ranks)} tokens are not "
            f"0..{len(ranks) - 1} each once, so the special token ids cannot follow them; {_FIX}"
        )
    return ranks


def _pieces(text: str) -> Iterator[str]:
    """``text`` cut as Meta's encoder cuts it: every 400k characters, and inside any run
    of whitespace or of non-whitespace longer than 25k characters."""
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start : start + _MAX_ENCODE_CHARS]
        if len(chunk) <= _MAX_RUN_CHARS:
            yield chunk  # no run can be too long
            continue
        cut, run, space = 0, 0, chunk[0].isspace()
        for i, char in enumerate(chunk):
            if char.isspace() != space:
                space, run = not space, 1
                continue
            run += 1
            if run > _MAX_RUN_CHARS:
                yield chunk[cut:i]
                cut, run = i, 1
        yield chunk[cut:]
