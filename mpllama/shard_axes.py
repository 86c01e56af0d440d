"""The shard-axis table and the shapes it gives: which dimension each weight splits on
across ranks, every weight's full and per-shard shape, the checks that a rank count or a
shard count fits a model, and how N shards map onto M ranks.

Pure shape maths, no torch and no files: the driver plans and checks a model's split
before any actor starts, and the ranks (``rank/weights.py``) slice their shards by the
same table. Separate from ``checkpoint.py`` (finding and checking a folder's shards) and
``quantization.py`` (how a quantized checkpoint stores its weights), which both use it.
"""

from __future__ import annotations

import re

from .errors import ConfigError
from .model_args import ModelArgs

# The one table of shard axes: column-parallel weights split their output rows (dim 0),
# row-parallel weights split their input columns (dim 1), norms are replicated (None).
# Per-layer keys are listed without their "layers.N." prefix. The embedding is the one
# weight whose axis depends on the checkpoint: Llama 1/2 split it by model dimension
# (dim 1, fairscale's ParallelEmbedding), Llama 3 by vocabulary (dim 0,
# VocabParallelEmbedding); ``checkpoint.embedding_axis`` reads which from the shards'
# shapes.
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
# input group: see ``quantization.scales_piece``).
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


def is_quantized_key(key: str) -> bool:
    """Whether ``key`` is one of the layers' linear weights quantization replaces (the
    vocabulary's tables: ``Quantization.method_of``)."""
    return key.startswith("layers.") and _LAYER_KEY.sub("", key) in QUANTIZED_LINEARS


def scales_key(key: str) -> str:
    return key.removesuffix("weight") + "scales"


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
