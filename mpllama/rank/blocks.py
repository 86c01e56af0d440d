"""Where every running sequence's KV lives: a pool of fixed-size blocks, and the prefix
cache over them. The lead's alone: followers are told the outcome in the step batch.

* A sequence holds a list of blocks (its block table, logical order). Blocks come at
  admission for the whole prompt, and one at a time as it decodes past the last one.
* Full blocks are named by a hash of (the previous block's hash, the block's tokens), so
  a name stands for the whole prefix up to it. A named block whose sequence ended keeps
  its KV and its name until its memory is needed (least recently used first); a new
  sequence whose prompt starts with named blocks takes them instead of computing them.
* Blocks are reference-counted: several sequences can share a prefix block. Only full
  blocks are ever shared, and a sequence writes only past its shared blocks.
* Contiguity is a hint: a sequence is placed where a run of free blocks can hold its
  prompt and what it may generate (``reserve``), and grows into the block after its last
  one when that is free, so its KV usually sits in one run that attention reads as a
  view. Under memory pressure any free block will do, and attention gathers.

No torch: plain integers, so the bookkeeping costs microseconds a step.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b

_FREE = b"\x01"


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block: its tokens and, through ``parent``, every token before."""
    return blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockTable:
    """One sequence's blocks: ``blocks`` in logical order (kept as runs of consecutive
    physical blocks too, so a step's layout costs a few runs, not one entry per block),
    ``hashes`` the names of the first ``len(hashes)`` (full, computed) ones, the run it
    was placed in, and its prompt's names while it waits (worked out once)."""

    __slots__ = ("blocks", "hashes", "reserved", "_runs", "chain")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.hashes: list[bytes] = []
        self.reserved = (0, 0)  # [first, end) blocks kept free for it where possible
        self._runs: list[list[int]] = []  # [first, count] runs of self.blocks
        self.chain: tuple[int, list[bytes]] | None = None  # (tokens, their block names)

    def add(self, blocks: list[int]) -> None:
        for b in blocks:
            self.blocks.append(b)
            if self._runs and self._runs[-1][0] + self._runs[-1][1] == b:
                self._runs[-1][1] += 1
            else:
                self._runs.append([b, 1])

    def clear(self) -> None:
        self.blocks, self.hashes, self.reserved, self._runs = [], [], (0, 0), []

    def runs(self, positions: int, block_size: int) -> list[tuple[int, int]]:
        """(first block, blocks) runs of consecutive physical blocks covering the first
        ``positions`` positions."""
        need = -(-positions // block_size)
        out: list[tuple[int, int]] = []
        for first, count in self._runs:
            if need <= 0:
                break
            out.append((first, min(count, need)))
            need -= count
        return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need blocks and a block size, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self.name: list[bytes | None] = [None] * num_blocks
        self.named: dict[bytes, int] = {}  # name -> block holding that prefix's KV
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named, unused; LRU first
        # 1 where a block is unused and unnamed; ``open`` also excludes reserved runs.
        self.empty = bytearray(_FREE * num_blocks)
        self.open = bytearray(_FREE * num_blocks)
        self.empties = num_blocks
        self.hit_tokens = 0  # prompt tokens found in the cache
        self.query_tokens = 0  # prompt tokens looked up

    # ------------------------------------------------------------------ state

    @property
    def free(self) -> int:
        """Blocks a sequence could take now (empty, or named and evictable)."""
        return self.empties + len(self.evictable)

    @property
    def used(self) -> int:
        return self.num_blocks - self.free

    def stats(self) -> dict[str, int | float]:
        return {
            "kv_blocks": self.num_blocks,
            "kv_block_size": self.block_size,
            "kv_blocks_used": self.used,
            "kv_blocks_cached": len(self.named),
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_query_tokens": self.query_tokens,
        }

    # ------------------------------------------------------------------ sequences

    def admit(
        self,
        table: BlockTable,
        tokens: Callable[[int, int], list[int]],
        n: int,
        reserve: int,
    ) -> int | None:
        """Give a new (or preempted) sequence the blocks for its prompt, ``n`` tokens
        (``tokens(lo, hi)``: those at positions lo..hi-1): the longest named prefix, then
        fresh blocks, placed in a run of ``reserve`` blocks where one is free. Returns how
        many positions are cached already, or None (and takes nothing) when the pool
        cannot hold it now."""
        bs = self.block_size
        hits: list[int] = []
        names: list[bytes] = []
        redo = -1
        if self.prefix_caching:
            if table.chain is None or table.chain[0] != n:
                chain, parent = [], b""
                for i in range(n // bs):
                    parent = block_hash(parent, tokens(i * bs, (i + 1) * bs))
                    chain.append(parent)
                table.chain = (n, chain)
            for name in table.chain[1]:
                block = self.named.get(name)
                if block is None:
                    break
                hits.append(block)
                names.append(name)
            if len(hits) * bs == n:
                # A prompt cached whole still needs its last token run for its logits:
                # recompute the last block rather than write into a shared one (into
                # that very block when nobody uses it: the KV stays one run).
                redo = hits.pop()
                names.pop()
        need = -(-n // bs) - len(hits)
        revived = sum(1 for b in hits if self.refs[b] == 0)
        if need > self.free - revived:
            return None
        for b in hits:
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1
        if redo >= 0 and self.refs[redo] == 0:
            del self.evictable[redo]
            self._unname(redo)
            self._put(redo)  # an empty block, right after the hits
        table.clear()
        table.chain = None
        table.add(hits)
        table.hashes = names
        # Where its new blocks go, so its KV stays one run that attention reads as a view:
        # right after its cached prefix, else a run with room for what it may generate,
        # else wherever blocks are (cached ones evicted least recently used first: a
        # cached prefix is worth more than contiguity).
        after = hits[-1] + 1 if hits else -1
        if (
            need
            and 0 <= after
            and after + need <= self.num_blocks
            and all(self.empty[after : after + need])
        ):
            table.add([self._take(b) for b in range(after, after + need)])
        elif need and (first := self._find_run(max(need, reserve))) is not None:
            table.reserved = (first, first + max(need, reserve))
            self.open[first : first + max(need, reserve)] = bytes(max(need, reserve))
            table.add([self._take(b) for b in range(first, first + need)])
        else:
            table.add([self._take_any() for _ in range(need)])
        if self.prefix_caching:
            self.query_tokens += n
            self.hit_tokens += len(hits) * bs
        return len(hits) * bs

    def grow(self, table: BlockTable, positions: int) -> bool:
        """Make room for ``positions`` positions, a block at a time (the block after the
        last where it is free). False, taking nothing, when the pool is out of blocks."""
        while len(table.blocks) * self.block_size < positions:
            after = table.blocks[-1] + 1 if table.blocks else -1
            if 0 <= after < self.num_blocks and self.empty[after]:
                table.add([self._take(after)])
            elif self.free:
                table.add([self._take_any()])
            else:
                return False
        return True

    def name_full_blocks(
        self, table: BlockTable, tokens: Callable[[int, int], list[int]], computed: int
    ) -> None:
        """Name the blocks that ``computed`` positions fill (``tokens(lo, hi)``: the tokens
        at positions lo..hi-1), so later prompts can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while (len(table.hashes) + 1) * bs <= computed:
            i = len(table.hashes)
            name = block_hash(table.hashes[-1] if i else b"", tokens(i * bs, (i + 1) * bs))
            table.hashes.append(name)
            block = table.blocks[i]
            if name not in self.named and self.name[block] is None:
                self.named[name] = block
                self.name[block] = name

    def release(self, table: BlockTable) -> None:
        """A sequence ended or was preempted: its unnamed blocks are free, its named ones
        stay cached (the tail's first to go, so prefixes outlive their continuations)."""
        for b in reversed(table.blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.name[b] is not None:
                    self.evictable[b] = None
                else:
                    self._put(b)
        first, end = table.reserved
        for b in range(first, end):
            if self.empty[b]:
                self.open[b] = 1
        table.clear()

    # ------------------------------------------------------------------ blocks

    def _find_run(self, n: int) -> int | None:
        """The first run of ``n`` empty blocks: not reserved for anyone, else anywhere."""
        for where in (self.open, self.empty):
            i = where.find(_FREE * n)
            if i >= 0:
                return i
        return None

    def _take(self, b: int) -> int:
        assert self.empty[b] and self.refs[b] == 0
        self.empty[b] = self.open[b] = 0
        self.empties -= 1
        self.refs[b] = 1
        return b

    def _take_any(self) -> int:
        """An empty block (the first), else the least recently used named one."""
        b = self.open.find(_FREE)
        if b < 0:
            b = self.empty.find(_FREE)
        if b >= 0:
            self._take(b)
            return b
        b, _ = self.evictable.popitem(last=False)
        self._unname(b)
        self.refs[b] = 1
        return b

    def _unname(self, b: int) -> None:
        """Forget the KV of a cached block nobody uses (already out of ``evictable``)."""
        name = self.name[b]
        assert name is not None and self.refs[b] == 0
        del self.named[name]
        self.name[b] = None

    def _put(self, b: int) -> None:
        self.empty[b] = self.open[b] = 1
        self.empties += 1
