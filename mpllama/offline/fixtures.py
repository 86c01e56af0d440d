"""Random checkpoints and tokenizer training for tests and demos.

Nothing here reads a real checkpoint: the model presets, seeded random weights and a tiny
sentencepiece trainer let the test suite and ``mpllama init-checkpoint`` make a working
model folder with no download.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import logging
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from sentencepiece import SentencePieceTrainer

from ..checkpoint import resolve_vocab
from ..errors import ConfigError
from ..model_args import LLAMA3_VOCAB_SIZE, PRESETS, ModelArgs
from ..rank.weights import write_checkpoint
from ..shard_axes import full_shapes
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- checkpoints


def random_state(
    args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Seeded random full-size weights, scaled so a tiny model's logits are well spread
    (near-ties would make greedy tokens fragile between implementations)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in full_shapes(args).items():
        if len(shape) == 1:
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key == "tok_embeddings.weight":
            value = torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            if key == "output.weight":
                value *= 4.0
        out[key] = value.to(dtype)
    return out


def init_checkpoint(
    out_dir: str | Path,
    preset: str | ModelArgs = "tiny",
    parts: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 512,
) -> Path:
    """A seeded random checkpoint with its own freshly trained tokenizer.model; a preset
    with Llama 3's vocabulary (``llama3-tiny``) gets Meta's tokenizer and shards instead
    (see ``init_llama3_checkpoint``; ``vocab_size`` is then unused)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if preset.vocab_size == LLAMA3_VOCAB_SIZE:
        return init_llama3_checkpoint(out_dir, preset, parts, seed, dtype)
    out = Path(out_dir)
    tok_path = train_tokenizer(out / "tokenizer.model", vocab_size=vocab_size)
    args = resolve_vocab(preset, Tokenizer(tok_path).n_words)
    write_checkpoint(out, args, random_state(args, seed, dtype), parts)
    log.info("wrote %s: %d shard(s), %s", out, parts, args)
    return out


def init_llama3_checkpoint(
    out_dir: str | Path,
    args: ModelArgs | None = None,
    parts: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A seeded random Llama-3-shaped checkpoint (default: the ``llama3-tiny`` preset),
    sharded as Meta shards Llama 3 (the embedding by vocabulary; with more shards than KV
    heads, each shard a copy of one), beside a copy of Meta's real tokenizer.model.

    Needs the ``llama-models`` package (the test extra) for that file; mpllama itself
    never does."""
    args = PRESETS["llama3-tiny"] if args is None else args
    if args.vocab_size != LLAMA3_VOCAB_SIZE:
        raise ConfigError(
            f"a Llama 3 checkpoint has vocab_size={LLAMA3_VOCAB_SIZE} (its tokenizer's), "
            f"got {args.vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(llama3_tokenizer_path(), out / "tokenizer.model")
    write_checkpoint(out, args, random_state(args, seed, dtype), parts, embed_axis=0)
    log.info("wrote %s: %d shard(s), %s", out, parts, args)
    return out


def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer.model, as the ``llama-models`` package ships it."""
    try:
        from llama_models.llama3 import tokenizer as meta_tokenizer
    except ImportError:
        raise ConfigError(
            "Llama 3 fixtures copy Meta's tokenizer.model from the llama-models package, "
            "which is not installed: pip install 'mpllama[test]' (or llama-models)"
        ) from None
    return Path(meta_tokenizer.__file__).parent / "tokenizer.model"


# ------------------------------------------------------------------------ tokenizer

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
