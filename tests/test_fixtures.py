"""Random checkpoints and tiny-tokenizer training: presets, seeded weights, the trainer's
Llama settings and its corpus."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from mpllama.checkpoint import find_shards, read_params
from mpllama.errors import ConfigError
from mpllama.offline.fixtures import (
    PRESETS,
    init_checkpoint,
    init_llama3_checkpoint,
    random_state,
    train_tokenizer,
)
from mpllama.rank.weights import load_rank_state
from mpllama.tokenizer import Tokenizer

# ---------------------------------------------------------------------- checkpoints


def test_writer_matches_random_state(tiny_ckpts: dict[int, Path]) -> None:
    one = tiny_ckpts[1]
    args = read_params(one)
    assert args == replace(PRESETS["tiny"], vocab_size=512)
    written = load_rank_state(find_shards(one), args, 0, 1)
    expected = random_state(args, seed=0)
    assert list(written) == list(expected)
    for key, value in expected.items():
        assert torch.equal(written[key], value), key
    assert (one / "tokenizer.model").is_file()


def test_random_state_is_seeded() -> None:
    args = replace(PRESETS["tiny"], vocab_size=512)
    a, b = random_state(args, 0), random_state(args, 0)
    c = random_state(args, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["output.weight"], c["output.weight"])
    half = random_state(args, 0, torch.float16)
    assert half["output.weight"].dtype == torch.float16


def test_init_checkpoint_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*medium"):
        init_checkpoint(tmp_path, "huge")


def test_llama3_preset_is_written_as_meta_writes_llama3(tmp_path: Path) -> None:
    """Meta's real tokenizer.model beside shards that split the embedding by vocabulary
    and, past the KV-head count, hold a copy of one KV head each."""
    from mpllama.checkpoint import detect_embedding_axis, read_shapes
    from mpllama.offline.fixtures import llama3_tokenizer_path

    out = init_checkpoint(tmp_path / "l3", "llama3-tiny", parts=4)
    assert (out / "tokenizer.model").read_bytes() == llama3_tokenizer_path().read_bytes()
    args = read_params(out)
    assert args == PRESETS["llama3-tiny"]
    assert (args.vocab_size, args.kv_heads, args.use_scaled_rope, args.rope_theta) == (
        128256,
        2,
        True,
        500000.0,
    )
    shards = find_shards(out)
    assert detect_embedding_axis(shards, args) == 0
    shapes = read_shapes(shards[3])
    assert shapes["tok_embeddings.weight"] == (128256 // 4, 64)
    assert shapes["layers.0.attention.wk.weight"] == (args.head_dim, 64)  # one KV head
    written = load_rank_state(shards, args, 0, 1)
    expected = random_state(args, seed=0)
    assert all(torch.equal(written[k], v) for k, v in expected.items())
    with pytest.raises(ConfigError, match="vocab_size=128256"):
        init_llama3_checkpoint(tmp_path / "bad", replace(args, vocab_size=1000))


# ------------------------------------------------------------------------ tokenizer


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
