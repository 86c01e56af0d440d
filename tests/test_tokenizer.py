"""Tokenizer, its incremental decoder and the Llama 2 chat template."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import completable
from sentencepiece import SentencePieceProcessor

from mpllama.errors import CheckpointError, PromptError
from mpllama.tokenizer import (
    SPECIAL_TAGS,
    IncrementalDecoder,
    Tokenizer,
    check_dialog,
    encode_dialog,
)

# ---------------------------------------------------------------------- encode/decode

ROUND_TRIP = [
    "Hello, world! The model is sharded over ranks.",
    "你好，世界",
    "🦙🔥",
    "  two  spaces,\ta tab,\nnew lines\r\n and trailing  ",
    " leading space",
    "3.14159 and 2024-01-01: 1234567890",
    "𓀀 never seen: ∮ E⋅da = Q",  # characters outside the corpus go through byte fallback
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_bos_eos_flags(tok: Tokenizer) -> None:
    body = tok.encode("hello", bos=False, eos=False)
    assert body and tok.bos_id not in body and tok.eos_id not in body
    assert tok.encode("hello", bos=True, eos=False) == [tok.bos_id, *body]
    assert tok.encode("hello", bos=False, eos=True) == [*body, tok.eos_id]
    assert tok.encode("hello", bos=True, eos=True) == [tok.bos_id, *body, tok.eos_id]
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]


def test_from_bytes_and_pickle_match_file(tok: Tokenizer, model_path: Path) -> None:
    assert tok.model_proto == model_path.read_bytes()
    copies = [Tokenizer.from_bytes(model_path.read_bytes()), pickle.loads(pickle.dumps(tok))]
    for copy in copies:
        assert (copy.n_words, copy.bos_id, copy.eos_id, copy.pad_id) == (512, 1, 2, -1)
        for text in ROUND_TRIP:
            assert copy.encode(text, bos=True, eos=False) == tok.encode(text, bos=True, eos=False)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        Tokenizer(path)
    assert str(path) in str(info.value)
    assert "tokenizer_path" in str(info.value) and "init-checkpoint" in str(info.value)


@pytest.mark.parametrize("content", [b"this is not a sentencepiece model", b""])
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        Tokenizer(path)
    assert str(path) in str(info.value) and "tokenizer_path" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_corrupt_bytes() -> None:
    with pytest.raises(CheckpointError, match="model_proto bytes"):
        Tokenizer.from_bytes(b"\xff\xfe garbage")


def test_lone_surrogate_is_a_prompt_error(tok: Tokenizer) -> None:
    with pytest.raises(PromptError, match="UTF-8.*position 2") as info:
        tok.encode("ab\udcffcd", bos=True, eos=False)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [b"bytes", ["a"], None, 3])
def test_encode_rejects_non_str(tok: Tokenizer, value: object) -> None:
    with pytest.raises(TypeError, match=type(value).__name__):
        tok.encode(value, bos=False, eos=False)  # type: ignore[arg-type]


def test_decode_out_of_range(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"\[512\].*512 pieces"):
        tok.decode([5, 512])


# ------------------------------------------------------------------ streaming decode


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """What an IncrementalDecoder shows for ``ids``: one piece per id, then flush()."""
    decoder = IncrementalDecoder(tok)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


def byte_ids(sp: SentencePieceProcessor, data: bytes) -> list[int]:
    return [sp.piece_to_id(f"<0x{b:02X}>") for b in data]


def held_back_ok(sp: SentencePieceProcessor, ids: list[int], held: str) -> bool:
    """Whether ``held`` (decoded but not shown yet) may be held back after ``ids``: only
    U+FFFD for trailing byte pieces that some continuation would make one character.
    Checked against Python's own UTF-8 decoder, not the decoder's lead-byte table."""
    if not held:
        return True
    tail = ids[len(ids) - len(held) :]
    if set(held) != {"\ufffd"} or len(tail) > 3 or not all(sp.is_byte(i) for i in tail):
        return False
    return completable(bytes(int(sp.id_to_piece(i)[1:-1], 16) for i in tail))


def check_stream(tok: Tokenizer, sp: SentencePieceProcessor, ids: list[int]) -> list[str]:
    pieces = stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == full, ids
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces), ids
    shown = ""
    for n, piece in enumerate(pieces[:-1], 1):
        shown += piece
        so_far = tok.decode(ids[:n])
        # Shown as soon as complete: all that is held back is an unfinished character.
        assert so_far.startswith(shown), (ids[:n], shown, so_far)
        assert held_back_ok(sp, ids[:n], so_far[len(shown) :]), (ids[:n], shown, so_far)
    return pieces


STREAM_TEXTS = [
    "The quick brown fox jumps over the lazy dog. Model-parallel inference, on Ray!",
    "你好，世界！🦙🔥 and 日本語のテキスト, 𓀀 ∮ E⋅da = Q, émigré naïve",  # byte fallback
    "  two  spaces,\ta tab,\n\nnew lines\r\n   and trailing   \n",
    " leading space",
    "",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("bos, eos", [(False, False), (True, False), (True, True)])
def test_stream_matches_decode(
    tok: Tokenizer, sp: SentencePieceProcessor, text: str, bos: bool, eos: bool
) -> None:
    ids = tok.encode(text, bos=bos, eos=eos)
    pieces = check_stream(tok, sp, ids)
    assert "".join(pieces) == text
    if len(text) > 20:
        assert sum(1 for p in pieces if p) > len(ids) // 2  # really piece by piece


def test_byte_fallback_text_goes_through_byte_pieces(
    tok: Tokenizer, sp: SentencePieceProcessor
) -> None:
    ids = tok.encode(STREAM_TEXTS[1], bos=False, eos=False)
    assert sum(map(sp.is_byte, ids)) >= 12  # else the test above proves less than it claims


def test_character_shown_when_its_last_byte_arrives(
    tok: Tokenizer, sp: SentencePieceProcessor
) -> None:
    assert stream(tok, byte_ids(sp, "你".encode())) == ["", "", "你", ""]
    assert stream(tok, byte_ids(sp, "𓀀".encode())) == ["", "", "", "𓀀", ""]
    ids = tok.encode("a", bos=False, eos=False) + byte_ids(sp, "é∮".encode())
    assert stream(tok, ids) == ["a", "", "é", "", "", "∮", ""]


def test_invalid_bytes_are_shown_at_once(tok: Tokenizer, sp: SentencePieceProcessor) -> None:
    # A lone continuation byte, or a lead whose next byte cannot continue it, is U+FFFD
    # whatever follows: nothing to wait for.
    assert stream(tok, byte_ids(sp, b"\x80")) == ["\ufffd", ""]
    assert stream(tok, byte_ids(sp, b"\xe4A")) == ["", "\ufffdA", ""]
    assert stream(tok, byte_ids(sp, b"\xed\xa0")) == ["", "\ufffd\ufffd", ""]  # a surrogate
    # F1 AC starts a 4-byte character until DA, itself the start of a 2-byte one, arrives.
    assert stream(tok, byte_ids(sp, b"\xf1\xac\xda")) == ["", "", "\ufffd\ufffd", "\ufffd"]


def test_flush_shows_an_unfinished_character(tok: Tokenizer, sp: SentencePieceProcessor) -> None:
    ids = tok.encode("ok", bos=False, eos=False) + byte_ids(sp, b"\xe4\xbd")
    pieces = check_stream(tok, sp, ids)
    assert pieces[-3:] == ["", "", "\ufffd\ufffd"]
    ends = [sp.piece_to_id("</s>")]  # a control piece also ends the byte run
    assert check_stream(tok, sp, ids + ends)[-3:] == ["", "\ufffd\ufffd", ""]


def test_leading_space_as_decode_has_it(tok: Tokenizer, sp: SentencePieceProcessor) -> None:
    the, is_, space = (sp.piece_to_id(p) for p in ("▁the", "▁is", "▁"))
    bos, eos = tok.bos_id, tok.eos_id
    # decode drops the leading space of the first piece that shows text, and only that one.
    assert check_stream(tok, sp, [the, is_]) == ["the", " is", ""]
    assert check_stream(tok, sp, [bos, eos, bos, is_]) == ["", "", "", "is", ""]
    assert check_stream(tok, sp, [space, is_]) == ["", " is", ""]
    # A window that started at </s> would drop this space too: decoding [</s>, ▁is] alone
    # gives "is". The decoder's context is the last piece with text, "the".
    assert tok.decode([eos, is_]) == "is"
    assert check_stream(tok, sp, [the, eos, is_]) == ["the", "", " is", ""]
    assert check_stream(tok, sp, [the, eos, eos, eos, is_, eos, is_]) == [
        "the", "", "", "", " is", "", " is", "",
    ]  # fmt: skip


def test_random_ids(tok: Tokenizer, sp: SentencePieceProcessor) -> None:
    """Any sequence, however unlikely from a model: the whole vocabulary, and pools that
    make byte runs, control pieces and space pieces common."""
    vocab = range(tok.n_words)
    pools = [
        list(vocab),
        [0, tok.bos_id, tok.eos_id],  # <unk> shows " ⁇ "; <s> and </s> show nothing
        [i for i in vocab if sp.is_byte(i)],
        [i for i in vocab if sp.is_byte(i) and int(sp.id_to_piece(i)[1:-1], 16) >= 0x80],
        [i for i in vocab if sp.id_to_piece(i).startswith("▁")],
    ]
    rng = random.Random(0)
    for n in range(600):
        length = rng.randint(0, 40)
        if n % 3 == 0:
            ids = [rng.randrange(tok.n_words) for _ in range(length)]
        else:
            ids = [rng.choice(rng.choice(pools)) for _ in range(length)]
        check_stream(tok, sp, ids)


def test_window_stays_small(
    tok: Tokenizer, sp: SentencePieceProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    spied = Tokenizer.from_bytes(tok.model_proto)
    lengths: list[int] = []

    def decode(ids: list[int]) -> str:
        lengths.append(len(ids))
        return tok.decode(ids)

    monkeypatch.setattr(spied, "decode", decode)
    rng = random.Random(1)
    ids = [rng.randrange(tok.n_words) for _ in range(3000)]
    ids += [tok.eos_id] * 100 + byte_ids(sp, "你好".encode() * 50)
    decoder = IncrementalDecoder(spied)
    text = "".join(decoder.add(i) for i in ids) + decoder.flush()
    assert text == tok.decode(ids)
    assert max(lengths) <= 12


def test_decoder_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    decoder = IncrementalDecoder(tok)
    for bad in (512, -1):
        with pytest.raises(ValueError, match=rf"\[{bad}\].*512 pieces"):
            decoder.add(bad)


def test_tokenizer_module_does_not_import_torch() -> None:
    code = "import sys, mpllama.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------- chat template


def test_dialog_with_system_prompt(tok: Tokenizer) -> None:
    dialog = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello\n"},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks"},
    ]
    expected = (
        tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello ", bos=True, eos=True)
        + tok.encode("[INST] What is 2+2? [/INST] 4 ", bos=True, eos=True)
        + tok.encode("[INST] Thanks [/INST]", bos=True, eos=False)
    )
    assert encode_dialog(tok, dialog) == expected
    assert expected.count(tok.bos_id) == 3 and expected.count(tok.eos_id) == 2
    assert expected[-1] != tok.eos_id


def test_dialog_without_system_prompt(tok: Tokenizer) -> None:
    dialog = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "你好 🦙"},
    ]
    expected = tok.encode("[INST] Hi [/INST] Hello ", bos=True, eos=True) + tok.encode(
        "[INST] 你好 🦙 [/INST]", bos=True, eos=False
    )
    assert encode_dialog(tok, dialog) == expected
    single = [{"role": "user", "content": " one turn "}]
    assert encode_dialog(tok, single) == tok.encode("[INST] one turn [/INST]", bos=True, eos=False)


def test_system_prompt_with_single_user_turn(tok: Tokenizer) -> None:
    dialog = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = tok.encode("[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]", bos=True, eos=False)
    assert encode_dialog(tok, dialog) == expected


SYS = {"role": "system", "content": "s"}
USER = {"role": "user", "content": "u"}
BOT = {"role": "assistant", "content": "a"}

BAD_DIALOGS = [
    ([], "empty", None),
    ("not a list", "list of messages", None),
    ([USER, "hi", USER], "expected a dict", 1),
    ([USER, BOT, {"role": "user"}], "expected a dict", 2),
    ([{"role": "user", "content": 7}], "expected a dict", 0),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'", 0),
    ([USER, SYS, USER], "system message may only be the first", 1),
    ([SYS, SYS, USER], "system message may only be the first", 1),
    ([USER, USER], "expected role 'assistant', got 'user'", 1),
    ([SYS, BOT, USER], "expected role 'user', got 'assistant'", 1),
    ([BOT, USER], "expected role 'user', got 'assistant'", 0),
    ([USER, BOT], "last message is from the assistant", 1),
    ([SYS], "last message is from the system", 0),
]


@pytest.mark.parametrize("dialog, reason, index", BAD_DIALOGS)
def test_invalid_dialogs(tok: Tokenizer, dialog: list, reason: str, index: int | None) -> None:
    with pytest.raises(PromptError, match=reason) as info:
        check_dialog(dialog)
    if index is not None:
        assert f"message {index}" in str(info.value)
    with pytest.raises(PromptError, match=reason):
        encode_dialog(tok, dialog)


@pytest.mark.parametrize("tag", SPECIAL_TAGS)
@pytest.mark.parametrize("where", [0, 1, 2])
def test_special_tags_are_rejected(tag: str, where: int) -> None:
    dialog = [dict(SYS), dict(USER), dict(BOT), dict(USER)]
    dialog[where + 1]["content"] = f"please {tag} ignore"
    with pytest.raises(PromptError) as info:
        check_dialog(dialog)
    text = str(info.value)
    assert f"message {where + 1}" in text and repr(tag) in text and "reserved" in text


def test_system_message_tags_are_rejected() -> None:
    with pytest.raises(PromptError, match="message 0 contains '<</SYS>>'"):
        check_dialog([{"role": "system", "content": "x <</SYS>> y"}, USER])
