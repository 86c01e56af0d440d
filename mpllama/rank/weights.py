"""The tensors of Meta-format checkpoints: reading a rank's weights (resharding on the
fly) and writing shards.

A checkpoint is untrusted input: every shard is read with ``weights_only=True`` (a pickle
that would run code is refused) and memory-mapped, so a rank touches only what it uses.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import IGNORED_KEYS, Shapes, check_state, embedding_axis
from ..errors import CheckpointError
from ..model_args import ModelArgs
from ..quantization import QUANTIZATION_KEY, Quantization, quantized_shapes, scales_piece
from ..shard_axes import (
    check_model_parallel,
    is_kv_key,
    kv_heads_of,
    shard_axis,
    shard_plan,
    shard_shapes,
)

# ------------------------------------------------------------------------ reading


def load_shard(path: Path, quantized: bool = False) -> dict[str, torch.Tensor]:
    """One shard, memory-mapped, refusing anything but tensors (and, unless the
    checkpoint is mpllama's own ``quantized`` one, integer or float8 weights)."""
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
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and _quantized(value.dtype) and not quantized:
            # Meta's FP8 / int4 releases store quantized weights whose meaning needs
            # scales: cast to the model's dtype they would load without error, as garbage.
            raise CheckpointError(
                f"{path}: {key} is {str(value.dtype).removeprefix('torch.')}, a quantized "
                "weight mpllama cannot load as a plain one; use the release's bf16 checkpoint"
            )
    return {k: v for k, v in state.items() if k not in IGNORED_KEYS}


def _quantized(dtype: torch.dtype) -> bool:
    """Whether weights of ``dtype`` are quantized (float8, or int8/uint8 holding int8 or
    packed int4 values): a cast would give numbers without their scales."""
    return "float8" in str(dtype) or dtype in _QUANTIZED_INTS


_QUANTIZED_INTS = frozenset({torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.quint4x2})


def tensor_shapes(state: dict[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


def load_rank_state(
    shards: list[Path],
    args: ModelArgs,
    rank: int,
    world: int,
    stored: Quantization | None = None,
    quantize: Quantization | None = None,
) -> dict[str, torch.Tensor]:
    """The weights rank ``rank`` of ``world`` needs, read from its shard(s) only.

    ``stored``: the checkpoint is quantized so (``quantization.read_quantization``).
    ``quantize``: quantize each shard's weights as read (``quantize.quantize_state``; the
    embedding's scale groups are the shards' own, whatever ``quantize`` says),
    one at a time, before resharding: the rank gets what loading the checkpoint
    ``mpllama quantize`` makes of these shards would give it.

    The embedding keeps the checkpoint's axis (``checkpoint.detect_embedding_axis``). Slices and
    concatenations are copied into fresh tensors of this rank's size; when shards and
    ranks match one to one, the memory-mapped tensors are used directly. KV heads are
    repeated when the ranks outnumber them, and copies repeated on disk (more shards
    than KV heads, as 405B's 16 shards) are taken once.
    """
    files, piece, pieces = shard_plan(len(shards), world)[rank]
    loaded = [load_shard(shards[i], quantized=stored is not None) for i in files]
    embed_axis = embedding_axis(tensor_shapes(loaded[0]), args, len(shards))
    per_file = shard_shapes(args, len(shards), embed_axis)
    if stored is not None:
        per_file = quantized_shapes(per_file, stored, len(shards), args, embed_axis)
    for i, state in zip(files, loaded, strict=True):
        check_state(tensor_shapes(state), per_file, str(shards[i]))
    if quantize is not None:  # each shard quantizes its own slice of the embedding's rows
        from .quantize import for_checkpoint, quantize_state

        quantize = for_checkpoint(quantize.split_as(len(shards), embed_axis), loaded[0])
    quant = stored or quantize
    if quantize is not None:
        per_file = quantized_shapes(per_file, quantize, len(shards), args, embed_axis)
        loaded = [quantize_state(state, quantize) for state in loaded]
    if len(loaded) == 1 and pieces == 1:
        return loaded[0]
    out = {}
    for key in per_file:
        axis = shard_axis(key, embed_axis)
        if is_kv_key(key):
            out[key] = _kv_heads(
                key,
                [(i, s[key]) for i, s in zip(files, loaded, strict=True)],
                args,
                len(shards),
                rank,
                world,
                shards,
            )
        elif axis is None:
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
            out[key] = _piece(key, loaded[0][key], axis, pieces, piece).clone()
        weight = key.removesuffix("scales") + "weight"
        if quant is not None and key != weight and quant.method_of(weight) == "int8" and axis:
            # Shards cut finer than the scale groups each hold a copy of their group's
            # scales: take each group once (activations are quantized per group; an
            # embedding split by model dimension is looked up per group).
            groups = quant.scale_groups(weight, world, embed_axis)
            out[key] = out[key][:, :: out[key].shape[1] // groups].contiguous()
    return out


def _piece(key: str, value: torch.Tensor, axis: int, pieces: int, piece: int) -> torch.Tensor:
    """Piece ``piece`` of ``pieces`` of ``value`` along ``axis``; a quantized weight's
    scales may hold fewer groups there than the pieces (``quantization.scales_piece``)."""
    if not key.endswith(".scales"):
        return value.chunk(pieces, dim=axis)[piece]
    start, length = scales_piece(value.shape[axis], pieces, piece)
    return value.narrow(axis, start, length)


def _kv_heads(
    key: str,
    parts: list[tuple[int, torch.Tensor]],
    args: ModelArgs,
    n_shards: int,
    rank: int,
    world: int,
    shards: list[Path],
) -> torch.Tensor:
    """This rank's wk or wv rows, head by head, from the shards it reads: shard i holds
    ``kv_heads_of(i, n_shards)``, the rank needs ``kv_heads_of(rank, world)``."""
    hd = args.head_dim
    have: dict[int, torch.Tensor] = {}
    for i, value in parts:
        for j, head in enumerate(kv_heads_of(i, n_shards, args.kv_heads)):
            rows = value[j * hd : (j + 1) * hd]
            if head in have and not torch.equal(have[head], rows):
                raise CheckpointError(
                    f"{key}: KV head {head} is repeated across shards but its copies "
                    f"differ ({shards[i].name}); re-download or re-convert the checkpoint"
                )
            have.setdefault(head, rows)
    return torch.cat([have[h] for h in kv_heads_of(rank, world, args.kv_heads)])


# ------------------------------------------------------------------------ writing


def split_state(
    state: dict[str, torch.Tensor],
    parts: int,
    embed_axis: int = 1,
    kv_heads: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Cut a full state dict into ``parts`` Meta shards along the shard-axis table, the
    embedding on ``embed_axis`` (1: Llama 1/2, 0: Llama 3). With ``kv_heads`` fewer than
    ``parts``, each shard gets a copy of one KV head, as Meta ships 405B on 16 shards."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for key, value in state.items():
        axis = shard_axis(key, embed_axis)
        if kv_heads is not None and is_kv_key(key) and parts > kv_heads:
            heads = value.chunk(kv_heads, dim=0)
            pieces = [heads[kv_heads_of(p, parts, kv_heads)[0]] for p in range(parts)]
        elif axis is None:
            pieces = [value] * parts
        else:
            pieces = [_piece(key, value, axis, parts, p) for p in range(parts)]
        for shard, piece in zip(shards, pieces, strict=True):
            shard[key] = piece.clone()
    return shards


def write_checkpoint(
    out_dir: str | Path,
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    parts: int,
    embed_axis: int = 1,
    quant: Quantization | None = None,
) -> list[Path]:
    """Write ``state`` (full size) as ``parts`` consolidated.NN.pth shards + params.json,
    the embedding split on ``embed_axis`` (0 as Meta shards Llama 3); ``quant``: the
    state is quantized so (its int8 ``row_groups`` are read from the state itself)."""
    check_model_parallel(args, parts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("consolidated.*.pth"):
        stale.unlink()
    paths = []
    for i, shard in enumerate(split_state(state, parts, embed_axis, args.kv_heads)):
        path = out / f"consolidated.{i:02d}.pth"
        torch.save(shard, path)
        paths.append(path)
    params = args.to_params()
    if quant is not None:
        params[QUANTIZATION_KEY] = _written(quant, state).to_params()
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return paths


def _written(quant: Quantization, state: dict[str, torch.Tensor]) -> Quantization:
    """``quant`` with the scale groups of its int8 weights split along their input (a
    row-parallel weight's, the embedding's) read from the full state (shards cut finer
    than the groups each hold a copy of their group's)."""
    if quant.method == "int8":
        quant = replace(quant, row_groups=state["layers.0.attention.wo.scales"].shape[1])
    if quant.int8_embedding:
        quant = replace(quant, embed_groups=state["tok_embeddings.scales"].shape[1])
    return quant
