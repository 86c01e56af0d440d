"""Meta-format checkpoints without their tensors: finding shards, params.json and the
tokenizer, which axis the shards split the embedding on, and the strict key/shape checks
of each shard against the model.

No torch here: the driver checks a checkpoint before any actor starts by reading each
shard's pickled index (names and shapes), never its weights. The shapes it checks against
are ``shard_axes.py``'s (and ``quantization.py``'s for a quantized checkpoint). Reading and
writing the tensors themselves is ``weights.py``'s, on the ranks and in the converters.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

from .errors import CheckpointError, ConfigError
from .model_args import LLAMA3_VOCAB_SIZE, ModelArgs
from .quantization import (
    QUANTIZATION_KEY,
    quantized_shapes,
    read_quantization,
)
from .shard_axes import EMBEDDING, scales_key, shard_shapes
from .shard_index import index_shapes
from .tokenizer import Tokenizer, load_tokenizer

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
# Keys Meta's files carry that the model does not use (rope.freqs is recomputed).
IGNORED_KEYS = frozenset({"rope.freqs"})


# ------------------------------------------------------------------------ reading


def find_shards(checkpoint_dir: str | Path) -> list[Path]:
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist; pass the folder holding "
            "consolidated.NN.pth and params.json (or make one: mpllama init-checkpoint DIR)"
        )
    found = {}
    for path in folder.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise CheckpointError(
            f"{folder} holds no consolidated.NN.pth shards; point checkpoint_dir at the "
            "folder with Meta's shards (`mpllama convert SRC OUT --to meta` turns a Hugging "
            "Face folder into one)"
        )
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise CheckpointError(
            f"{folder}: shard(s) {[f'consolidated.{i:02d}.pth' for i in missing]} missing; "
            f"found {len(found)} of {max(found) + 1}"
        )
    scales = sorted(folder.glob("fp8_scales_*.pt"))
    if scales:
        raise CheckpointError(
            f"{folder} is a Meta FP8 quantized checkpoint ({scales[0].name} beside the shards: "
            "its feed-forward weights are float8 with per-row scales), which mpllama does not "
            "support; running it as a plain model would give garbage. Use the release's bf16 "
            "checkpoint instead."
        )
    return [found[i] for i in sorted(found)]


def read_params(checkpoint_dir: str | Path) -> ModelArgs:
    path = Path(checkpoint_dir) / "params.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: a Meta checkpoint folder holds params.json "
            "beside its consolidated.NN.pth shards"
        )
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); restore it from the original download"
        ) from None
    if isinstance(params, dict):
        params.pop(QUANTIZATION_KEY, None)  # mpllama's own: read_quantization reads it
    try:
        return ModelArgs.from_params(params, str(path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def find_tokenizer(checkpoint_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """``tokenizer_path`` if given, else tokenizer.model in the folder or one folder up."""
    if tokenizer_path is not None:
        candidates = [Path(tokenizer_path)]
    else:
        folder = Path(checkpoint_dir)
        candidates = [folder / "tokenizer.model", folder.parent / "tokenizer.model"]
    for path in candidates:
        if path.is_file():
            return path
    raise CheckpointError(
        f"no tokenizer found (looked for {', '.join(map(str, candidates))}); pass "
        "tokenizer_path= (YAML: model.tokenizer_path)"
    )


def resolve_vocab(args: ModelArgs, tokenizer_vocab: int, source: str = "params.json") -> ModelArgs:
    """Take the tokenizer's vocabulary when params.json says -1; otherwise they must agree."""
    if args.vocab_size == -1:
        return replace(args, vocab_size=tokenizer_vocab)
    if args.vocab_size != tokenizer_vocab:
        raise CheckpointError(
            f"{source} has vocab_size={args.vocab_size} but the tokenizer has "
            f"{tokenizer_vocab} pieces: the tokenizer does not belong to this checkpoint; "
            "pass the tokenizer.model that came with it (tokenizer_path=...)"
        )
    return args


# ------------------------------------------------------------------------ checking

# A weight as the checks see it: its shape, or None where the shard holds something that
# is not a tensor.
Shapes = dict[str, tuple[int, ...] | None]


def check_state(shapes: Shapes, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Strict: a missing, unexpected or mis-shaped key is an error listing the keys."""
    problems = []
    for label, keys in (
        ("missing", [k for k in expected if k not in shapes]),
        ("unexpected", [k for k in shapes if k not in expected]),
    ):
        if keys:
            problems.append(f"{len(keys)} {label} key(s): {_few(keys)}")
    wrong = [
        f"{k} {'(not a tensor)' if shapes[k] is None else shapes[k]} != {expected[k]}"
        for k in expected
        if k in shapes and shapes[k] != expected[k]
    ]
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {_few(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match params.json: " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def read_shapes(path: Path) -> Shapes:
    """The weights a shard holds and their shapes, from its pickled index alone
    (``shard_index``): milliseconds even for a 70B shard, and no torch. A file that is not
    a plain state dict of tensors (truncated, corrupt, legacy format, or carrying Python
    objects) is read by ``weights.load_shard`` instead, which raises the rank's own
    CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"shard {path} does not exist")
    shapes = index_shapes(path)
    if shapes is None:
        from .rank.weights import load_shard, tensor_shapes  # torch, on this rare path only

        return tensor_shapes(load_shard(path))
    return {k: shape for k, shape in shapes.items() if k not in IGNORED_KEYS}


def count_values(shapes: Shapes) -> int:
    return sum(math.prod(shape) for shape in shapes.values() if shape is not None)


def inspect(
    checkpoint_dir: str, tokenizer_path: str | None, rope_scale_factor: float | None = None
) -> tuple[Tokenizer, ModelArgs, list[Path]]:
    """What the driver reads before any actor starts: the tokenizer, the model's
    arguments (vocabulary resolved against the tokenizer; ``rope_scale_factor``, the
    setting model.rope_scale_factor, overriding Meta's rule when given) and the shards."""
    shards = find_shards(checkpoint_dir)
    args = read_params(checkpoint_dir)
    if rope_scale_factor is not None:
        args = replace(args, rope_scale_factor=rope_scale_factor)
    tokenizer = load_tokenizer(find_tokenizer(checkpoint_dir, tokenizer_path))
    args = resolve_vocab(args, tokenizer.n_words, str(Path(checkpoint_dir) / "params.json"))
    return tokenizer, args, shards


def embedding_axis(shapes: Shapes, args: ModelArgs, parts: int) -> int:
    """The axis a checkpoint of ``parts`` shards splits the embedding on, from one
    shard's shapes: 0 (vocabulary parallel, Llama 3) or 1 (model dimension, Llama 1/2).
    One shard holds the whole table, which either reading fits: 1 is taken. A shard
    holding full-width rows is read as split by vocabulary (the strict check then names
    a wrong row count against that layout). An int4 embedding (its scales [rows, groups,
    2]: ``quantization``) stores two values a byte, so its full rows are dim / 2 wide."""
    shape = shapes.get(EMBEDDING)
    packed = len(shapes.get(scales_key(EMBEDDING), ())) == 3
    width = args.dim // 2 if packed else args.dim
    if parts > 1 and shape is not None and len(shape) == 2 and shape[1] == width:
        return 0
    return 1


def generation_axis(args: ModelArgs, tokenizer_kind: str | None) -> int:
    """The axis a generation's own shards split the embedding on, for writing shards
    when no source shows one: 0 (by vocabulary) for Llama 3, told by its tiktoken
    tokenizer or, without a tokenizer, by its vocabulary size or scaled RoPE; else 1."""
    if tokenizer_kind is not None:
        return 0 if tokenizer_kind == "tiktoken" else 1
    return 0 if args.vocab_size == LLAMA3_VOCAB_SIZE or args.use_scaled_rope else 1


def detect_embedding_axis(shards: list[Path], args: ModelArgs) -> int:
    """``embedding_axis`` of a checkpoint, read from its first shard's index (no torch)."""
    if len(shards) == 1:
        return 1
    return embedding_axis(read_shapes(shards[0]), args, len(shards))


def copy_tokenizer(tokenizer: Path, out: Path) -> None:
    """``tokenizer`` copied into ``out`` as tokenizer.model, unless it is that file already
    (a LLaMA 2 download keeps it one folder above the model's, which may be ``out``)."""
    target = out / "tokenizer.model"
    if not (target.exists() and target.samefile(tokenizer)):
        shutil.copyfile(tokenizer, target)


def vocab_from_shards(args: ModelArgs, shards: list[Path]) -> ModelArgs:
    """``args`` with the vocabulary the shards hold where params.json says -1 (Meta's
    LLaMA 1 and 2 downloads: the tokenizer's), read from the first shard's index: its
    embedding is [vocab, dim / N] split on the model dimension, [vocab / N, dim] split on
    the vocabulary (``embedding_axis``, an int4 table's rows half as wide)."""
    if args.vocab_size != -1:
        return args
    shapes = read_shapes(shards[0])
    shape = shapes.get(EMBEDDING)
    if shape is None or len(shape) != 2:
        raise CheckpointError(f"{shards[0]} has no {EMBEDDING} matrix")
    split = embedding_axis(shapes, args, len(shards)) == 0
    return replace(args, vocab_size=shape[0] * len(shards) if split else shape[0])


def check_shards(shards: list[Path], args: ModelArgs) -> int:
    """Every shard's keys and shapes, read on the driver before any actor starts; how
    many values the shards store.

    Only each file's pickled index is read (``read_shapes``), not the weights. A
    truncated file, one that would run code, or one that does not match params.json
    fails here, with the same CheckpointError the rank would raise. The embedding's
    axis is read from the first shard; every shard must then agree with it.
    """
    embed_axis: int | None = None
    values = 0
    quant = read_quantization(shards[0].parent)
    for path in shards:
        shapes = read_shapes(path)
        if embed_axis is None:
            embed_axis = embedding_axis(shapes, args, len(shards))
        try:
            expected = shard_shapes(args, len(shards), embed_axis)
            if quant is not None:
                expected = quantized_shapes(expected, quant, len(shards), args, embed_axis)
            check_state(shapes, expected, str(path))
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}. The shards were written for another model or are damaged: "
                "re-download or re-convert the checkpoint (mpllama convert / reshard)"
            ) from None
        values += count_values(shapes)
    return values
