"""The sentencepiece tokenizer, its incremental decoder, and the Llama 2 chat template.

No torch here: the driver tokenizes prompts before any rank is started, and the tokenizer
travels to the ranks as the bytes of its model (``Tokenizer.model_proto``), not as a path
that may not exist on another node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypedDict

from sentencepiece import SentencePieceProcessor

from .errors import CheckpointError, PromptError

# ------------------------------------------------------------------------ tokenizer


class Tokenizer:
    """A sentencepiece model with the interface of Meta's Llama reference tokenizer."""

    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1: Llama tokenizers have no pad piece

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        path = Path(model_path)
        try:
            proto = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"tokenizer model {str(path)!r} does not exist; pass tokenizer_path pointing "
                "at a sentencepiece tokenizer.model, or run `mpllama init-checkpoint` to "
                "create a tiny checkpoint with its own tokenizer"
            ) from None
        except OSError as exc:
            raise CheckpointError(
                f"tokenizer model {str(path)!r} cannot be read ({exc.strerror or exc}); "
                "tokenizer_path must name a readable sentencepiece tokenizer.model file"
            ) from exc
        self._load(proto, source=repr(str(path)))

    @classmethod
    def from_bytes(cls, proto: bytes) -> Tokenizer:
        """Load from ``model_proto`` bytes, as shipped from the driver to a rank."""
        self = cls.__new__(cls)
        self._load(proto, source="from model_proto bytes")
        return self

    def _load(self, proto: bytes, source: str) -> None:
        sp = SentencePieceProcessor()
        try:
            sp.load_from_serialized_proto(proto)
        except RuntimeError as exc:
            raise CheckpointError(
                f"tokenizer model {source} is not a sentencepiece model (it does not parse: "
                f"{str(exc).strip()}); point tokenizer_path at the checkpoint's "
                "tokenizer.model, or run `mpllama init-checkpoint` to create one"
            ) from exc
        # Empty or unrelated protobuf bytes parse without error into a model with no pieces.
        if sp.vocab_size() == 0:
            raise CheckpointError(
                f"tokenizer model {source} holds no pieces (empty or not a sentencepiece "
                "model); point tokenizer_path at the checkpoint's tokenizer.model, or run "
                "`mpllama init-checkpoint` to create one"
            )
        self._sp = sp
        self.n_words = sp.vocab_size()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        self.pad_id = sp.pad_id()

    @property
    def model_proto(self) -> bytes:
        return self._sp.serialized_model_proto()

    def __reduce__(self) -> tuple[object, tuple[bytes]]:
        # Pickled (e.g. by Ray) as its model bytes once, rather than as a path or twice over.
        return (Tokenizer.from_bytes, (self.model_proto,))

    def __repr__(self) -> str:
        return f"Tokenizer(n_words={self.n_words}, bos_id={self.bos_id}, eos_id={self.eos_id})"

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
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

    def decode(self, ids: list[int]) -> str:
        try:
            return self._sp.decode(ids)
        except IndexError:
            raise _out_of_range(ids, self.n_words) from None


def _out_of_range(ids: list[int], n_words: int) -> ValueError:
    bad = sorted({i for i in ids if not 0 <= i < n_words})
    return ValueError(
        f"cannot decode token ids {bad[:8]}: the tokenizer has {n_words} pieces "
        f"(ids 0..{n_words - 1}); is the model's vocab_size larger than the tokenizer's?"
    )


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


# ----------------------------------------------------------------- streaming decode

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

    Like vLLM's and TGI's detokenizers, each step decodes a small window, not the whole
    output: the context (the tokens of the last non-empty piece) and the tokens after it;
    the new piece is what those add to the context's text. The context is needed because
    sentencepiece drops the leading space of the first piece that shows text: a window
    starting at, say, </s> would drop one that the full decode keeps, while a context that
    shows text (or has already had its space dropped) makes the window agree with it. Text
    is held back only while the window ends partway through a byte-fallback character, so
    the window stays a few tokens long however long the output grows.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._sp = tokenizer._sp
        self._ids: list[int] = []  # the window: context, then tokens not yet shown
        self._read = 0  # len(context)
        self._tail = b""  # the last bytes of the window's trailing byte-fallback tokens

    def add(self, token_id: int) -> str:
        """The text ``token_id`` completes: "" while it ends partway through a character."""
        sp = self._sp
        if not 0 <= token_id < self._tokenizer.n_words:
            raise _out_of_range([token_id], self._tokenizer.n_words)
        if sp.is_control(token_id) and self._ids and sp.is_control(self._ids[-1]):
            # A second control token in a row changes nothing that decode shows (no text,
            # the byte run was already cut): skipping it keeps runs of </s> out of the window.
            return ""
        self._ids.append(token_id)
        if sp.is_byte(token_id):
            byte = int(sp.id_to_piece(token_id)[1:-1], 16)  # the piece is "<0xE4>"
            self._tail = self._tail[-2:] + bytes((byte,))
        else:
            self._tail = b""  # a non-byte piece ends the byte run, complete or not
        return self._emit(len(self._ids) - _unfinished_char(self._tail))

    def flush(self) -> str:
        """What is still held back at the end: an unfinished character, as U+FFFD."""
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


# -------------------------------------------------------------------- chat template

# Meta's Llama 2 chat format, exactly as its reference ``chat_completion`` builds it.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]

Role = Literal["system", "user", "assistant"]
_ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]


def check_dialog(dialog: Dialog) -> None:
    """Raise PromptError, naming the message index, unless ``dialog`` fits the template.

    The template wants an optional system message, then user and assistant turns in
    alternation, ending on a user turn the model is to answer.
    """
    if not isinstance(dialog, list):
        raise PromptError(f"a dialog must be a list of messages, got {type(dialog).__name__}")
    if not dialog:
        raise PromptError(
            "dialog is empty; expected [optional system message,] user, assistant, ..., user"
        )
    start = 1 if isinstance(dialog[0], dict) and dialog[0].get("role") == "system" else 0
    for i, msg in enumerate(dialog):
        if not (
            isinstance(msg, dict)
            and isinstance(msg.get("role"), str)
            and isinstance(msg.get("content"), str)
        ):
            raise PromptError(
                f"message {i}: expected a dict with str 'role' and 'content', got {msg!r:.80}"
            )
        role, content = msg["role"], msg["content"]
        if role not in _ROLES:
            raise PromptError(f"message {i}: unknown role {role!r}; expected one of {_ROLES}")
        if role == "system" and i != 0:
            raise PromptError(
                f"message {i}: a system message may only be the first message of a dialog"
            )
        for tag in SPECIAL_TAGS:
            if tag in content:
                raise PromptError(
                    f"message {i} contains {tag!r}; the tags {SPECIAL_TAGS} are reserved "
                    "for the chat template and may not appear in message content"
                )
        if i >= start:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if role != expected:
                raise PromptError(
                    f"message {i}: expected role {expected!r}, got {role!r}; after the "
                    "optional system message, roles must alternate user, assistant, user, ..."
                )
    if dialog[-1]["role"] != "user":
        raise PromptError(
            f"message {len(dialog) - 1}: the last message is from the "
            f"{dialog[-1]['role']}; a dialog must end with a user message for the model to answer"
        )


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt tokens for ``dialog``, as Meta's Llama 2 ``chat_completion`` makes them."""
    check_dialog(dialog)
    turns = [msg["content"] for msg in dialog]
    if dialog[0]["role"] == "system":
        # Llama 2 has no system turn: the system text rides inside the first user turn.
        turns = [B_SYS + turns[0].strip() + E_SYS + turns[1].strip(), *turns[2:]]
    tokens: list[int] = []
    # check_dialog made turns odd in number: (user, answer) pairs, then the last user turn.
    for user, answer in zip(turns[:-1:2], turns[1::2], strict=True):
        tokens += tokenizer.encode(
            f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True
        )
    tokens += tokenizer.encode(f"{B_INST} {turns[-1].strip()} {E_INST}", bos=True, eos=False)
    return tokens
