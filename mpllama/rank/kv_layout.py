"""Where one forward's tokens sit in the KV block pool, and how attention reads them.

A ``CacheIndex`` is built once per forward from each row's block runs and shared by
every layer: the cache position each new token writes to, each row's positions as
segments, and the read plan (``pieces``: evenly spaced one-segment rows as one strided
view, the others one by one; or ``gather``, every row's positions gathered at once).
The caches it indexes are ``[positions, K, D]`` per layer, the last block a spare that
takes padding writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cpu_kernels import Segments


def row_segments(
    i: int, row: list[tuple[int, int]], end: int, block_size: int
) -> list[tuple[int, int]]:
    """Row ``i``'s positions 0..end-1 as (first cache position, count) segments, from its
    (first block, count) runs."""
    segs, covered = [], 0
    for first, count in row:
        if covered >= end:
            break
        n = min(count * block_size, end - covered)
        segs.append((first * block_size, n))
        covered += n
    if covered < end:
        raise ValueError(f"row {i}: blocks for {covered} positions, it needs {end}")
    return segs


def decode_positions(
    runs: list[list[tuple[int, int]]], starts: list[int], block_size: int
) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """For one new token per row at logical position ``starts[i]``: each row's segments
    (its positions with the new one) and the cache position the new token writes, as
    ``CacheIndex.build`` places them, without the tensors a general step needs."""
    segments, writes = [], []
    for i, (row, start) in enumerate(zip(runs, starts, strict=True)):
        segs = row_segments(i, row, start + 1, block_size)
        at = 0
        for first, n in segs:
            if start < at + n:
                writes.append(first + start - at)
                break
            at += n
        segments.append(segs)
    return segments, writes


@dataclass
class CacheIndex:
    """Where one forward's tokens sit, and where they go in every layer's KV cache."""

    shape: tuple[int, int]  # B rows of T tokens, padding included
    # Flat indices (in B*T) of the real tokens when some are padding: the projections
    # and the FFN, which cost nearly all the FLOPs, run on those alone.
    packed: torch.Tensor | None
    write_index: torch.Tensor  # [B,T] cache position of each new token (spare for padding)
    ends: list[int]  # per row: positions it reads, 0..end-1
    # Per row, its positions as (first cache position, count) segments, in order.
    segments: list[list[tuple[int, int]]]
    # Per row, its first cache position when it is one segment, else -1.
    firsts: list[int]
    spare: int  # the first position of the spare block, which padding writes and reads
    mask: torch.Tensor | None = None  # [B,1,T,S] True where a query may attend
    gather: torch.Tensor | None = None  # [B,S] cache positions, when rows are gathered
    # How attention reads the rows, in order: (lo, hi, S), rows lo..hi-1 as one view of
    # S positions each (evenly spaced one-segment rows), or one row on its own.
    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    # Or, for one new token per row: the segments for mpllama's CPU decode kernel.
    decode: Segments | None = None
    # Or, for prompts on a CPU: (lo, hi, n, S), rows lo..hi-1 attended in one call of
    # exactly their n new tokens over S positions (``own_pieces``).
    own: list[tuple[int, int, int, int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # per row: its first new position

    @staticmethod
    def build(
        shape: tuple[int, int],
        packed: torch.Tensor | None,
        runs: list[list[tuple[int, int]]],
        starts: list[int],
        ends: list[int],
        positions: torch.Tensor,
        real: torch.Tensor | None,
        block_size: int,
        num_blocks: int,
        device: torch.device,
    ) -> CacheIndex:
        B, T = shape
        spare = num_blocks * block_size
        bases = [0] * B  # cache position of logical position 0, for one-segment rows
        scattered: dict[int, list[int]] = {}  # the others: each new token's position
        segments = []
        for i, (row, start, end) in enumerate(zip(runs, starts, ends, strict=True)):
            segs = row_segments(i, row, end, block_size)
            segments.append(segs)
            if len(segs) == 1:
                bases[i] = segs[0][0]
            else:
                where, at = [], 0  # positions start..end-1, segment by segment
                for first, n in segs:
                    lo, hi = max(start, at), min(end, at + n)
                    if lo < hi:
                        where.extend(range(first + lo - at, first + hi - at))
                    at += n
                scattered[i] = where + [spare] * (T - len(where))
        # Padding (positions parked at 0 by the caller) writes to the spare block.
        write = torch.tensor(bases, device=device)[:, None] + positions
        if real is not None:
            write = torch.where(real, write, spare)
        for i, where in scattered.items():
            write[i] = torch.tensor(where, device=device)
        firsts = [segs[0][0] if len(segs) == 1 else -1 for segs in segments]
        return CacheIndex(shape, packed, write, ends, segments, firsts, spare, starts=starts)

    @property
    def strided(self) -> bool:
        """Whether every row is read through one strided view."""
        return len(self.pieces) == 1 and self.shape[0] > 1

    def read_pieces(self, pays: Callable[[list[int]], bool]) -> list[tuple[int, int, int]]:
        """Group consecutive one-segment rows whose segments are evenly spaced (rows
        admitted together, placed in runs of the same size) into one view each, where
        ``pays(ends)`` says reading them together pays; every other row alone."""
        pieces: list[tuple[int, int, int]] = []
        lo = 0
        while lo < self.shape[0]:
            hi = self._strided_run(lo, lambda row: True)
            if hi - lo > 1 and not pays(self.ends[lo:hi]):
                hi = lo + 1
            pieces.append((lo, hi, max(self.ends[lo:hi])))
            lo = hi
        return pieces

    def own_pieces(self) -> list[tuple[int, int, int, int]]:
        """Rows attended each as it would be alone: (lo, hi, n, S) for rows lo..hi-1 that
        have the same n new tokens from the same position (so the same S = start + n
        positions to read) and sit evenly spaced, one segment each, read as one strided
        view; every other row on its own. A call's shape then depends on its rows alone:
        padded beside longer rows, SDPA's blocking moves with the padded shape and the
        row's result with it (session 15: 1e-6 of a log-prob in float32, 0.1-0.8% in
        bf16, and greedy tokens parted). Rows of one shape in one call give each row what
        it gets alone (SDPA on a CPU splits its work by row and head)."""
        pieces: list[tuple[int, int, int, int]] = []
        lo = 0
        while lo < self.shape[0]:
            shape = (self.starts[lo], self.ends[lo])
            hi = self._strided_run(
                lo, lambda row, shape=shape: (self.starts[row], self.ends[row]) == shape
            )
            pieces.append((lo, hi, self.ends[lo] - self.starts[lo], self.ends[lo]))
            lo = hi
        return pieces

    def _strided_run(self, lo: int, joins: Callable[[int], bool]) -> int:
        """Where the run of rows from ``lo`` ends: one-segment rows, each after ``lo`` one
        that ``joins`` accepts, whose segments are evenly spaced, so that one strided view
        as long as the run's longest row reads them all without passing the spare block
        (``view``)."""
        B, hi = self.shape[0], lo + 1
        if self.firsts[lo] < 0:
            return hi
        stride = -1
        while hi < B and self.firsts[hi] >= 0 and joins(hi):
            step = self.firsts[hi] - self.firsts[hi - 1]
            S = max(self.ends[lo : hi + 1])
            if step <= 0 or stride not in (-1, step):
                break
            if self.firsts[lo] + (hi - lo) * step + S > self.spare:
                break
            stride, hi = step, hi + 1
        return hi

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B,T,F] -> the real tokens, [N,F] (or [B,T,F] as it is when none is padding)."""
        if self.packed is None:
            return x
        return x.reshape(-1, x.shape[-1])[self.packed]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``pack``: [N,F] -> [B,T,F], zeros where the padding was."""
        if self.packed is None:
            return x
        B, T = self.shape
        out = x.new_zeros(B * T, x.shape[-1])
        out[self.packed] = x
        return out.view(B, T, -1)

    def view(self, cache: torch.Tensor, lo: int, hi: int, S: int) -> torch.Tensor:
        """[hi-lo,K,S,D]: rows lo..hi-1's positions up to S, a view of the cache [P,K,D]
        (one evenly spaced segment each, see ``read_pieces``); one row alone is a view
        of its own positions, or its segments gathered."""
        _, K, D = cache.shape
        base = cache.storage_offset()
        if hi - lo == 1:
            # as_strided: a third of what slicing costs, which counts at one call per
            # row, layer and tensor.
            parts = [
                cache.as_strided((1, K, n, D), (n * K * D, D, K * D, 1), base + first * K * D)
                for first, n in self.segments[lo]
            ]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        stride = self.firsts[lo + 1] - self.firsts[lo]
        return cache.as_strided(
            (hi - lo, K, S, D), (stride * K * D, D, K * D, 1), base + self.firsts[lo] * K * D
        )

    def gather_index(self, S: int, device: torch.device) -> torch.Tensor:
        """[B,S]: each row's cache positions up to S. Past its end a row reads whatever
        follows (masked), or the spare block's first position."""
        index = torch.arange(S, device=device).repeat(len(self.ends), 1)
        firsts = [segs[0][0] if len(segs) == 1 else 0 for segs in self.segments]
        index += torch.tensor(firsts, device=device)[:, None]
        index.clamp_(max=self.spare)
        for i, (segs, end) in enumerate(zip(self.segments, self.ends, strict=True)):
            if len(segs) > 1:
                row = [p for first, n in segs for p in range(first, first + n)]
                index[i] = torch.tensor(row + [self.spare] * (S - end), device=device)
        return index
