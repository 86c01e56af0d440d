"""Tokenizer, tiny-tokenizer training and the Llama 2 chat template."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from sentencepiece import SentencePieceProcessor

from mpllama.errors import CheckpointError, PromptError
from mpllama.tokenizer import (
    SPECIAL_TAGS,
    Tokenizer,
    check_dialog,
    encode_dialog,
    encode_dialogs,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "nested" / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(model_path: Path) -> Tokenizer:
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def sp(model_path: Path) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(model_path))


# -------------------------------------------------------------------------- training


def test_training_is_deterministic(model_path: Path, tmp_path: Path) -> None:
    again = train_tokenizer(tmp_path / "again.model")
    assert again == tmp_path / "again.model"
    assert again.read_bytes() == model_path.read_bytes()


def test_llama_ids_and_settings(tok: Tokenizer, sp: SentencePieceProcessor) -> None:
    assert tok.n_words == 512 == sp.vocab_size()
    assert (sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert sp.id_to_piece(1) == "<s>" and sp.id_to_piece(2) == "</s>"
    assert sp.is_byte(3) and sp.id_to_piece(3) == "<0x00>"  # byte fallback pieces


def test_train_rejects_small_vocab_and_empty_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=300 is too small.*at least \d+"):
        train_tokenizer(tmp_path / "a.model", vocab_size=300)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(tmp_path / "b.model", vocab_size=258, text="abc\n")
    with pytest.raises(ValueError, match="no non-blank line"):
        train_tokenizer(tmp_path / "c.model", text=" \n\n")
    with pytest.raises(ValueError, match="could not train a 5000-piece"):
        train_tokenizer(tmp_path / "d.model", vocab_size=5000, text="tiny text\n")
    assert not list(tmp_path.iterdir())


def test_train_on_given_text(tmp_path: Path) -> None:
    text = "the quick brown fox jumps over the lazy dog\n" * 5
    path = train_tokenizer(tmp_path / "fox.model", vocab_size=300, text=text)
    small = Tokenizer(path)
    assert small.n_words == 300
    ids = small.encode("the fox", bos=False, eos=False)
    assert small.decode(ids) == "the fox"
    # Merges were learnt from this text: "the" takes fewer pieces than its letters.
    assert len(small.encode("the", bos=False, eos=False)) < 3


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


def test_corpus_characters_have_pieces(tok: Tokenizer, sp: SentencePieceProcessor) -> None:
    for text in ("你好，世界", "🦙🔥"):
        pieces = [sp.id_to_piece(i) for i in tok.encode(text, bos=False, eos=False)]
        assert pieces == ["▁", *text]
    unseen = tok.encode("𓀀", bos=False, eos=False)
    assert [sp.id_to_piece(i) for i in unseen] == ["▁", "<0xF0>", "<0x93>", "<0x80>", "<0x80>"]


def test_digits_are_split(tok: Tokenizer, sp: SentencePieceProcessor, tmp_path: Path) -> None:
    pieces = [sp.id_to_piece(i) for i in tok.encode("x 1234567890", bos=False, eos=False)]
    assert pieces[-10:] == list("1234567890")
    # Digit pairs are the commonest pairs here: without split_digits they would merge first.
    text = "1999 2024 1999 2024 the end\n" * 50
    path = train_tokenizer(tmp_path / "num.model", vocab_size=259 + 11 + 5, text=text)
    numbers = SentencePieceProcessor(model_file=str(path))
    pieces = [numbers.id_to_piece(i) for i in range(275) if not numbers.is_byte(i)]
    assert "▁end" in pieces  # merges did happen, just not between digits
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]


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


def test_encode_dialogs_isolates_bad_dialogs(tok: Tokenizer) -> None:
    good = [USER]
    bad = [{"role": "user", "content": "[INST] sneaky"}]
    surrogate = [{"role": "user", "content": "\udcff"}]
    results = encode_dialogs(tok, [good, bad, [SYS, USER], surrogate])
    assert results[0] == encode_dialog(tok, good)
    assert isinstance(results[1], PromptError) and "'[INST]'" in str(results[1])
    assert results[2] == encode_dialog(tok, [SYS, USER])
    assert isinstance(results[3], PromptError) and "UTF-8" in str(results[3])
