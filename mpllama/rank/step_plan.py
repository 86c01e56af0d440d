"""What the lead tells the other ranks each step, and what every rank runs from it.

The lead publishes each step as a ``Plan``: a fixed-size integer header (and, when there
are prompt chunks, their tokens), broadcast over torch.distributed. The other ranks
``follow``: they receive the plan and run the same forwards (``execute``), deciding
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
_HEAD = 4  # op, prefill rows, prefill width, decode rows


@dataclass
class Plan:
    """One step's forwards: prompt chunks for some slots, one token for others."""

    op: int = OP_STEP
    pf_slots: list[int] = field(default_factory=list)
    pf_starts: list[int] = field(default_factory=list)  # first position of each chunk
    pf_tokens: list[list[int]] = field(default_factory=list)  # the chunks (ragged)
    dec_slots: list[int] = field(default_factory=list)
    dec_starts: list[int] = field(default_factory=list)  # the position each token goes to
    dec_tokens: list[int] = field(default_factory=list)

    # Wire format: one fixed-size header [op, n_pf, width, n_dec, then six blocks of
    # `slots` ints: pf slots, pf starts, pf lengths, dec slots, dec starts, dec tokens],
    # and, only when there are prompt chunks, a second tensor of n_pf x width tokens.
    def header(self, slots: int) -> torch.Tensor:
        out = torch.zeros(_HEAD + 6 * slots, dtype=torch.long)
        width = max((len(t) for t in self.pf_tokens), default=0)
        out[:_HEAD] = torch.tensor([self.op, len(self.pf_slots), width, len(self.dec_slots)])
        blocks = (
            self.pf_slots,
            self.pf_starts,
            [len(t) for t in self.pf_tokens],
            self.dec_slots,
            self.dec_starts,
            self.dec_tokens,
        )
        for i, values in enumerate(blocks):
            if values:
                start = _HEAD + i * slots
                out[start : start + len(values)] = torch.tensor(values)
        return out

    def body(self) -> torch.Tensor:
        width = max(len(t) for t in self.pf_tokens)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.pf_tokens])


def publish(
    plan: Plan, slots: int, broadcast: Broadcast | None, body: torch.Tensor | None = None
) -> None:
    """Send ``plan`` to the followers; ``body`` is ``plan.body()`` when the caller has
    made it already."""
    if broadcast is None:
        return
    broadcast(plan.header(slots))
    if plan.pf_tokens:
        broadcast((plan.body() if body is None else body).flatten())


def receive(slots: int, broadcast: Broadcast) -> tuple[int, dict[str, torch.Tensor]]:
    """A follower's half of ``publish``: the op and the step's tensors."""
    head = broadcast(torch.zeros(_HEAD + 6 * slots, dtype=torch.long))
    op, n_pf, width, n_dec = head[:_HEAD].tolist()
    block = [head[_HEAD + i * slots : _HEAD + (i + 1) * slots] for i in range(6)]
    parts = {
        "pf_slots": block[0][:n_pf],
        "pf_starts": block[1][:n_pf],
        "pf_lens": block[2][:n_pf],
        "dec_slots": block[3][:n_dec],
        "dec_starts": block[4][:n_dec],
        "dec_tokens": block[5][:n_dec],
    }
    if n_pf:
        parts["pf_tokens"] = broadcast(torch.zeros(n_pf * width, dtype=torch.long)).view(
            n_pf, width
        )
    return op, parts


def execute(
    model: Transformer, parts: dict[str, torch.Tensor]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run a step's forwards on this rank: the prompt chunks, then the decode tokens.

    Returns logits [n_pf,V] at each chunk's last real token and [n_dec,V], or None;
    always None on a follower, which never receives the logits (only the lead samples).
    """
    device = model.device
    pf = dec = None
    if "pf_tokens" in parts:
        lens = parts["pf_lens"].to(device)
        pf = model(
            parts["pf_tokens"].to(device),
            parts["pf_slots"].to(device),
            parts["pf_starts"].to(device),
            lengths=lens,
            logits_at=lens - 1,
        )
    if len(parts["dec_slots"]):
        dec = model(
            parts["dec_tokens"].to(device)[:, None],
            parts["dec_slots"].to(device),
            parts["dec_starts"].to(device),
            logits_at=torch.zeros_like(parts["dec_slots"], device=device),
        )
    return pf, dec


def follow(model: Transformer, broadcast: Broadcast) -> None:
    """A follower rank's loop: run whatever the lead publishes, until it says stop."""
    while True:
        op, parts = receive(model.slots, broadcast)
        if op == OP_STOP:
            return
        if op == OP_STEP:
            execute(model, parts)


def lead_parts(plan: Plan) -> dict[str, torch.Tensor]:
    """The lead's own copy of what ``receive`` gives a follower."""
    parts = {
        "pf_slots": torch.tensor(plan.pf_slots, dtype=torch.long),
        "pf_starts": torch.tensor(plan.pf_starts, dtype=torch.long),
        "pf_lens": torch.tensor([len(t) for t in plan.pf_tokens], dtype=torch.long),
        "dec_slots": torch.tensor(plan.dec_slots, dtype=torch.long),
        "dec_starts": torch.tensor(plan.dec_starts, dtype=torch.long),
        "dec_tokens": torch.tensor(plan.dec_tokens, dtype=torch.long),
    }
    if plan.pf_tokens:
        parts["pf_tokens"] = plan.body()
    return parts
