"""Quantizing full-precision weights (``runtime.quantization``, ``mpllama quantize``): the
math per tensor (int8 per output row and input group, int4 group-wise and packed two to
a byte), per shard's state dict, and what a rank quantizes while it loads. The quantized
weights at run time, and their products, are rank/quant.py's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..errors import CheckpointError
from ..model_args import ModelArgs
from ..quantization import Quantization, int4_group_size
from ..shard_axes import EMBEDDING, scales_key

# Rows quantized at once: this many bytes of their float32 copy.
CHUNK_BYTES = 16 << 20


def _by_rows(
    w: torch.Tensor, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` over runs of ``w``'s rows, CHUNK_BYTES of float32 at a time, written
    into the whole's two outputs. Each row is quantized on its own, so the values are
    those of every row at once; the temporaries are a run's, not several copies of the
    whole weight in float32 (Llama 3.2 1B's table, 501 MiB in bf16, grew a process by
    3 GiB quantized at once: RESULTS.md, session 14)."""
    rows = max(1, CHUNK_BYTES // (w.shape[1] * 4))
    first = quantize(w[:rows])
    if w.shape[0] <= rows:
        return first
    outs = tuple(torch.empty(w.shape[0], *p.shape[1:], dtype=p.dtype) for p in first)
    for start in range(0, w.shape[0], rows):
        parts = first if start == 0 else quantize(w[start : start + rows])
        for out, part in zip(outs, parts, strict=True):
            out[start : start + len(part)] = part
    return outs[0], outs[1]


def quantize_int8(w: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in], float32 scales [out, groups]): symmetric, one scale
    per output row and each of ``groups`` equal runs of the input."""
    return _by_rows(w, lambda rows: _int8_rows(rows, groups))


def _int8_rows(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = w.shape
    wg = w.float().reshape(out, groups, inp // groups)
    scales = wg.abs().amax(-1).clamp(min=1e-12) / 127
    q = torch.round(wg / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(out, inp), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (uint8 [out, in/2], two 4-bit values a byte, the even column low;
    bf16 [out, in/group_size, 2], scale and zero): w ~ (q - 8) * scale + zero, q in 0..15."""
    return _by_rows(w, lambda rows: _int4_rows(rows, group_size))


def _int4_rows(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = w.shape
    wg = w.float().reshape(out, inp // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    # Rounded to bf16 before use, so the stored scale is the one the values were made for.
    scale = ((hi - lo) / 15).clamp(min=1e-6).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    q = torch.round((wg - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    q = q.reshape(out, inp)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, torch.stack([scale, zero], -1).bfloat16()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> uint8 [out, in], values 0..15. One byte a value, so unpacking a
    weight makes temporaries of its size, not four times it (int32, which torch's int4
    kernel takes, is the caller's to make); glibc's heap keeps less of them once freed."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], -1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``quantize_int4``'s rows back to float32: packed [n, in/2], scales [n, groups, 2]
    -> [n, in], (q - 8) * scale + zero."""
    q = unpack_int4(packed).float().reshape(len(packed), scales.shape[1], -1)
    scale, zero = scales.float().unbind(-1)
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(len(packed), -1)


def quantize_state(state: dict[str, torch.Tensor], quant: Quantization) -> dict[str, torch.Tensor]:
    """One shard's state dict with its linear weights quantized (``X.weight`` replaced,
    ``X.scales`` added) and every other tensor as it is. One full-precision tensor at a
    time: a float32 copy of the weight being quantized, never more."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        method = quant.method_of(key)
        if method is None:
            out[key] = value
        elif method == "int8":
            out[key], out[scales_key(key)] = quantize_int8(value)
        else:
            out[key], out[scales_key(key)] = quantize_int4(value, quant.group_size)
    return out


def tied_vocabulary(state: dict[str, torch.Tensor]) -> bool:
    """Whether a shard's embedding is its output layer's matrix stored again, as Llama
    3.2 1B's and 3B's checkpoints store it (a row at each end compared first, so an untied
    pair costs nothing to tell)."""
    table, output = state.get(EMBEDDING), state.get("output.weight")
    if table is None or output is None or table.shape != output.shape:
        return False
    ends = [0, table.shape[0] - 1]
    return torch.equal(table[ends], output[ends]) and torch.equal(table, output)


def for_checkpoint(quant: Quantization, shard: dict[str, torch.Tensor]) -> Quantization:
    """``quant`` for a checkpoint one of whose shards' state is ``shard``: a tied
    vocabulary keeps its embedding int8, the output layer's type, so a rank reads the
    embedding's rows from the output layer and holds none of its own
    (``vocab_tables.shared_table``); an int4 table would cost half the output layer's bytes
    again (for Llama 3.2 1B, 140 MB a model)."""
    if quant.embedding == "int8" or not tied_vocabulary(shard):
        return quant
    return replace(quant, embedding="int8")


def on_load(
    setting: str,
    group_size: int | str,
    stored: Quantization | None,
    args: ModelArgs,
    n_shards: int,
    world_size: int,
) -> Quantization | None:
    """What a rank quantizes while loading, for ``runtime.quantization`` = ``setting``:
    nothing for ``none``, nor for a checkpoint already quantized (``stored``), which runs
    as it was written; quantizing it again to another method is refused. Each of the
    ``n_shards`` shards is quantized as it is read, then split over ``world_size`` ranks:
    an ``auto`` group size fits both."""
    if stored is not None:
        if setting not in ("none", stored.method):
            raise CheckpointError(
                f"the checkpoint is already quantized to {stored.method} (mpllama quantize); "
                f"runtime.quantization={setting} would quantize it twice. Set "
                f"runtime.quantization to none or {stored.method}, or point at the "
                "full-precision checkpoint"
            )
        return None
    if setting == "none":
        return None
    group_size = int4_group_size(args, group_size, n_shards, world_size)
    # The embedding's scale groups: ``weights.load_rank_state`` reads them off the shards.
    return Quantization(setting, group_size, row_groups=n_shards)
