"""One model-parallel rank: join the group, load this rank's slice of the checkpoint,
run the generation loop. A plain class, so it runs (and is tested) without Ray; the
engine wraps it in a Ray actor.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import checkpoint, dist
from .config import ModelArgs
from .generate import Completion, Request, generate
from .model import Transformer, materialize
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSpec:
    """What every rank of one engine is told; identical on all ranks."""

    checkpoint_dir: str
    args: ModelArgs  # vocab already resolved against the tokenizer
    tokenizer_proto: bytes  # the tokenizer travels as bytes: no path needed on the rank
    world_size: int
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    max_batch_size: int = 8
    max_seq_len: int = 512
    seed: int = 1
    threads: int = 1
    collective_timeout_s: float = 60.0
    log_level: int = logging.WARNING  # the driver's level for mpllama's loggers


class RankWorker:
    def __init__(self, rank: int, spec: RankSpec) -> None:
        self.rank = rank
        self.spec = spec
        self.model: Transformer | None = None
        self.tokenizer = Tokenizer.from_bytes(spec.tokenizer_proto)
        self._store: Any = None
        self._rss_before_load = 0.0

    # --------------------------------------------------------------- set-up

    def open_store(self, host: str) -> int:
        """Rank 0 only: open the rendezvous store; returns the OS-chosen port."""
        self._store = dist.open_store(host, self.spec.world_size, self.spec.collective_timeout_s)
        return int(self._store.port)

    def setup(self, host: str, port: int, node_ip: str) -> dict[str, Any]:
        """Join the group, then load and place this rank's weights and KV cache."""
        spec = self.spec
        started = time.perf_counter()
        device = dist.resolve_device(spec.device)
        dtype = dist.resolve_dtype(spec.dtype, device)
        backend = dist.resolve_backend(spec.backend, device)
        dist.set_threads(spec.threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if spec.world_size == 1:
            dist.init_single(backend)
        else:
            dist.init_ranks(
                self.rank,
                spec.world_size,
                host,
                port,
                backend,
                node_ip,
                spec.collective_timeout_s,
                store=self._store,
            )
        # Every rank seeded alike (the lead's choices are what count, but any randomness
        # a rank uses on its own must not make it differ from the others).
        torch.manual_seed(spec.seed)
        self._rss_before_load = peak_rss_mb()
        shards = checkpoint.find_shards(spec.checkpoint_dir)
        state = checkpoint.load_rank_state(shards, spec.args, self.rank, spec.world_size)
        self.model = materialize(Transformer(spec.args), state, device, dtype)
        del state
        self.model.setup_caches(spec.max_batch_size, spec.max_seq_len)
        info = {
            "rank": self.rank,
            "device": str(device),
            "dtype": str(dtype).split(".")[-1],
            "backend": backend,
            "load_s": round(time.perf_counter() - started, 3),
            "rss_before_load_mb": self._rss_before_load,
            "peak_rss_mb": peak_rss_mb(),
            "pid": os.getpid(),
        }
        log.info("ready: %s", info)
        return info

    # --------------------------------------------------------------- work

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Run one batch; the lead rank returns the completions, the others []."""
        if self.model is None:
            raise RuntimeError(f"rank {self.rank}: generate() before setup()")
        lead = self.rank == 0
        sync = dist.broadcast_from_lead if self.spec.world_size > 1 else None
        return generate(self.model, self.tokenizer, requests, lead=lead, sync=sync)

    def ping(self) -> int:
        return self.rank

    def memory(self) -> dict[str, float]:
        """Peak resident memory, and how much of it came after the process had started
        (weights actually touched, KV cache, activations)."""
        peak = peak_rss_mb()
        return {"peak_rss_mb": peak, "growth_mb": round(peak - self._rss_before_load, 1)}

    def shutdown(self) -> None:
        self.model = None
        dist.teardown()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def configure_rank_logging(rank: int, level: int = logging.INFO) -> None:
    """Put the rank in this process's log prefix (a rank's process is its own), at the
    driver's verbosity: ranks are never muted, just as chatty as the driver asked."""
    fmt = f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    if not any(getattr(h, "_mpllama_rank", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler._mpllama_rank = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for handler in root.handlers:
        if getattr(handler, "_mpllama_rank", False):
            handler.setFormatter(logging.Formatter(fmt))
    root.setLevel(level)
