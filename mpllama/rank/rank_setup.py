"""A rank's set-up, once, before its step loop (``worker.RankWorker.setup``): join the
group (Gloo through shared memory where every rank is on this machine), load and lay out
this rank's slice of the checkpoint (quantized as it is stored or as asked), choose its
linear kernels, and allocate its KV block pool within the memory it has."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from .. import checkpoint, memory
from ..config import RuntimeConfig
from ..errors import ConfigError
from ..protocol import RankSpec
from ..quantization import check_quantization, read_quantization
from . import cpu_kernels, dist, quant, quantize, weights
from .layers import onednn_unsupported
from .model import Transformer, materialize
from .process_memory import loading, peak_rss_mb, release_freed_memory, resident_mb

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A rank, set up: its model, what it reports (``rank_info``), and its memory before
    the load (the baseline of ``RankWorker.memory``)."""

    model: Transformer = field(repr=False)
    info: dict[str, Any]
    rss_before: float
    anon_before: float


def set_up(
    rank: int, spec: RankSpec, host: str, port: int, node_ip: str, store: Any = None
) -> Loaded:
    """Join the group (rank 0's rendezvous ``store`` at ``host:port``), then load and
    place this rank's weights and KV cache."""
    started = time.perf_counter()
    device = dist.resolve_device(spec.device)
    dtype = dist.resolve_dtype(spec.dtype, device)
    backend = dist.resolve_backend(spec.backend, device)
    dist.set_threads(spec.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    collectives = "none"
    use_shm = spec.shm_collectives and backend == "gloo" and device.type == "cpu"
    if spec.world_size == 1:
        dist.init_single(backend)
    else:
        collectives = dist.init_ranks(
            rank,
            spec.world_size,
            host,
            port,
            backend,
            node_ip,
            spec.collective_timeout_s,
            store=store,
            shm_bytes=_shm_slot_bytes(spec, dtype) if use_shm else 0,
        )
    rss_before = peak_rss_mb()
    anon_before = resident_mb().get("anon_rss_mb", 0.0)
    shards = checkpoint.find_shards(spec.checkpoint_dir)
    embed_axis = checkpoint.detect_embedding_axis(shards, spec.args)
    # Quantized weights: as a quantized checkpoint stores them, or made while loading.
    stored = read_quantization(spec.checkpoint_dir)
    on_load = quantize.on_load(
        spec.quantization,
        spec.quant_group_size,
        stored,
        spec.args,
        len(shards),
        spec.world_size,
    )
    quantization = stored or on_load
    if quantization:
        check_quantization(spec.args, quantization, spec.world_size)
    with loading():
        state = weights.load_rank_state(shards, spec.args, rank, spec.world_size, stored, on_load)
        build = quant.materialize_quantized if quantization else materialize
        model = build(Transformer(spec.args, embed_axis), state, device, dtype)
        del state
        linear = linear_kernel(spec.cpu_linear, device, dtype)
        if linear == "onednn":
            model.pack_linears()
        elif quantization:
            model.pack_linears(onednn=False)
    release_freed_memory()
    # Gloo ranks that met in shared memory are all on this machine and share its RAM.
    setup_caches(model, spec, device, dtype, spec.world_size if collectives == "shm" else 1)
    info = {
        "rank": rank,
        "device": str(device),
        "dtype": str(dtype).split(".")[-1],
        "backend": backend,
        "linear": linear,
        "cpu_kernels": cpu_kernels.path() if device.type == "cpu" else "none",
        "quantization": quantization.method if quantization else "none",
        "collectives": collectives,
        "load_s": round(time.perf_counter() - started, 3),
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "pid": os.getpid(),
    }
    return Loaded(model, info, rss_before, anon_before)


SHM_SLOT_CAP = 8 << 20  # bytes; bigger messages (long prefills) go through Gloo


def _shm_slot_bytes(spec: RankSpec, dtype: torch.dtype) -> int:
    """A shared-memory slot big enough for a step's messages: a prefill chunk's or a
    decode batch's hidden states (all-reduce) and a batch's slice of the logits
    (all-gather; float32 where a bf16 CPU rank computes them with mpllama's kernels, so
    counted at 4 bytes), capped at SHM_SLOT_CAP."""
    args, rows = spec.args, max(spec.max_batch_size, spec.prefill_chunk_tokens)
    vocab_slice = -(-args.vocab_size // spec.world_size)
    logits = spec.max_batch_size * vocab_slice * max(dtype.itemsize, 4)
    return min(SHM_SLOT_CAP, max(rows * args.dim * dtype.itemsize, logits))


def setup_caches(
    model: Transformer, spec: RankSpec, device: torch.device, dtype: torch.dtype, ranks: int = 1
) -> None:
    """Allocate the KV block pool, sized from this rank's budget and free memory (RAM on
    a CPU rank, shared by ``ranks`` ranks; the GPU's on a GPU rank), refusing first one
    that cannot work (``memory.kv_pool_blocks``): a CPU allocation would otherwise
    succeed lazily and the rank be killed later, when the pages are touched. An
    allocation that fails anyway says so with its bytes."""
    runtime = RuntimeConfig(
        max_batch_size=spec.max_batch_size,
        max_seq_len=spec.max_seq_len,
        kv_cache_memory_gb=spec.kv_cache_memory_gb,
        kv_block_size=spec.kv_block_size,
    )
    if device.type == "cuda":
        available, where, ranks = torch.cuda.mem_get_info(device)[0], f"{device}", 1
    else:
        available, where = psutil.virtual_memory().available, "this rank's machine"
    blocks = memory.kv_pool_blocks(
        spec.args, spec.world_size, runtime, dtype.itemsize, available, where, ranks
    )
    try:
        model.setup_caches(blocks, spec.kv_block_size, spec.max_seq_len)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower():
            raise
        per_position = memory.kv_position_bytes(spec.args, spec.world_size, dtype.itemsize)
        need = (blocks + 1) * spec.kv_block_size * per_position
        raise ConfigError(
            f"allocating the KV cache ({blocks} blocks, {need:,} bytes) failed on {where}: "
            f"{exc}; set runtime.kv_cache_memory_gb lower"
        ) from exc


def linear_kernel(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """What runs this rank's linear layers: ``onednn`` (prepacked) or ``torch``."""
    if device.type != "cpu" or choice == "torch":
        return "torch"
    why = onednn_unsupported(device, dtype)
    if why is None:
        return "onednn"
    if choice == "onednn":
        raise RuntimeError(f"runtime.cpu_linear is onednn, but {why}; use auto or torch")
    log.info("linear layers on torch's kernel: %s", why)
    return "torch"
