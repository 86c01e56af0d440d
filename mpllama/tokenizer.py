"""The sentencepiece tokenizer, a tiny trainer for test models, and the Llama 2 chat template.

No torch here: the driver tokenizes prompts before any rank is started, and the tokenizer
travels to the ranks as the bytes of its model (``Tokenizer.model_proto``), not as a path
that may not exist on another node.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, TypedDict

from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

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
            bad = sorted({i for i in ids if not 0 <= i < self.n_words})
            raise ValueError(
                f"cannot decode token ids {bad[:8]}: the tokenizer has {self.n_words} pieces "
                f"(ids 0..{self.n_words - 1}); is the model's vocab_size larger than the "
                "tokenizer's?"
            ) from None


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


# -------------------------------------------------------------------------- trainer

# Docstrings of these modules make a few hundred KB of English prose and code that every
# Python install carries, so tiny test tokenizers need no download. The text differs
# between Python versions, hence so does the trained model; within one install it is fixed.
_CORPUS_MODULES = (
    "os", "json", "collections", "itertools", "functools", "pathlib", "argparse",
    "logging", "re", "string", "textwrap", "unittest", "typing", "dataclasses",
    "subprocess", "threading", "asyncio", "http.client", "email", "csv", "sqlite3",
)  # fmt: skip

# Without these, CJK and emoji exist only as byte-fallback pieces: they still round-trip,
# but tests would never see a multi-byte character that has a piece of its own. Few
# distinct characters, since each one costs a piece that merges could otherwise use.
_EXTRA_LINES = (
    "你好，世界！",
    "世界你好。你好，模型。",
    "こんにちは、世界。",
    "안녕하세요, 세계.",
    "🦙 llama 🔥 fire 🚀 rocket 😀 smile 👍 ok",
)

# 256 byte pieces for byte fallback plus <unk>, <s>, </s>.
_BYTE_AND_SPECIAL_PIECES = 259


@functools.lru_cache(maxsize=1)
def _stdlib_corpus() -> tuple[str, ...]:
    docs: dict[str, None] = {}  # insertion-ordered set: int constants all share int's doc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some members warn (deprecated) when touched
        for name in _CORPUS_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # e.g. a Python built without sqlite3
                continue
            docs[inspect.getdoc(module) or ""] = None
            for attr in sorted(getattr(module, "__all__", None) or dir(module)):
                if attr.startswith("_"):
                    continue
                member = getattr(module, attr, None)
                if inspect.isclass(member) or inspect.isroutine(member):
                    docs[inspect.getdoc(member) or ""] = None
    lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
    return (*lines, *_EXTRA_LINES)


def _min_vocab_size(lines: Iterable[str]) -> int:
    # character_coverage=1.0 makes every distinct character a required piece, on top of
    # the byte pieces; sentencepiece writes the space as U+2581 before counting.
    chars = {c for line in lines for c in line.replace(" ", "\u2581")}
    return _BYTE_AND_SPECIAL_PIECES + len(chars)


def train_tokenizer(
    out_path: str | os.PathLike[str], vocab_size: int = 512, text: str | None = None
) -> Path:
    """Train a small Llama-style BPE sentencepiece model and write it to ``out_path``.

    The corpus is ``text`` (one sentence per line) or, when None, standard-library
    docstrings plus a few CJK and emoji lines. Training takes well under a second and is
    deterministic: the same corpus and vocab_size give byte-identical files.
    """
    lines = _stdlib_corpus() if text is None else tuple(t for t in text.splitlines() if t.strip())
    if not lines:
        raise ValueError("train_tokenizer: text has no non-blank line to train on")
    need = _min_vocab_size(lines)
    if vocab_size < need:
        raise ValueError(
            f"train_tokenizer: vocab_size={vocab_size} is too small; this corpus needs at "
            f"least {need} (256 byte-fallback pieces, 3 special pieces and "
            f"{need - _BYTE_AND_SPECIAL_PIECES} distinct characters)"
        )
    model = io.BytesIO()
    try:
        SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            # Llama's ids and normalisation: text round-trips byte for byte, whitespace too.
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,  # every corpus character gets a piece, CJK included
            # Determinism: one thread, every sentence, no sampling or shuffling.
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,  # sentencepiece otherwise logs every step to stderr
        )
    except RuntimeError as exc:
        # e.g. a vocab_size larger than the corpus can fill with merges.
        raise ValueError(
            f"train_tokenizer: sentencepiece could not train a {vocab_size}-piece model: "
            f"{str(exc).strip()}"
        ) from exc
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


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


def encode_dialogs(
    tokenizer: Tokenizer, dialogs: Sequence[Dialog]
) -> list[list[int] | PromptError]:
    """Encode each dialog on its own: a bad dialog yields its PromptError, the rest run."""
    results: list[list[int] | PromptError] = []
    for dialog in dialogs:
        try:
            results.append(encode_dialog(tokenizer, dialog))
        except PromptError as exc:
            results.append(exc)
    return results
