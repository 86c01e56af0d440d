"""Collectives through shared memory, for a gang whose CPU ranks share one machine.

A Gloo collective costs a TCP round trip through the kernel (benchmarks/RESULTS.md,
"Figures behind the code"), and an MP=2 step makes 2 all-reduces per layer, 2 all-gathers and a plan
broadcast. Ranks on one machine can instead meet in a file under /dev/shm: each writes
its part into its own slot, raises its counter, waits for every other counter, and
reads the others' slots. That costs tens of microseconds.

Layout of the file: ``world`` counters (int64, each on its own cache line), then two
sets of ``world`` slots of ``slot_bytes``. Call n uses set n % 2: a rank can be at most
one call ahead of the slowest (it cannot finish call n + 1 before every rank has
published n + 1, which each does only after reading call n), so the set it writes next
is never one a slower rank still reads.

A gather to one rank (the logits, which only the lead samples from) lets the other
ranks publish and go on without waiting: such a rank is "lagging", and before it next
writes it waits for every rank to have published that gather, which keeps the rule
above.

Every rank sums the slots in rank order, so an all-reduce gives all ranks the same bits.
Ordering relies on x86's total store order (a rank's slot is written before its
counter and read after the others'); other architectures keep Gloo. A message bigger
than a slot returns ``False`` from the call and goes through Gloo; the ranks always
agree, because they call with the same shapes.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import shutil
import time
from pathlib import Path

import torch

_LINE = 64  # bytes: each counter on its own cache line
_TOKEN = 16  # random bytes rank 0 writes, that the others check they see
SHM_DIR = Path("/dev/shm")
_SPINS = 2000  # busy checks before a waiting rank starts to sleep between checks
_MAX_PAUSE_S = 0.001  # the longest sleep between checks (an idle follower's wake-up lag)


def supported() -> str | None:
    """Why shared-memory collectives cannot run here, or None when they can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they rely on x86 store ordering and this is {platform.machine()}"
    if not SHM_DIR.is_dir():
        return f"{SHM_DIR} does not exist"
    return None


class ShmGroup:
    """One gang's shared-memory collectives (sum all-reduce, all-gather, gather,
    broadcast)."""

    def __init__(
        self,
        path: Path,
        rank: int,
        world: int,
        slot_bytes: int,
        timeout_s: float,
        create: bool = False,
    ) -> None:
        """Map the file at ``path`` (made, zeroed, with ``create``: rank 0's part)."""
        self.rank, self.world = rank, world
        self.slot_bytes, self.timeout_s = slot_bytes, timeout_s
        size = _LINE * world + 2 * world * slot_bytes
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._counters = memoryview(self._mm).cast("q")  # rank r's counter at r * 8
        self._others = [r * (_LINE // 8) for r in range(world) if r != rank]
        raw = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._slots = [
            [raw[self._offset(s, r) : self._offset(s, r) + slot_bytes] for r in range(world)]
            for s in (0, 1)
        ]
        self._calls = 0
        # Published a gather without waiting: the next call first waits for the others.
        self._lagging = False

    def _offset(self, half: int, rank: int) -> int:
        return _LINE * self.world + (half * self.world + rank) * self.slot_bytes

    # The token lives in rank 0's slot of set 1, before any call has used it.
    def write_token(self) -> bytes:
        token = secrets.token_bytes(_TOKEN)
        self._slots[1][0][:_TOKEN].copy_(torch.frombuffer(bytearray(token), dtype=torch.uint8))
        return token

    def read_token(self) -> bytes:
        return bytes(self._slots[1][0][:_TOKEN].tolist())

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, x: torch.Tensor) -> bool:
        """x = the sum of every rank's x, in place; False (nothing done) if too big."""
        parts = self._exchange(x, write=True)
        if parts is None:
            return False
        if len(parts) == 2:
            torch.add(parts[0], parts[1], out=x)
        else:
            x.copy_(parts[0])
            for part in parts[1:]:
                x.add_(part)
        return True

    def all_gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x, concatenated along the last dimension (rank order)."""
        parts = self._exchange(x, write=True)
        return None if parts is None else torch.cat(parts, dim=-1)

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= self.slot_bytes

    def gather(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        """Rank ``dst`` gets every rank's x concatenated along the last dimension (rank
        order); the others publish theirs, return None at once and never read. Only
        for an x that ``fits`` (all ranks call with the same shape, so all agree)."""
        if not self.fits(x):
            raise ValueError(f"{x.numel() * x.element_size()} bytes do not fit a slot")
        if self.rank != dst:
            self._exchange(x, write=True, wait=False)
            return None
        parts = self._exchange(x, write=False)  # its own part is x itself
        assert parts is not None
        parts[dst] = x
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int) -> bool:
        """x = rank ``src``'s x, in place."""
        parts = self._exchange(x, write=self.rank == src)
        if parts is None:
            return False
        if self.rank != src:
            x.copy_(parts[src])
        return True

    def _exchange(
        self, x: torch.Tensor, write: bool, wait: bool = True
    ) -> list[torch.Tensor] | None:
        """Publish x (when ``write``), wait for every rank (unless not ``wait``: a
        gather's sender), and return every rank's slot viewed as x; None when x does
        not fit a slot."""
        nbytes = x.numel() * x.element_size()
        if nbytes > self.slot_bytes:
            return None
        if self._lagging:  # every rank must be done reading the set this call reuses
            self._wait(self._calls)
        self._lagging = not wait
        self._calls += 1
        half = self._calls % 2
        parts = [s[:nbytes].view(x.dtype).view(x.shape) for s in self._slots[half]]
        if write:
            parts[self.rank].copy_(x)
        self._counters[self.rank * (_LINE // 8)] = self._calls
        if wait:
            self._wait(self._calls)
        return parts

    def _wait(self, call: int) -> None:
        counters = self._counters
        spins, pause, deadline = 0, 0.0, 0.0
        for i in self._others:
            while counters[i] < call:
                spins += 1
                if spins < _SPINS:
                    continue
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.timeout_s
                elif now > deadline:
                    raise TimeoutError(
                        f"rank {self.rank}: rank {i // (_LINE // 8)} did not reach shared-memory "
                        f"collective {call} within {self.timeout_s:g} s"
                    )
                pause = min(max(pause * 2, 2e-5), _MAX_PAUSE_S)
                time.sleep(pause)


def slot_path() -> Path:
    """A new file name: the creator's pid (see remove_orphans), then random."""
    return SHM_DIR / f"mpllama-{os.getpid()}-{secrets.token_hex(8)}"


def remove_orphans(min_age_s: float = 60.0) -> list[Path]:
    """Delete files whose creator is dead: a rank 0 killed between making its file and
    unlinking it (a few milliseconds) leaves one. Only files older than ``min_age_s``,
    so no handshake in progress loses its file; a file of another pid namespace that
    shares this /dev/shm could be taken for an orphan, and its gang would then fall
    back to Gloo, never fail."""
    removed = []
    for path in SHM_DIR.glob("mpllama-*-*"):
        pid = path.name.split("-")[1]
        try:
            old = time.time() - path.stat().st_mtime > min_age_s
        except OSError:
            continue
        if old and pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_bytes() -> int:
    return shutil.disk_usage(SHM_DIR).free
