"""Llama 3.x's tokenizer (``TiktokenTokenizer``): Meta's byte-level BPE over its
pre-tokenizer pattern, with 256 special tokens after the base vocabulary, read from a
tiktoken BPE ``tokenizer.model``. The interface and the sentencepiece kind are
tokenizer.py's, which picks this kind by the file's content.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence

from . import chat_format
from .chat_format import Dialog
from .detokenize import out_of_range
from .errors import CheckpointError
from .tokenizer import FIX_HINT, Tokenizer, check_utf8

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
            check_utf8(text)  # tiktoken would silently replace a lone surrogate
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
            f"every line must be `base64(token bytes) rank`; {FIX_HINT}"
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
            f"0..{len(ranks) - 1} each once, so the special token ids cannot follow them; {FIX_HINT}"
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
