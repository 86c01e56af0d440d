"""Quantized checkpoints (``mpllama quantize``, runtime.quantization) without their
tensors: the ``mpllama_quantization`` entry of params.json, the group sizes that fit a
split, and the shapes a quantized checkpoint's weights and scales take in each shard.

No torch here: the driver checks a quantized checkpoint's shards by these shapes
(``checkpoint.check_shards``) before any actor starts, and the ranks read and reshard it by
the same entry (``rank/weights.py``); quantizing and the kernels are ``rank/quant.py``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import AUTO_GROUP_SIZES, QUANT_GROUP_SIZES
from .errors import CheckpointError, ConfigError
from .model_args import ModelArgs
from .shard_axes import EMBEDDING, VOCAB_TABLES, is_quantized_key, scales_key, shard_axis

QUANTIZATION_KEY = "mpllama_quantization"  # params.json of a quantized checkpoint
QUANT_METHODS = ("int8", "int4")


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's (or a rank's) linear weights are quantized; see rank/quant.py.

    ``row_groups`` (int8): scale groups along the input of each row-parallel weight in
    the whole (unsharded) model, the number of shards it was quantized from, so each
    shard's scales stand on their own and resharding never re-quantizes.

    ``vocab``: the vocabulary's tables are quantized too. The output layer is int8, one
    scale per row, whatever ``method`` the layers take: int8 is what llama.cpp's q8_0
    keeps it in, and int4 logits would cost more quality than the bytes are worth.
    Checkpoints quantized before mpllama did so have no ``vocab`` entry: theirs stay in
    full precision.

    ``embedding``: the embedding's type, ``method``'s by default. int8 has one scale per
    row (and ``embed_groups`` along it: the shards it was quantized from if they split it
    by model dimension, else 1). int4 is group-wise as the layers' weights, as llama.cpp's
    q4_0 keeps its token embedding: it is looked up, never multiplied, and cost the demo
    model 0.4% of perplexity. A tied vocabulary's embedding stays int8
    (``quantize.for_checkpoint``), its rows read from the output layer. Entries written
    before mpllama had int4 embeddings have no ``embedding``: theirs is int8."""

    method: str
    group_size: int = 32  # int4: weights per scale and zero along the input
    row_groups: int = 1
    vocab: bool = True
    embed_groups: int = 1
    embedding: str = ""  # "": ``method``'s

    @property
    def int8_embedding(self) -> bool:
        """Whether the embedding is an int8 table (one scale per row and group)."""
        return self.vocab and self.embedding == "int8"

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
        if not self.embedding:
            object.__setattr__(self, "embedding", self.method)
        allowed = sorted({"int8", self.method})
        if self.embedding not in allowed:
            raise ConfigError(
                f"a {self.method} quantization's embedding is one of {allowed}, "
                f"got {self.embedding!r}"
            )

    def to_params(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": self.method}
        if self.method == "int4":
            entry["group_size"] = self.group_size
        else:
            entry["row_groups"] = self.row_groups
        if self.int8_embedding:
            entry["embed_groups"] = self.embed_groups
        if self.vocab:
            entry["embedding"] = self.embedding
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
        the output layer and ``embedding`` for the embedding (``vocab``), None for a tensor
        kept as it is."""
        if is_quantized_key(key):
            return self.method
        if not self.vocab or key not in VOCAB_TABLES:
            return None
        return self.embedding if key == EMBEDDING else "int8"


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
        # older entries: see ``vocab`` and ``embedding``
        return Quantization(**{"vocab": False, "embedding": "int8", **entry})
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(
            f"{path}: {QUANTIZATION_KEY} {entry!r} is not one mpllama wrote ({exc}); "
            "re-run mpllama quantize on the full-precision checkpoint"
        ) from None


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
    groups += [quant.embed_groups] if quant.int8_embedding else []
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
