"""Meta-format checkpoints without their tensors: finding shards, params.json, the
shard-axis table, resharding N shards onto M ranks, and the strict key/shape checks.

No torch here: the driver checks a checkpoint before any actor starts by reading each
shard's pickled index (names and shapes), never its weights. Reading and writing the
tensors themselves is ``weights.py``'s, on the ranks and in the converters.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import AUTO_GROUP_SIZES, QUANT_GROUP_SIZES
from .errors import CheckpointError, ConfigError
from .model_args import LLAMA3_VOCAB_SIZE, ModelArgs
from .shard_index import index_shapes
from .tokenizer import Tokenizer, load_tokenizer

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
# Keys Meta's files carry that the model does not use (rope.freqs is recomputed).
IGNORED_KEYS = frozenset({"rope.freqs"})

# The one table of shard axes: column-parallel weights split their output rows (dim 0),
# row-parallel weights split their input columns (dim 1), norms are replicated (None).
# Per-layer keys are listed without their "layers.N." prefix. The embedding is the one
# weight whose axis depends on the checkpoint: Llama 1/2 split it by model dimension
# (dim 1, fairscale's ParallelEmbedding), Llama 3 by vocabulary (dim 0,
# VocabParallelEmbedding); ``embedding_axis`` reads which from the shards' shapes.
SHARD_AXES: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
_LAYER_KEY = re.compile(r"^layers\.\d+\.")
# Quantized checkpoints (``mpllama quantize``): the linear weights that are quantized, and
# their scales, which split on their weight's axis (a row-parallel weight's scales by
# input group: see ``scales_piece``).
QUANTIZED_LINEARS = tuple(k for k in SHARD_AXES if k.startswith(("attention.w", "feed_forward.w")))
SCALE_AXES = {k.removesuffix("weight") + "scales": SHARD_AXES[k] for k in QUANTIZED_LINEARS}
EMBEDDING = "tok_embeddings.weight"
# The vocabulary's two tables, int8 per row in a quantized model (``Quantization.vocab``).
VOCAB_TABLES = (EMBEDDING, "output.weight")
SCALE_AXES["output.scales"] = 0
# Keys holding key/value heads: with more ranks (or shards) than KV heads, each rank holds
# a copy of one head instead of a slice of one (Meta's reshard_mp repeats them so).
_KV_KEY = re.compile(r"^layers\.\d+\.attention\.w[kv]\.(weight|scales)$")


def shard_axis(key: str, embed_axis: int = 1) -> int | None:
    """The dimension ``key`` is split on across ranks, or None when it is replicated;
    ``embed_axis`` is the embedding's (1: Llama 1/2 layout, 0: vocabulary parallel)."""
    if key in (EMBEDDING, scales_key(EMBEDDING)):
        return embed_axis
    if _LAYER_KEY.sub("", key) in SCALE_AXES:
        return SCALE_AXES[_LAYER_KEY.sub("", key)]
    try:
        return SHARD_AXES[_LAYER_KEY.sub("", key)]
    except KeyError:
        raise KeyError(f"{key!r} is not a LLaMA weight") from None


def is_kv_key(key: str) -> bool:
    return _KV_KEY.match(key) is not None


def kv_heads_of(part: int, parts: int, kv_heads: int) -> list[int]:
    """The KV heads part ``part`` of ``parts`` holds: a contiguous run of
    kv_heads / parts heads, or, with more parts than heads, one head repeated on
    parts / kv_heads consecutive parts (part p holds head p // (parts / kv_heads))."""
    if parts <= kv_heads:
        per = kv_heads // parts
        return list(range(part * per, (part + 1) * per))
    return [part // (parts // kv_heads)]


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight's unsharded shape, in state-dict order."""
    d, hd, f = args.dim, args.head_dim, args.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "attention.wq.weight": (args.n_heads * hd, d),
                p + "attention.wk.weight": (args.kv_heads * hd, d),
                p + "attention.wv.weight": (args.kv_heads * hd, d),
                p + "attention.wo.weight": (d, args.n_heads * hd),
                p + "feed_forward.w1.weight": (f, d),
                p + "feed_forward.w2.weight": (d, f),
                p + "feed_forward.w3.weight": (f, d),
                p + "attention_norm.weight": (d,),
                p + "ffn_norm.weight": (d,),
            }
        )
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def shard_shapes(args: ModelArgs, parts: int, embed_axis: int = 1) -> dict[str, tuple[int, ...]]:
    """Each weight's shape in one of ``parts`` equal shards (with more parts than KV
    heads, wk and wv hold one head each)."""
    kv_rows = len(kv_heads_of(0, parts, args.kv_heads)) * args.head_dim
    out = {}
    for key, shape in full_shapes(args).items():
        axis = shard_axis(key, embed_axis)
        if is_kv_key(key):
            shape = (kv_rows, shape[1])
        elif axis is not None:
            shape = shape[:axis] + (shape[axis] // parts,) + shape[axis + 1 :]
        out[key] = shape
    return out


def check_model_parallel(args: ModelArgs, size: int) -> None:
    """Raise ConfigError unless ``size`` ranks can split every sharded dimension evenly.

    KV heads may also be fewer than the ranks, when the ranks are a multiple of them:
    each rank then holds a copy of one KV head (405B's 8 KV heads on 16 ranks)."""
    if size < 1:
        raise ConfigError(f"model_parallel_size={size}: it must be >= 1")
    dims = {"n_heads": args.n_heads, "FFN width": args.ffn_dim, "dim": args.dim}
    if args.vocab_size > 0:
        dims["vocab_size"] = args.vocab_size

    def problems(n: int) -> list[str]:
        bad = [f"{name}={value}" for name, value in dims.items() if value % n]
        if args.kv_heads % n and n % args.kv_heads:
            bad.append(f"n_kv_heads={args.kv_heads} (nor is it a multiple of it)")
        return bad

    bad = problems(size)
    if bad:
        fits = [n for n in range(1, args.n_heads + 1) if not problems(n)]
        raise ConfigError(
            f"model_parallel_size={size} does not divide {', '.join(bad)}; "
            f"sizes that fit this model: {fits}"
        )


def shard_plan(n_shards: int, world: int) -> list[tuple[list[int], int, int]]:
    """For each rank: (shard files it reads, which piece of them, how many pieces).

    world = k * shards: rank r slices piece r % k of shard r // k.
    shards = k * world: rank r concatenates shards r*k .. r*k+k-1 whole.
    """
    if world % n_shards == 0:
        k = world // n_shards
        return [([r // k], r % k, k) for r in range(world)]
    if n_shards % world == 0:
        k = n_shards // world
        return [(list(range(r * k, (r + 1) * k)), 0, 1) for r in range(world)]
    raise ConfigError(
        f"cannot reshard a checkpoint of {n_shards} shard(s) onto {world} rank(s): one must "
        f"be a multiple of the other. Use model_parallel_size in "
        f"{sorted({d for d in range(1, 4 * n_shards + 1) if d % n_shards == 0 or n_shards % d == 0})[:8]}"
        f" or `mpllama reshard DIR --mp N OUT` first"
    )


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
    a wrong row count against that layout)."""
    shape = shapes.get(EMBEDDING)
    if parts > 1 and shape is not None and len(shape) == 2 and shape[1] == args.dim:
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


# ------------------------------------------------------------------ quantized checkpoints

QUANTIZATION_KEY = "mpllama_quantization"  # params.json of a quantized checkpoint
QUANT_METHODS = ("int8", "int4")


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's (or a rank's) linear weights are quantized; see rank/quant.py.

    ``row_groups`` (int8): scale groups along the input of each row-parallel weight in
    the whole (unsharded) model, the number of shards it was quantized from, so each
    shard's scales stand on their own and resharding never re-quantizes.

    ``vocab``: the embedding and the output layer are int8 too, one scale per row (and
    ``embed_groups`` along the embedding's rows: the shards it was quantized from if they
    split it by model dimension, else 1), whatever ``method`` the layers take: int8 is
    what llama.cpp's q8_0 keeps them in, and int4 logits would cost more quality than the
    bytes are worth. Checkpoints quantized before mpllama did so have no ``vocab`` entry:
    theirs stay in full precision."""

    method: str
    group_size: int = 32  # int4: weights per scale and zero along the input
    row_groups: int = 1
    vocab: bool = True
    embed_groups: int = 1

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ConfigError(
                f"quantization method must be one of {QUANT_METHODS}, got {self.method!r}"
            )
        if self.group_size not in QUANT_GROUP_SIZES:
            raise ConfigError(
                f"quantization group size must be one of {QUANT_GROUP_SIZES}, got {self.group_size}"
            )
        if self.row_groups < 1 or self.embed_groups < 1:
            raise ConfigError(
                "quantization row_groups and embed_groups must be >= 1, got "
                f"{self.row_groups} and {self.embed_groups}"
            )

    def to_params(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": self.method}
        if self.method == "int4":
            entry["group_size"] = self.group_size
        else:
            entry["row_groups"] = self.row_groups
        if self.vocab:
            entry["embed_groups"] = self.embed_groups
        return {**entry, "vocab": self.vocab}

    def scale_groups(self, key: str, parts: int, embed_axis: int) -> int:
        """How many int8 scales a row of int8 weight ``key`` has in each of ``parts``:
        weights split along their input (row-parallel, or an embedding split by model
        dimension) keep one per group they were quantized in, and a part cut finer than
        the groups holds its group's one; an embedding split by vocabulary holds whole
        rows, all their groups."""
        if key == EMBEDDING:
            return max(1, self.embed_groups // parts) if embed_axis == 1 else self.embed_groups
        if shard_axis(key, embed_axis) != 1:
            return 1
        return max(1, self.row_groups // parts)

    def split_as(self, n_shards: int, embed_axis: int) -> Quantization:
        """This quantization for ``n_shards`` shards splitting the embedding on
        ``embed_axis``, each quantized alone: its embedding's scale groups, one a shard
        where they split its rows by model dimension, else 1 (each holds whole rows)."""
        return replace(self, embed_groups=n_shards if embed_axis == 1 else 1)

    def method_of(self, key: str) -> str | None:
        """How ``key`` is quantized: ``method`` for the layers' linear weights, int8 for
        the vocabulary's tables (``vocab``), None for a tensor kept as it is."""
        if is_quantized_key(key):
            return self.method
        return "int8" if self.vocab and key in VOCAB_TABLES else None


def read_quantization(checkpoint_dir: str | Path) -> Quantization | None:
    """The ``mpllama_quantization`` entry of a checkpoint's params.json, or None."""
    path = Path(checkpoint_dir) / "params.json"
    try:
        entry = json.loads(path.read_text()).get(QUANTIZATION_KEY)
    except (OSError, ValueError, AttributeError):
        return None  # read_params reports a missing or broken params.json
    if entry is None:
        return None
    try:
        return Quantization(**{"vocab": False, **entry})  # older entries: see ``vocab``
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(
            f"{path}: {QUANTIZATION_KEY} {entry!r} is not one mpllama wrote ({exc}); "
            "re-run mpllama quantize on the full-precision checkpoint"
        ) from None


def is_quantized_key(key: str) -> bool:
    """Whether ``key`` is one of the layers' linear weights quantization replaces (the
    vocabulary's tables: ``Quantization.method_of``)."""
    return key.startswith("layers.") and _LAYER_KEY.sub("", key) in QUANTIZED_LINEARS


def scales_key(key: str) -> str:
    return key.removesuffix("weight") + "scales"


def _int4_inputs(args: ModelArgs, parts: int) -> dict[str, int]:
    """The inputs of the int4 weights of a model split over ``parts``, by name."""
    return {
        "dim": args.dim,
        "the FFN width per part": args.ffn_dim // parts,
        "the attention width per part": args.n_heads * args.head_dim // parts,
    }


def _int4_fits(args: ModelArgs, parts: int) -> list[int]:
    """The int4 group sizes that divide every int4 weight's input split over ``parts``."""
    inputs = _int4_inputs(args, parts).values()
    return [g for g in QUANT_GROUP_SIZES if all(v % g == 0 for v in inputs)]


def int4_group_size(args: ModelArgs, requested: int | str, *parts: int) -> int:
    """The int4 group size for ``requested`` (runtime.quant_group_size): itself, or for
    ``auto`` the largest of ``AUTO_GROUP_SIZES`` that divides every int4 weight's input
    split over each of ``parts`` (the shards quantized, the ranks that load them).
    ``check_quantization`` reports a size that fits no split."""
    if requested != "auto":
        return int(requested)
    fits = set.intersection(*(set(_int4_fits(args, n)) for n in parts))
    return next((g for g in AUTO_GROUP_SIZES if g in fits), AUTO_GROUP_SIZES[-1])


def check_quantization(args: ModelArgs, quant: Quantization, parts: int) -> None:
    """Raise ConfigError unless every quantized weight's input, as split over ``parts``
    ranks or shards, holds whole groups (int4) and whole scale groups (int8)."""
    if quant.method == "int4":
        inputs = _int4_inputs(args, parts)
        bad = [f"{name}={value}" for name, value in inputs.items() if value % quant.group_size]
        if bad:
            fits = _int4_fits(args, parts)
            fix = (
                f"group sizes that fit: {fits}"
                if fits
                else "no group size fits; use int8, or fewer parts (mpllama reshard)"
            )
            raise ConfigError(
                f"int4 group size {quant.group_size} does not divide {', '.join(bad)} "
                f"({parts} part(s)); {fix}"
            )
    groups = [quant.row_groups] if quant.method == "int8" else []
    groups += [quant.embed_groups] if quant.vocab else []
    if any(n % parts and parts % n for n in groups):
        raise ConfigError(
            f"the int8 scales of a checkpoint quantized from {max(groups)} shard(s) cannot "
            f"be split into {parts}: one must be a multiple of the other"
        )


def quantized_shapes(
    shapes: dict[str, tuple[int, ...]],
    quant: Quantization,
    parts: int,
    args: ModelArgs,
    embed_axis: int = 1,
) -> dict[str, tuple[int, ...]]:
    """``shard_shapes`` of a checkpoint in ``parts`` shards, as ``quant`` stores it:
    quantized weights (int4: two values a byte) and their scales after each weight."""
    check_quantization(args, quant, parts)
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        method = quant.method_of(key)
        if method is None:
            out[key] = shape
            continue
        rows, inputs = shape
        if method == "int8":
            groups = quant.scale_groups(key, parts, embed_axis)
            out[key], out[scales_key(key)] = shape, (rows, groups)
        else:
            out[key] = (rows, inputs // 2)
            out[scales_key(key)] = (rows, inputs // quant.group_size, 2)
    return out


def scales_piece(n: int, pieces: int, piece: int) -> tuple[int, int]:
    """(start, length) along the split axis of piece ``piece`` of ``pieces`` of a scales
    tensor holding ``n`` groups there: its share of the groups, or, with more pieces than
    groups, the one group the piece lies in."""
    if n % pieces == 0:
        return piece * (n // pieces), n // pieces
    if pieces % n:
        raise ConfigError(f"cannot split {n} scale group(s) into {pieces} pieces")
    return piece // (pieces // n), 1
