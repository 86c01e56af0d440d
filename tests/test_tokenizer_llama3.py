"""The tiktoken (Llama 3.x) tokenizer against Meta's own (``llama_models``): ids, decode,
special tokens, kind detection from content, and the incremental decoder on byte-level
BPE, where one character can span several tokens."""

from __future__ import annotations

import base64
import codecs
import pickle
import random
from pathlib import Path

import pytest
from helpers import completable

from mpllama.errors import CheckpointError, PromptError
from mpllama.tokenizer import (
    IncrementalDecoder,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from mpllama.tokenizer_llama3 import TiktokenTokenizer

llama3_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
LLAMA3_MODEL = Path(llama3_tokenizer.__file__).parent / "tokenizer.model"


@pytest.fixture(scope="module")
def meta():
    return llama3_tokenizer.Tokenizer(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(LLAMA3_MODEL)


TEXTS = [
    "Hello, world! The model is sharded over ranks.",
    "",
    " ",
    "你好，世界。日本語のテキストと한국어 텍스트",
    "🦙🔥👩‍👩‍👧‍👦 emoji, flags 🇫🇷🇯🇵 and skin tones 👍🏽",
    "  two  spaces,\ta tab,\n\nnew lines\r\n   and trailing   \n",
    "\n\n\n    \t\t  \u00a0\u2003 odd spaces",
    "3.14159 and 2024-01-01: 1234567890 0007 1,000,000",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f(12))\n",
    "I'm sure you'll see they've said it's John's, we'd, I'LL, DON'T",
    "<|eot_id|> <|begin_of_text|><|start_header_id|>user<|end_header_id|> [INST] <<SYS>>",
    "Ünïcödé ñ ß ø émigré naïve Ελληνικά русский עברית العربية हिन्दी",
    "𓀀 ∮ E⋅da = Q, x² + y² = z², ½ ⅓ ¼",
    "a" * 300 + " " * 50 + "b!?" * 40,
]


def test_kind_and_special_tokens(tok: Tokenizer, meta) -> None:
    assert isinstance(tok, TiktokenTokenizer) and isinstance(
        Tokenizer(LLAMA3_MODEL), TiktokenTokenizer
    )
    assert tok.kind == "tiktoken" and tok.byte_level
    assert tok.n_words == meta.n_words == 128256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (meta.bos_id, meta.eos_id, meta.pad_id)
    assert tok.special_ids == meta.special_tokens
    assert tok.special_ids["<|eot_id|>"] == 128009 and tok.special_ids["<|python_tag|>"] == 128010
    assert tok.stop_ids == frozenset(meta.stop_tokens) == {128001, 128008, 128009}


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_decode_equal_metas(tok: Tokenizer, meta, text: str) -> None:
    for bos, eos in [(False, False), (True, False), (True, True)]:
        ids = tok.encode(text, bos=bos, eos=eos)
        assert ids == meta.encode(text, bos=bos, eos=eos)
        assert tok.decode(ids) == meta.decode(ids)
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_long_inputs_are_cut_as_metas(tok: Tokenizer, meta) -> None:
    # Runs past 25k characters, and text past 400k, are cut before BPE: the ids show it.
    texts = [
        " " * 30_000 + "word" + "x" * 60_000 + "\n" * 3,
        ("lorem ipsum dolor " * 25_000)[:420_000] + "end",
    ]
    for text in texts:
        assert tok.encode(text, bos=True, eos=False) == meta.encode(text, bos=True, eos=False)


def test_special_token_text_stays_text(tok: Tokenizer) -> None:
    ids = tok.encode("<|eot_id|><|start_header_id|>system", bos=False, eos=False)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == "<|eot_id|><|start_header_id|>system"
    # The id itself decodes to its name, as Meta's decode does.
    assert tok.decode([128009]) == "<|eot_id|>"


def test_generated_ids_decode_as_metas(tok: Tokenizer, meta) -> None:
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.n_words) for _ in range(rng.randint(0, 30))]
        assert tok.decode(ids) == meta.decode(ids)


def test_pickle_and_from_bytes_are_compact_and_equal(tok: Tokenizer) -> None:
    data = pickle.dumps(tok)
    assert len(data) < len(LLAMA3_MODEL.read_bytes()) + 1000  # the file's bytes, once
    assert tok.model_proto == LLAMA3_MODEL.read_bytes()
    for copy in (pickle.loads(data), Tokenizer.from_bytes(tok.model_proto)):
        assert isinstance(copy, TiktokenTokenizer)
        for text in TEXTS:
            assert copy.encode(text, bos=True, eos=False) == tok.encode(text, bos=True, eos=False)


def bpe_file(path: Path, tokens: list[bytes]) -> Path:
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
    return path


def test_special_ids_follow_the_base_vocabulary(tmp_path: Path) -> None:
    # A made-up file of the 256 single bytes plus two merges: specials start at 258.
    tokens = [bytes((b,)) for b in range(256)] + [b"ab", b"abc"]
    tok = load_tokenizer(bpe_file(tmp_path / "weird-name.bin", tokens))
    assert tok.kind == "tiktoken" and tok.n_words == 258 + 256
    assert (tok.bos_id, tok.eos_id) == (258, 259)
    assert tok.stop_ids == {259, 258 + 8, 258 + 9}
    assert tok.encode("abc ab", bos=True, eos=False) == [258, 257, ord(" "), 256]
    assert tok.decode([257, 258 + 9]) == "abc<|eot_id|>"


def test_kind_is_read_from_content_not_name(tmp_path: Path, model_path: Path) -> None:
    # A sentencepiece model named like anything, a BPE file named tokenizer.model.
    sp_copy = tmp_path / "tiktoken.bpe"
    sp_copy.write_bytes(model_path.read_bytes())
    assert isinstance(load_tokenizer(sp_copy), SentencePieceTokenizer)
    assert load_tokenizer(sp_copy).kind == "sentencepiece"
    with pytest.raises(CheckpointError, match="is a tiktoken model, not sentencepiece"):
        SentencePieceTokenizer(LLAMA3_MODEL)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"neither kind of file\n", "neither a sentencepiece model nor a tiktoken"),
        (b"", "neither a sentencepiece model nor a tiktoken"),
        (b"IQ== 0\nIg== 1\nnot a line\n", "line 3"),
        (b"IQ== 0\nI!g== 1\n", "line 2"),
        (b"IQ== 0\nIg== 2\n", "ranks"),
        (b"IQ== 0\nIQ== 1\n", "repeats"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value) and "tokenizer_path" in str(info.value)


def test_errors(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"\[128256\].*128256 pieces"):
        tok.decode([5, 128256])
    with pytest.raises(ValueError, match=r"\[-1\]"):
        tok.decode([-1])
    with pytest.raises(PromptError, match="UTF-8.*position 2"):
        tok.encode("ab\udcffcd", bos=True, eos=False)
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"x", bos=False, eos=False)  # type: ignore[arg-type]


# ------------------------------------------------------------------ streaming decode


def check_stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids), ids
    shown, data = "", b""
    for n, piece in enumerate(pieces[:-1], 1):
        shown += piece
        data += tok.token_bytes(ids[n - 1])
        so_far = tok.decode(ids[:n])
        assert so_far.startswith(shown), (ids[:n], shown, so_far)
        held = so_far[len(shown) :]
        if held:
            # Only an unfinished character is held back: 1-3 trailing bytes that some
            # continuation makes one valid character.
            assert held == "\ufffd", (ids[:n], held)
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            utf8.decode(data)
            tail = utf8.getstate()[0]
            assert 1 <= len(tail) <= 3 and completable(tail), (ids[:n], tail)
    return pieces


def test_stream_texts(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=False) + [tok.special_ids["<|eot_id|>"]]
        pieces = check_stream(tok, ids)
        assert "".join(pieces) == "<|begin_of_text|>" + text + "<|eot_id|>"


def test_characters_split_over_tokens(tok: Tokenizer) -> None:
    # Single-byte tokens (the BPE's base): "你" is E4 BD A0, one token per byte.
    byte_id = {tok.token_bytes(i): i for i in range(tok.n_words - 256)}
    ids = [byte_id[bytes((b,))] for b in "你🦙".encode()]
    assert check_stream(tok, ids) == ["", "", "你", "", "", "", "🦙", ""]
    assert check_stream(tok, ids[:5]) == ["", "", "你", "", "", "\ufffd"]


def test_random_ids(tok: Tokenizer) -> None:
    """Random sequences, and emoji/CJK text encoded then cut and spliced at random, so
    that sequences start and end partway through characters."""
    rng = random.Random(0)
    text = "你好，世界！🦙🔥👩‍👩‍👧‍👦 日本語のテキスト 𓀀 ∮ émigré " * 3
    encoded = tok.encode(text, bos=False, eos=False)
    multi = [i for i in range(tok.n_words - 256) if max(tok.token_bytes(i)) >= 0x80]
    specials = sorted(tok.special_ids.values())
    for n in range(400):
        if n % 4 == 0:
            ids = [rng.randrange(tok.n_words) for _ in range(rng.randint(0, 30))]
        elif n % 4 == 1:
            ids = [rng.choice(rng.choice([multi, specials, encoded])) for _ in range(30)]
        else:
            ids = []
            for _ in range(rng.randint(1, 4)):
                a = rng.randrange(len(encoded))
                ids += encoded[a : a + rng.randint(1, 12)]
        check_stream(tok, ids)


def test_decoder_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    decoder = IncrementalDecoder(tok)
    for bad in (128256, -1):
        with pytest.raises(ValueError, match=rf"\[{bad}\].*128256 pieces"):
            decoder.add(bad)
