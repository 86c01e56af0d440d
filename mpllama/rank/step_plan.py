"""What the lead tells the other ranks each step, and what every rank runs from it.

The lead writes each step as a ``StepBatch``: prompt chunks for some sequences, one token
for others, and for every row where its KV blocks are. It is broadcast over
torch.distributed as a fixed-size integer header (and, when there are prompt chunks or
more block runs than the header holds, a second tensor); the other ranks ``follow``:
they receive the same ``StepBatch`` and run the same forwards (``execute``), deciding
nothing, so the ranks cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .model import Transformer

# Sends the lead's tensor to every rank and returns the lead's value (in place).
Broadcast = Callable[[torch.Tensor], torch.Tensor]

OP_IDLE, OP_STEP, OP_STOP = 0, 1, 2
_HEAD = 5  # op, prefill rows, prefill width, decode rows, block-run ints

Runs = list[tuple[int, int]]  # a row's blocks: (first physical block, count) runs


@dataclass
class StepBatch:
    """One step's forwards. Prefill rows take a chunk of their prompt from position
    ``pf_starts[i]``; decode rows take one token at ``dec_starts[i]``. Every row's
    ``runs`` cover the positions it reads and writes."""

    op: int = OP_STEP
    pf_starts: list[int] = field(default_factory=list)
    pf_tokens: list[list[int]] = field(default_factory=list)  # the chunks (ragged)
    pf_runs: list[Runs] = field(default_factory=list)
    dec_starts: list[int] = field(default_factory=list)
    dec_tokens: list[int] = field(default_factory=list)
    dec_runs: list[Runs] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.pf_tokens and not self.dec_tokens

    # Wire format, for at most ``rows`` rows of each kind: a header of
    #   [op, n_pf, width, n_dec, n_run_ints,
    #    pf starts, pf lengths, dec starts, dec tokens (``rows`` ints each),
    #    runs per row (2 * ``rows``: prefill rows, then decode rows),
    #    run ints (first, count, ...; 4 * ``rows`` fit here)]
    # and, when there are prompt chunks or more run ints than fit, a body of the chunks
    # (n_pf x width, padded) followed by every run int.
    @staticmethod
    def header_size(rows: int) -> int:
        return _HEAD + 10 * rows

    def encode(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        runs = self.pf_runs + self.dec_runs
        flat = [x for row in runs for run in row for x in run]
        width = max((len(t) for t in self.pf_tokens), default=0)
        head = [self.op, len(self.pf_tokens), width, len(self.dec_tokens), len(flat)]
        out = torch.zeros(self.header_size(rows), dtype=torch.long)
        out[:_HEAD] = torch.tensor(head)
        blocks = (
            self.pf_starts,
            [len(t) for t in self.pf_tokens],
            self.dec_starts,
            self.dec_tokens,
        )
        for i, values in enumerate(blocks):
            if values:
                start = _HEAD + i * rows
                out[start : start + len(values)] = torch.tensor(values)
        counts = [len(r) for r in self.pf_runs] + [0] * (rows - len(self.pf_runs))
        counts += [len(r) for r in self.dec_runs]
        out[_HEAD + 4 * rows : _HEAD + 4 * rows + len(counts)] = torch.tensor(counts)
        body = []
        if self.pf_tokens:
            body += [x for t in self.pf_tokens for x in t + [0] * (width - len(t))]
        if len(flat) <= 4 * rows:
            if flat:
                out[_HEAD + 6 * rows : _HEAD + 6 * rows + len(flat)] = torch.tensor(flat)
        else:
            body += flat
        return out, (torch.tensor(body, dtype=torch.long) if body else None)

    @staticmethod
    def decode(
        head: torch.Tensor, rows: int, read_body: Callable[[int], torch.Tensor]
    ) -> StepBatch:
        op, n_pf, width, n_dec, n_flat = head[:_HEAD].tolist()
        values = head[_HEAD:].tolist()
        block = [values[i * rows : (i + 1) * rows] for i in range(4)]
        counts = values[4 * rows : 6 * rows]
        body_len = n_pf * width + (n_flat if n_flat > 4 * rows else 0)
        body = read_body(body_len).tolist() if body_len else []
        if n_flat <= 4 * rows:
            flat = values[6 * rows : 6 * rows + n_flat]
        else:
            flat = body[n_pf * width :]
        lens = block[1][:n_pf]
        pf_tokens = [body[i * width : i * width + n] for i, n in enumerate(lens)]
        runs: list[Runs] = []
        at = 0
        for n in counts[:n_pf] + counts[rows : rows + n_dec]:
            runs.append([(flat[at + 2 * j], flat[at + 2 * j + 1]) for j in range(n)])
            at += 2 * n
        return StepBatch(
            op,
            block[0][:n_pf],
            pf_tokens,
            runs[:n_pf],
            block[2][:n_dec],
            block[3][:n_dec],
            runs[n_pf:],
        )


def publish(batch: StepBatch, rows: int, broadcast: Broadcast | None) -> None:
    """Send ``batch`` to the followers (nothing to do without any)."""
    if broadcast is None:
        return
    head, body = batch.encode(rows)
    broadcast(head)
    if body is not None:
        broadcast(body)


def receive(rows: int, broadcast: Broadcast) -> StepBatch:
    """A follower's half of ``publish``."""
    head = broadcast(torch.zeros(StepBatch.header_size(rows), dtype=torch.long))
    return StepBatch.decode(head, rows, lambda n: broadcast(torch.zeros(n, dtype=torch.long)))


def execute(
    model: Transformer, batch: StepBatch
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run a step's forwards on this rank: the prompt chunks, then the decode tokens.

    Returns logits [n_pf,V] at each chunk's last real token and [n_dec,V], or None;
    always None on a follower, which never receives the logits (only the lead samples).
    """
    device = model.device
    pf = dec = None
    if batch.pf_tokens:
        width = max(len(t) for t in batch.pf_tokens)
        tokens = torch.tensor([t + [0] * (width - len(t)) for t in batch.pf_tokens])
        lens = torch.tensor([len(t) for t in batch.pf_tokens], device=device)
        pf = model(
            tokens.to(device),
            torch.tensor(batch.pf_starts, device=device),
            batch.pf_runs,
            lengths=lens,
            logits_at=lens - 1,
        )
    if batch.dec_tokens:
        dec = model.decode(batch.dec_tokens, batch.dec_starts, batch.dec_runs)
    return pf, dec


def follow(model: Transformer, rows: int, broadcast: Broadcast) -> None:
    """A follower rank's loop: run whatever the lead publishes, until it says stop."""
    while True:
        batch = receive(rows, broadcast)
        if batch.op == OP_STOP:
            return
        if batch.op == OP_STEP:
            execute(model, batch)
