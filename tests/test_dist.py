"""Device, dtype and backend choice, and the interface Gloo binds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpllama import hardware
from mpllama.errors import ConfigError
from mpllama.rank import dist

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"
)


def test_auto_on_a_cpu_machine_is_cpu_gloo_and_bf16_where_the_cpu_has_it() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; see the gpu-marked test")
    device = dist.resolve_device("auto")
    assert device == torch.device("cpu")
    native = bool({"avx512_bf16", "amx_bf16"} & set(Path("/proc/cpuinfo").read_text().split()))
    assert hardware.cpu_native_bf16() is native
    assert dist.resolve_dtype("auto", device) is (torch.bfloat16 if native else torch.float32)
    assert dist.resolve_backend("auto", device) == "gloo"


def test_bf16_detection_reads_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for flags, native in [
        ({"avx512f", "avx512_bf16"}, True),
        ({"amx_bf16"}, True),
        ({"avx512f", "avx512_vnni"}, False),
        (set(), False),
    ]:
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert hardware.cpu_native_bf16() is native
        want = torch.bfloat16 if native else torch.float32
        assert dist.resolve_dtype("auto", torch.device("cpu")) is want


def test_explicit_dtypes_and_errors() -> None:
    cpu = torch.device("cpu")
    assert dist.resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert dist.resolve_dtype("float16", cpu) is torch.float16
    with pytest.raises(ConfigError, match="dtype must be one of"):
        dist.resolve_dtype("float64", cpu)


def test_nccl_on_a_cpu_rank_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="backend 'nccl' needs a GPU rank"):
        dist.resolve_backend("nccl", torch.device("cpu"))
    assert dist.resolve_backend("gloo", torch.device("cpu")) == "gloo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="sees no GPU"):
        dist.resolve_device("cuda")


def test_interface_for_ip_finds_loopback_and_nothing_for_unknown() -> None:
    assert dist.interface_for_ip("127.0.0.1") is not None
    assert dist.interface_for_ip("203.0.113.254") is None


def test_store_port_is_chosen_by_the_os() -> None:
    a = dist.open_store("127.0.0.1", 2, 5.0)
    b = dist.open_store("127.0.0.1", 2, 5.0)
    assert a.port > 0 and b.port > 0 and a.port != b.port


@pytest.mark.gpu
@needs_gpu
def test_auto_on_a_gpu_is_cuda_bf16_or_fp16_nccl() -> None:
    device = dist.resolve_device("auto")
    assert device.type == "cuda"
    assert dist.resolve_dtype("auto", device) in (torch.bfloat16, torch.float16)
    expected = "nccl" if torch.distributed.is_nccl_available() else "gloo"
    assert dist.resolve_backend("auto", device) == expected


def gather_rank(port: int, shm_bytes: int, rank: int, world: int, out: object) -> None:
    """One rank of a Gloo gang: gathers of a small and a big message (the big one does
    not fit a shared-memory slot and takes Gloo), then an all-reduce after them."""
    torch.set_num_threads(1)
    carrier = dist.init_ranks(
        rank, world, "127.0.0.1", port, "gloo", "127.0.0.1", 30.0, shm_bytes=shm_bytes
    )
    try:
        got = []
        for call, cols in enumerate([3, 5000, 4, 6000]):
            x = torch.full((2, cols), float(10 * call + rank))
            y = dist.gather_to_lead(x)
            got.append(None if y is None else y[0].unique_consecutive().tolist())
        total = dist.all_reduce(torch.ones(3))
        out.put((rank, carrier, got, total.tolist()))
    finally:
        dist.teardown()


@pytest.mark.parametrize("shm_bytes", [0, 4096])
def test_gather_to_lead_gives_rank_0_every_part_and_the_others_none(shm_bytes: int) -> None:
    import multiprocessing as mp

    world = 3
    store = dist.open_store("127.0.0.1", world + 1, 30.0)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=gather_rank, args=(store.port, shm_bytes, r, world, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    carrier = "shm" if shm_bytes and dist.shm.supported() is None else "gloo"
    lead_parts = [[10.0 * call + r for r in range(world)] for call in range(4)]
    assert results[0] == (0, carrier, lead_parts, [3.0] * 3)
    for rank in (1, 2):
        assert results[rank] == (rank, carrier, [None] * 4, [3.0] * 3)
