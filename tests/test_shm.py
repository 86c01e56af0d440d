"""Shared-memory collectives between real processes: sums, gathers and broadcasts that
agree bit for bit on every rank over many calls in a row (the two slot sets are reused
alternately), messages too big for a slot declined on every rank alike, a peer that
never comes timing out with its name, and the handshake through the rendezvous store."""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mpllama.rank import shm
from mpllama.rank.dist import _join_shm

pytestmark = pytest.mark.skipif(shm.supported() is not None, reason=str(shm.supported()))

ROUNDS = 400
SLOT = 64 * 1024


def value(rank: int, call: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * call + rank)
    return torch.randn(shape, generator=g)


def collectives(path: str, rank: int, world: int, out: mp.Queue) -> None:
    """Every kind of call, shapes changing from call to call; each result checked
    against what it must be, and a digest of all results for the cross-rank check."""
    torch.set_num_threads(1)
    group = shm.ShmGroup(Path(path), rank, world, SLOT, timeout_s=30)
    digest = hashlib.sha256()
    wrong = []
    for call in range(ROUNDS):
        shape = (1 + call % 7, 16 + call % 5)
        kind = call % 3
        if kind == 0:
            x = value(rank, call, shape)
            assert group.all_reduce(x)
            want = value(0, call, shape)
            for r in range(1, world):
                want = want + value(r, call, shape)
        elif kind == 1:
            x = group.all_gather(value(rank, call, shape))
            want = torch.cat([value(r, call, shape) for r in range(world)], dim=-1)
        else:
            src = call % world
            x = value(rank, call, shape) if rank == src else torch.zeros(shape)
            assert group.broadcast(x, src)
            want = value(src, call, shape)
        if not torch.equal(x, want):
            wrong.append(call)
        digest.update(x.numpy().tobytes())
    out.put((rank, wrong, digest.hexdigest()))


def spawn(target, world: int, *args) -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, r, world, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return sorted(results)


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_agree_on_every_rank_over_many_calls(world: int, tmp_path: Path) -> None:
    path = shm.slot_path()
    creator = shm.ShmGroup(path, 0, world, SLOT, timeout_s=30, create=True)
    try:
        results = spawn(collectives, world, str(path))
    finally:
        path.unlink()
        del creator
    assert [r[0] for r in results] == list(range(world))
    assert all(r[1] == [] for r in results), results
    assert len({r[2] for r in results}) == 1  # the same bits everywhere


def test_a_message_bigger_than_a_slot_is_declined_without_waiting() -> None:
    path = shm.slot_path()
    try:
        group = shm.ShmGroup(path, 0, 2, 1024, timeout_s=30, create=True)
        big = torch.ones(257)  # 1028 bytes
        start = time.monotonic()
        assert group.all_reduce(big) is False
        assert group.all_gather(big) is None
        assert group.broadcast(big, 0) is False
        assert time.monotonic() - start < 1.0  # nobody was waited for
        assert torch.equal(big, torch.ones(257))
    finally:
        path.unlink()


def test_a_peer_that_never_comes_times_out_by_name() -> None:
    path = shm.slot_path()
    try:
        group = shm.ShmGroup(path, 0, 2, 1024, timeout_s=0.5, create=True)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="rank 1 did not reach shared-memory collective 1"):
            group.all_reduce(torch.ones(4))
        assert 0.4 < time.monotonic() - start < 10
    finally:
        path.unlink()


def join(port: int, mode: str, rank: int, world: int, out: mp.Queue) -> None:
    if mode == "rank0-has-no-room" and rank == 0:
        shm.free_bytes = lambda: 0  # this process only: rank 0 finds /dev/shm full
    if mode == "rank1-elsewhere" and rank == 1:

        def not_here(path: Path, *args: object, **kwargs: object) -> None:
            raise FileNotFoundError(2, "No such file or directory", str(path))

        shm.ShmGroup = not_here  # as on another machine: rank 0's file is not there
    store = dist.TCPStore(
        "127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=30)
    )
    group = _join_shm(store, rank, world, 4096, 30.0)
    ok = group is not None
    if ok:
        x = torch.full((3,), float(rank + 1))
        ok = group.all_reduce(x) and torch.equal(x, torch.full((3,), 3.0))
    out.put((rank, group is not None, ok))


@pytest.mark.parametrize("mode", ["joined", "rank0-has-no-room", "rank1-elsewhere"])
def test_ranks_join_through_the_store_and_leave_no_file(mode: str) -> None:
    before = set(shm.SHM_DIR.glob("mpllama-*"))
    master = dist.TCPStore(
        "127.0.0.1",
        0,
        3,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=30),
    )
    results = spawn(join, 2, master.port, mode)
    if mode == "joined":
        assert results == [(0, True, True), (1, True, True)]
    else:  # one rank cannot: both stay on the backend
        assert results == [(0, False, False), (1, False, False)]
    assert set(shm.SHM_DIR.glob("mpllama-*")) == before


def test_files_of_dead_creators_are_removed_and_no_others(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = shm.SHM_DIR / f"mpllama-{dead.pid}-test{os.getpid()}"
    mine = shm.SHM_DIR / f"mpllama-{os.getpid()}-test"
    young = shm.SHM_DIR / f"mpllama-{dead.pid}-young{os.getpid()}"
    for path in (orphan, mine, young):
        path.write_bytes(b"x")
    hour_ago = time.time() - 3600
    for path in (orphan, mine):
        os.utime(path, (hour_ago, hour_ago))
    try:
        removed = shm.remove_orphans()
        assert orphan in removed and not orphan.exists()
        assert mine.exists() and young.exists()  # a live creator; a handshake in progress
    finally:
        for path in (orphan, mine, young):
            path.unlink(missing_ok=True)


def gathers(path: str, rank: int, world: int, out: mp.Queue) -> None:
    """Gathers to rank 0 mixed with the other collectives, runs of gathers included: the
    senders publish and go on, so the lead is often behind them."""
    torch.set_num_threads(1)
    group = shm.ShmGroup(Path(path), rank, world, SLOT, timeout_s=30)
    wrong = []
    for call in range(ROUNDS):
        shape = (1 + call % 5, 8 + call % 3)
        if call % 4 == 3:  # a sum every fourth call, gathers in between
            x = value(rank, call, shape)
            assert group.all_reduce(x)
            want = sum((value(r, call, shape) for r in range(1, world)), value(0, call, shape))
            ok = torch.equal(x, want)
        else:
            if rank == 0 and call % 7 == 0:
                time.sleep(0.002)  # a slow lead: the senders run ahead into the next call
            got = group.gather(value(rank, call, shape), 0)
            if rank == 0:
                want = torch.cat([value(r, call, shape) for r in range(world)], dim=-1)
                ok = got is not None and torch.equal(got, want)
            else:
                ok = got is None
        if not ok:
            wrong.append(call)
    out.put((rank, wrong))


@pytest.mark.parametrize("world", [2, 3])
def test_gather_reaches_the_lead_only_and_keeps_later_calls_right(world: int) -> None:
    path = shm.slot_path()
    creator = shm.ShmGroup(path, 0, world, SLOT, timeout_s=30, create=True)
    try:
        results = spawn(gathers, world, str(path))
    finally:
        path.unlink()
        del creator
    assert results == [(r, []) for r in range(world)]


def test_gather_of_a_message_bigger_than_a_slot_is_refused() -> None:
    path = shm.slot_path()
    try:
        group = shm.ShmGroup(path, 1, 2, 1024, timeout_s=30, create=True)
        assert not group.fits(torch.ones(257))
        with pytest.raises(ValueError, match="1028 bytes do not fit"):
            group.gather(torch.ones(257), 0)
    finally:
        path.unlink()
