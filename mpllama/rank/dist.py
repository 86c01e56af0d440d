"""Where a rank runs and how ranks talk: device, dtype and backend choice, the
process group and fairscale's model-parallel state, set up and torn down.

The only module (with config.py, and ray_session.py where it starts a local runtime)
that reads or sets environment variables.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from ..errors import ConfigError
from ..hardware import cpu_native_bf16
from . import shm

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def use_huge_pages() -> None:
    """Have torch's CPU allocator madvise large tensors for transparent huge pages, in a
    rank's own process: call it before the rank allocates anything, since torch reads
    THP_MEM_ALLOC_ENABLE once, at its first allocation (later, it changes nothing). A
    decode step streams every weight once, and with 4 KiB pages the CPU's prefetchers
    stop at every page boundary: one request's products ran 1.36x faster with them on
    this CPU (benchmarks/RESULTS.md, "Figures behind the code"). torch's allocations are
    not 2 MiB-aligned, so this covers only their aligned interiors; glibc's own setting,
    which a process must start with, covers the rest (``ray_session._huge_page_malloc``)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def resolve_device(device: str) -> torch.device:
    """``auto``: the rank's GPU when it has one, else the CPU.

    Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so a rank's GPU is cuda:0.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' was asked for but this rank sees no GPU "
                "(torch.cuda.is_available() is False); use device: auto or cpu"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if device == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, else fp16 on GPU; on a CPU, bf16 where it
    has bf16 instructions (``hardware.cpu_native_bf16``: about 2x float32's products
    there), else float32 (emulated bf16 products run slower than float32)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_native_bf16() else torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(
            f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}"
        ) from None


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: NCCL when the rank has a GPU and torch was built with NCCL, else Gloo."""
    nccl = dist.is_nccl_available()
    if backend == "auto":
        return "nccl" if device.type == "cuda" and nccl else "gloo"
    if backend == "nccl" and (not nccl or device.type != "cuda"):
        raise ConfigError(
            "backend 'nccl' needs a GPU rank and a torch built with NCCL "
            f"(device={device}, NCCL available={nccl}); use backend: auto or gloo"
        )
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend must be auto, gloo or nccl, got {backend!r}")
    return backend


def interface_for_ip(ip: str) -> str | None:
    """The network interface that carries ``ip``, so Gloo binds the address Ray uses."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addresses):
            return name
    return None


def open_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on ``host`` with a port the OS picks (never a fixed one)."""
    return dist.TCPStore(
        host,
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_ranks(
    rank: int,
    world_size: int,
    host: str,
    port: int,
    backend: str,
    node_ip: str,
    timeout_s: float,
    store: dist.TCPStore | None = None,
    shm_bytes: int = 0,
) -> str:
    """Join the process group through rank 0's store and set up fairscale's groups.

    With ``shm_bytes`` (Gloo gangs), the ranks also try to meet in shared memory, with
    slots of that size, for the per-step collectives. Returns what carries them: "shm"
    or the backend."""
    iface = interface_for_ip(node_ip)
    if iface is not None:
        # Gloo (and NCCL's bootstrap) otherwise bind whatever the hostname resolves
        # to, which on many clusters is loopback or the wrong network.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    init_model_parallel(world_size)
    global _plan_group
    # The lead's step plans are small CPU integers: on NCCL gangs they travel on a Gloo
    # side group (SGLang's shape), so no step waits on a host-device copy to publish them.
    _plan_group = (
        dist.new_group(list(range(world_size)), backend="gloo", timeout=timeout)
        if backend != "gloo"
        else fs_init.get_model_parallel_group()
    )
    global _shm
    _shm = _join_shm(store, rank, world_size, shm_bytes, timeout_s) if shm_bytes else None
    carrier = backend if _shm is None else "shm"
    log.info(
        "rank %d/%d joined via %s:%d (%s, interface %s, step collectives on %s)",
        rank,
        world_size,
        host,
        port,
        backend,
        iface or "default",
        carrier,
    )
    return carrier


def _join_shm(
    store: dist.Store, rank: int, world: int, slot_bytes: int, timeout_s: float
) -> shm.ShmGroup | None:
    """Every rank maps rank 0's file in /dev/shm and checks it sees rank 0's token;
    only when all of them do (one machine, one /dev/shm) does the gang use it. The
    file is unlinked as soon as all have answered, so nothing outlives the gang."""
    why = shm.supported()
    group: shm.ShmGroup | None = None
    if rank == 0:
        if why is None:
            shm.remove_orphans()
        path = shm.slot_path()
        needed = 2 * (2 * world + 1) * slot_bytes
        if why is None and shm.free_bytes() < needed:
            why = f"{shm.SHM_DIR} has under {needed >> 20} MiB free"
        token = b""
        if why is None:
            try:
                group = shm.ShmGroup(path, rank, world, slot_bytes, timeout_s, create=True)
                token = group.write_token()
            except OSError as exc:
                why = str(exc)
        try:
            store.set("shm/path", str(path) if group else "")
            store.set("shm/token", token.hex())
            agreed = _agree(store, rank, world, group is not None)
        finally:
            path.unlink(missing_ok=True)  # every rank has mapped it or given up
    else:
        path_text = store.get("shm/path").decode()
        token_hex = store.get("shm/token").decode()
        if why is None and not path_text:
            why = "rank 0 could not set it up"
        elif why is None:
            try:
                group = shm.ShmGroup(Path(path_text), rank, world, slot_bytes, timeout_s)
            except OSError as exc:
                why = f"rank 0's file is not here ({exc}): another machine"
            if group is not None and group.read_token().hex() != token_hex:
                group, why = None, "rank 0's file here is not the one it wrote"
        agreed = _agree(store, rank, world, group is not None)
    if why is None and not agreed:
        why = "another rank could not map rank 0's file"
    if why is not None:
        log.info("rank %d: step collectives stay on the backend: %s", rank, why)
    return group if agreed else None


def _agree(store: dist.Store, rank: int, world: int, ready: bool) -> bool:
    """Whether every rank is ready (waits for all of them to say)."""
    store.set(f"shm/ok/{rank}", "1" if ready else "0")
    return all(store.get(f"shm/ok/{r}") == b"1" for r in range(world))


def init_single(backend: str = "gloo") -> None:
    """A one-rank group in this process (tests, and world size 1 without Ray)."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    init_model_parallel(1)


def init_model_parallel(world_size: int) -> None:
    """fairscale's model-parallel groups, without its console chatter: it announces them
    with print() on rank 0, which Ray forwards to the driver's terminal. The lines are
    logged at INFO instead (shown with ``mpllama -v``). The redirect is scoped to this
    one call, made while the rank sets up and nothing else of ours prints."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        fs_init.initialize_model_parallel(world_size)
    for line in captured.getvalue().splitlines():
        if line.strip():
            log.info("fairscale: %s", line.lstrip("> "))


# The group that carries step plans (CPU tensors); None until init_ranks.
_plan_group: dist.ProcessGroup | None = None
# Shared-memory collectives when every rank of a Gloo gang is on this machine.
_shm: shm.ShmGroup | None = None


def broadcast_plan(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank gets the lead's CPU ``tensor`` (in place; returned for chaining)."""
    if _plan_group is not None and fs_init.get_model_parallel_world_size() > 1:
        if _shm is None or not _shm.broadcast(tensor, 0):
            dist.broadcast(tensor, src=fs_init.get_model_parallel_src_rank(), group=_plan_group)
    return tensor


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the model-parallel group, in place (fairscale's reduce)."""
    if fs_init.get_model_parallel_world_size() > 1:
        if _shm is None or not _shm.all_reduce(x):
            dist.all_reduce(x, group=fs_init.get_model_parallel_group())
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along the last dimension, in rank order
    (fairscale's gather)."""
    world = fs_init.get_model_parallel_world_size()
    if world == 1:
        return x
    if _shm is not None:
        out = _shm.all_gather(x)
        if out is not None:
            return out
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=fs_init.get_model_parallel_group())
    return torch.cat(parts, dim=-1)


def gather_to_lead(x: torch.Tensor) -> torch.Tensor | None:
    """The lead (rank 0) gets every rank's ``x`` concatenated along the last dimension,
    in rank order; the other ranks get None. For the logits, which only the lead samples
    from: with a 128k vocabulary, receiving [B, V] on every rank costs each follower a
    [B, V] copy per step for nothing."""
    world = fs_init.get_model_parallel_world_size()
    if world == 1:
        return x
    if _shm is not None and _shm.fits(x):
        return _shm.gather(x, 0)
    x = x.contiguous()
    lead = fs_init.get_model_parallel_src_rank()
    group = fs_init.get_model_parallel_group()
    if dist.get_rank() != lead:
        dist.gather(x, None, dst=lead, group=group)
        return None
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.gather(x, parts, dst=lead, group=group)
    return torch.cat(parts, dim=-1)


def set_threads(num_threads: int) -> None:
    """Match torch's intra-op threads to the CPUs the rank was given."""
    torch.set_num_threads(max(1, num_threads))
