"""Meta-format checkpoints: finding shards, params.json, the shard-axis table, resharding
N shards onto M ranks, strict key/shape checks, and the shard writer.

A checkpoint is untrusted input: every shard is read with ``weights_only=True`` (a pickle
that would run code is refused) and memory-mapped, so a rank touches only what it uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from .config import ModelArgs
from .errors import CheckpointError, ConfigError
from .tokenizer import Tokenizer

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
# Keys Meta's files carry that the model does not use (rope.freqs is recomputed).
IGNORED_KEYS = frozenset({"rope.freqs"})

# The one table of shard axes: column-parallel weights split their output rows (dim 0),
# row-parallel weights and the embedding split their input columns (dim 1), norms are
# replicated (None). Per-layer keys are listed without their "layers.N." prefix.
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


def shard_axis(key: str) -> int | None:
    """The dimension ``key`` is split on across ranks, or None when it is replicated."""
    try:
        return SHARD_AXES[_LAYER_KEY.sub("", key)]
    except KeyError:
        raise KeyError(f"{key!r} is not a LLaMA weight") from None


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


def shard_shapes(args: ModelArgs, parts: int) -> dict[str, tuple[int, ...]]:
    """Each weight's shape in one of ``parts`` equal shards."""
    out = {}
    for key, shape in full_shapes(args).items():
        axis = shard_axis(key)
        if axis is not None:
            shape = shape[:axis] + (shape[axis] // parts,) + shape[axis + 1 :]
        out[key] = shape
    return out


def check_model_parallel(args: ModelArgs, size: int) -> None:
    """Raise ConfigError unless ``size`` ranks can split every sharded dimension evenly."""
    if size < 1:
        raise ConfigError(f"model_parallel_size={size}: it must be >= 1")
    dims = {
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "FFN width": args.ffn_dim,
        "dim": args.dim,
    }
    if args.vocab_size > 0:
        dims["vocab_size"] = args.vocab_size
    bad = [f"{name}={value}" for name, value in dims.items() if value % size]
    if bad:
        fits = [n for n in range(1, args.n_heads + 1) if all(v % n == 0 for v in dims.values())]
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


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard, memory-mapped, refusing anything but tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"shard {path} does not exist") from None
    except Exception as exc:  # torch raises several types for corrupt, truncated or unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects other than tensors, refused for safety"
        raise CheckpointError(
            f"cannot read shard {path}: {reason}. Is the file truncated, "
            "corrupt or not a PyTorch state dict?"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state dict (got {type(state).__name__})")
    return {k: v for k, v in state.items() if k not in IGNORED_KEYS}


def check_state(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str
) -> None:
    """Strict: a missing, unexpected or mis-shaped key is an error listing the keys."""
    problems = []
    for label, keys in (
        ("missing", [k for k in expected if k not in state]),
        ("unexpected", [k for k in state if k not in expected]),
    ):
        if keys:
            problems.append(f"{len(keys)} {label} key(s): {_few(keys)}")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state
        and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != expected[k])
    ]
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {_few(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match params.json: " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def load_rank_state(
    shards: list[Path], args: ModelArgs, rank: int, world: int
) -> dict[str, torch.Tensor]:
    """The weights rank ``rank`` of ``world`` needs, read from its shard(s) only.

    Slices and concatenations are copied into fresh tensors of this rank's size; when
    shards and ranks match one to one, the memory-mapped tensors are used directly.
    """
    files, piece, pieces = shard_plan(len(shards), world)[rank]
    per_file = shard_shapes(args, len(shards))
    loaded = []
    for i in files:
        state = load_shard(shards[i])
        check_state(state, per_file, str(shards[i]))
        loaded.append(state)
    if len(loaded) == 1 and pieces == 1:
        return loaded[0]
    out = {}
    for key in per_file:
        axis = shard_axis(key)
        if axis is None:
            first = loaded[0][key]
            if any(not torch.equal(first, other[key]) for other in loaded[1:]):
                raise CheckpointError(
                    f"replicated weight {key} differs between shards "
                    f"{[shards[i].name for i in files]}"
                )
            out[key] = first.clone() if pieces > 1 else first
        elif len(loaded) > 1:
            out[key] = torch.cat([s[key] for s in loaded], dim=axis)
        else:
            out[key] = loaded[0][key].chunk(pieces, dim=axis)[piece].clone()
    return out


def inspect(
    checkpoint_dir: str, tokenizer_path: str | None
) -> tuple[Tokenizer, ModelArgs, list[Path]]:
    """What the driver reads before any actor starts: the tokenizer, the model's
    arguments (vocabulary resolved against the tokenizer) and the shard files."""
    shards = find_shards(checkpoint_dir)
    args = read_params(checkpoint_dir)
    tokenizer = Tokenizer(find_tokenizer(checkpoint_dir, tokenizer_path))
    args = resolve_vocab(args, tokenizer.n_words, str(Path(checkpoint_dir) / "params.json"))
    return tokenizer, args, shards


def check_shards(shards: list[Path], args: ModelArgs) -> None:
    """Every shard's keys and shapes, read on the driver before any actor starts.

    Shards are memory-mapped, so this reads the pickled index of each file, not the
    weights: milliseconds even for a 70B checkpoint. A truncated file, one that would
    run code, or one that does not match params.json fails here, with the same
    CheckpointError the rank would raise.
    """
    expected = shard_shapes(args, len(shards))
    for path in shards:
        state = load_shard(path)
        try:
            check_state(state, expected, str(path))
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}. The shards were written for another model or are damaged: "
                "re-download or re-convert the checkpoint (mpllama convert / reshard)"
            ) from None
        del state


# ------------------------------------------------------------------------ writing


def split_state(state: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Cut a full state dict into ``parts`` Meta shards along the shard-axis table."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for key, value in state.items():
        axis = shard_axis(key)
        pieces = [value] * parts if axis is None else list(value.chunk(parts, dim=axis))
        for shard, piece in zip(shards, pieces, strict=True):
            shard[key] = piece.clone()
    return shards


def write_checkpoint(
    out_dir: str | Path, args: ModelArgs, state: dict[str, torch.Tensor], parts: int
) -> list[Path]:
    """Write ``state`` (full size) as ``parts`` consolidated.NN.pth shards + params.json."""
    check_model_parallel(args, parts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("consolidated.*.pth"):
        stale.unlink()
    paths = []
    for i, shard in enumerate(split_state(state, parts)):
        path = out / f"consolidated.{i:02d}.pth"
        torch.save(shard, path)
        paths.append(path)
    (out / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")
    return paths
