"""Who runs this step: the lead's scheduler over waiting and running sequences.

Each ``schedule()``

1. gives every decoding sequence room for its next position; when the pool is out of
   blocks it preempts the most recently admitted running sequence (its blocks are freed,
   its named ones stay cached, and it waits at the front of the queue to be recomputed),
2. continues the prompt chunks of sequences being prefilled,
3. admits waiting sequences in arrival order while the chunk budget, ``max_running`` and
   the pool allow, each reusing the longest cached prefix of its prompt,

and returns the step's ``StepBatch`` with the sequences in it. Where their KV lives is
the ``BlockManager``'s business; the forwards are the runner's.
"""

from __future__ import annotations

from collections import deque

from .blocks import BlockManager
from .sequence import Sequence
from .step_plan import StepBatch


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_running: int, chunk: int, max_seq_len: int
    ) -> None:
        self.blocks = blocks
        self.max_running = max_running
        self.chunk = chunk
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """An aborted or finished sequence leaves, freeing its blocks."""
        if seq.running:
            self.running.remove(seq)
            self.blocks.release(seq.table)
            seq.running = False
        else:
            self.waiting.remove(seq)

    def schedule(self) -> tuple[StepBatch, list[tuple[Sequence, int]], list[Sequence]]:
        """This step's batch, its prompt chunks (sequence, tokens) and decode rows."""
        bs = self.blocks.block_size
        decoding: list[Sequence] = []
        for s in list(self.running):  # oldest first: preemption takes the newest
            if not s.running or s.pending is None or s.fill_left:
                continue  # preempted just now, or still prefilling (a recomputed one too)
            while not self.blocks.grow(s.table, s.cached + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is s:
                    break
            else:
                decoding.append(s)
        chunks: list[tuple[Sequence, int]] = []
        budget = self.chunk
        for s in self.running:
            if budget > 0 and s.fill_left > 0:
                budget -= self._chunk(s, min(s.fill_left, budget), chunks)
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            s = self.waiting[0]
            reserve = -(-min(self.max_seq_len, len(s.request.prompt_token_ids) + s.budget) // bs)
            cached = self.blocks.admit(s.table, s.tokens, s.fill, reserve)
            if cached is None:
                break  # first come, first served: nobody overtakes it
            self.waiting.popleft()
            s.cached, s.running = cached, True
            self.running.append(s)
            budget -= self._chunk(s, min(s.fill_left, budget), chunks)
        batch = StepBatch()
        for s, n in chunks:
            batch.pf_starts.append(s.cached)
            batch.pf_tokens.append(s.tokens(s.cached, s.cached + n))
            batch.pf_runs.append(s.table.runs(s.cached + n, bs))
        # In block order: evenly spaced rows read their KV as one strided view.
        decoding.sort(key=lambda s: s.table.blocks[0])
        for s in decoding:
            batch.dec_starts.append(s.cached)
            batch.dec_tokens.append(s.pending)  # type: ignore[arg-type]
            batch.dec_runs.append(s.table.runs(s.cached + 1, bs))
        return batch, chunks, decoding

    def _chunk(self, s: Sequence, n: int, chunks: list[tuple[Sequence, int]]) -> int:
        """Schedule ``n`` tokens of ``s``'s fill. The blocks they fill are named at once: a
        sequence admitted later in this step may share them, since every row's KV is
        written before any row's attention reads it."""
        chunks.append((s, n))
        self.blocks.name_full_blocks(s.table, s.tokens, s.cached + n)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.running, seq.cached = False, 0
        self.waiting.appendleft(seq)
        self.preemptions += 1
