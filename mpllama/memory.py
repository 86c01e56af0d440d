"""The KV cache's memory: what one rank reserves, and the refusal of a configuration
that cannot fit, with the same message on the driver and on a rank.

Today's cache reserves max_seq_len positions for every slot (a block cache is a later
issue), so at a Llama 3.1 context of 131072 positions a handful of slots already takes
tens of GiB per rank. No torch here: the driver checks before any actor starts.
"""

from __future__ import annotations

import psutil

from .checkpoint import kv_heads_of
from .config import RuntimeConfig
from .errors import ConfigError
from .hardware import cpu_native_bf16
from .model_args import ModelArgs


def kv_cache_bytes(
    args: ModelArgs, world: int, slots: int, max_seq_len: int, dtype_bytes: int
) -> int:
    """One rank's KV cache: keys and values of its KV heads for every layer, position and
    slot, plus the spare slot that takes padding writes (see model.Transformer)."""
    local_kv = len(kv_heads_of(0, world, args.kv_heads))
    per_position = args.n_layers * 2 * local_kv * args.head_dim * dtype_bytes
    return per_position * max_seq_len * (slots + 1)


def kv_cache_error(
    need: int, available: int, where: str, slots: int, max_seq_len: int, ranks: int = 1
) -> ConfigError:
    """The one message for a KV cache that does not fit, raised on the driver and on a
    rank alike; ``ranks`` is how many ranks share that memory."""
    fits = max(0, available // max(1, ranks * (need // (slots + 1))) - 1)
    shared = f", {ranks} ranks there: {ranks * need:,} bytes in all" if ranks > 1 else ""
    return ConfigError(
        f"the KV cache needs {need:,} bytes ({need / 2**30:.1f} GiB) per rank for "
        f"max_batch_size={slots} x max_seq_len={max_seq_len} (every slot reserves "
        f"max_seq_len positions{shared}), but {where} has {available:,} bytes "
        f"({available / 2**30:.1f} GiB) available. Lower runtime.max_batch_size (at this "
        f"max_seq_len about {fits} slot(s) fit) or runtime.max_seq_len, or use more ranks"
    )


# Bytes per value of each runtime.dtype on a CPU rank (auto: see dist.resolve_dtype).
CPU_DTYPE_BYTES = {"auto": 2 if cpu_native_bf16() else 4, "float32": 4, "bfloat16": 2, "float16": 2}


def check_kv_cache(
    args: ModelArgs, world: int, runtime: RuntimeConfig, gpus_per_rank: float | None
) -> int | None:
    """Refuse, on the driver, a KV cache that cannot fit a CPU rank's memory; returns its
    bytes per rank, or None when the ranks may run on GPUs (device cuda, or auto where
    the cluster may lend GPUs): a GPU rank checks its own device's free memory at set-up.
    CPU ranks are checked against this machine's available RAM (a local gang's machine;
    each rank checks its own machine again when it sets up)."""
    if runtime.device == "cuda" or (runtime.device == "auto" and gpus_per_rank != 0):
        return None
    slots, seq = runtime.max_batch_size, runtime.max_seq_len
    need = kv_cache_bytes(args, world, slots, seq, CPU_DTYPE_BYTES[runtime.dtype])
    available = psutil.virtual_memory().available
    if need > available:
        raise kv_cache_error(need, available, "this machine", slots, seq)
    return need
