"""The KV cache's memory: how many blocks one rank's pool holds, from its budget and
its free memory, and the refusal of a pool that cannot work, with the same message on
the driver and on a rank. No torch here: the driver checks before any actor starts.
"""

from __future__ import annotations

import psutil

from .config import RuntimeConfig
from .errors import ConfigError
from .hardware import cpu_native_bf16
from .model_args import ModelArgs
from .shard_axes import kv_heads_of

# The share of available memory a KV pool sized by default may take (vLLM's
# gpu_memory_utilization, on CPU ranks too); runtime.kv_cache_memory_gb sets it exactly.
KV_MEMORY_FRACTION = 0.9


def kv_position_bytes(args: ModelArgs, world: int, dtype_bytes: int) -> int:
    """One rank's KV for one position: keys and values of its KV heads in every layer."""
    local_kv = len(kv_heads_of(0, world, args.kv_heads))
    return args.n_layers * 2 * local_kv * args.head_dim * dtype_bytes


def kv_pool_blocks(
    args: ModelArgs,
    world: int,
    runtime: RuntimeConfig,
    dtype_bytes: int,
    available: int,
    where: str,
    ranks: int = 1,
) -> int:
    """How many KV blocks one rank's pool holds, from its budget: the
    ``runtime.kv_cache_memory_gb`` given, else what every one of ``max_batch_size``
    requests at ``max_seq_len`` would fill, up to ``KV_MEMORY_FRACTION`` of the memory
    ``available`` (shared by ``ranks`` ranks). Refuses a budget that memory cannot hold,
    and one that cannot hold even one ``max_seq_len`` sequence, giving the numbers."""
    bs, seq = runtime.kv_block_size, runtime.max_seq_len
    per_block = kv_position_bytes(args, world, dtype_bytes) * bs
    one = -(-seq // bs)  # blocks one max_seq_len sequence needs
    share = available // ranks
    shared = f" ({ranks} ranks share it)" if ranks > 1 else ""
    if runtime.kv_cache_memory_gb is not None:
        budget = int(runtime.kv_cache_memory_gb * 2**30)
        if budget + per_block > share:
            raise ConfigError(
                f"runtime.kv_cache_memory_gb={runtime.kv_cache_memory_gb} asks {budget:,} bytes "
                f"of KV cache per rank, but {where} has {available:,} bytes "
                f"({available / 2**30:.1f} GiB) available{shared}; lower it"
            )
        source = f"runtime.kv_cache_memory_gb={runtime.kv_cache_memory_gb}"
    else:
        want = per_block * (one * runtime.max_batch_size + 1)  # and the spare block
        budget = min(want, int(KV_MEMORY_FRACTION * share))
        source = f"{KV_MEMORY_FRACTION:.0%} of the {share:,} bytes {where} has available{shared}"
    blocks = budget // per_block - 1  # one block is the spare that takes padding writes
    if blocks < one:
        raise ConfigError(
            f"the KV cache needs {(one + 1) * per_block:,} bytes ({(one + 1) * per_block / 2**30:.1f} "
            f"GiB) per rank to hold one sequence of max_seq_len={seq} ({one} blocks of {bs} "
            f"positions, {per_block:,} bytes each), but its budget is {budget:,} bytes "
            f"({source}). Lower runtime.max_seq_len, raise runtime.kv_cache_memory_gb, "
            "or use more ranks"
        )
    return blocks


# Bytes per value of each runtime.dtype on a CPU rank (auto: see dist.resolve_dtype).
CPU_DTYPE_BYTES = {"auto": 2 if cpu_native_bf16() else 4, "float32": 4, "bfloat16": 2, "float16": 2}


def check_kv_cache(
    args: ModelArgs, world: int, runtime: RuntimeConfig, gpus_per_rank: float | None
) -> int | None:
    """Refuse, on the driver, a KV pool that cannot work on a CPU rank's memory; returns
    its blocks per rank, or None when the ranks may run on GPUs (device cuda, or auto
    where the cluster may lend GPUs): a GPU rank sizes its pool from its device's free
    memory at set-up. CPU ranks are checked against this machine's available RAM (a
    local gang's machine; each rank sizes its pool on its own machine again)."""
    if runtime.device == "cuda" or (runtime.device == "auto" and gpus_per_rank != 0):
        return None
    available = psutil.virtual_memory().available
    return kv_pool_blocks(
        args, world, runtime, CPU_DTYPE_BYTES[runtime.dtype], available, "this machine"
    )
