"""The per-step engine. The lead rank owns a ``Runner``: requests wait in a queue, each
admitted one holds a KV-cache slot until it finishes, and every ``step()``

    retires aborted requests -> admits waiting ones into free slots -> prefills prompt
    chunks -> decodes one token for every running slot -> samples -> emits events.

The lead publishes each step as a ``Plan`` (a small integer tensor) before running it;
the other ranks ``follow``: they receive the plan and run the same forwards, deciding
nothing, so the ranks cannot drift apart. No Ray here: the caller moves requests in and
events out.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .config import SamplingParams
from .model import Transformer
from .protocol import Event, Request, check_request
from .sampling import LogitAdjuster, log_probs, next_tokens, top_log_probs
from .tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)

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


class Sequence:
    """One request from admission to retirement: its slot, what its slot caches, what it
    has generated, and the text it has shown."""

    def __init__(
        self, request: Request, tokenizer: Tokenizer, max_seq_len: int, device: torch.device
    ) -> None:
        self.request = request
        self.params: SamplingParams = request.params
        self.slot = -1
        self.cached = 0  # positions of its slot filled so far
        self.pending: int | None = None  # the last sampled token, fed at the next decode
        self.output: list[int] = []
        self.logprobs: list[float] = []
        self.budget = request.budget(max_seq_len)
        self.generator = (
            None if self.params.greedy else torch.Generator(device=device).manual_seed(request.seed)
        )
        self.decoder = IncrementalDecoder(tokenizer)
        # The model's stop ids (ignore_eos drops them), and the request's own, which stop
        # even with ignore_eos, as in vLLM.
        model_stops = frozenset() if self.params.ignore_eos else tokenizer.stop_ids
        self.stop_ids = model_stops | frozenset(self.params.stop_token_ids)
        self.adjuster = (
            LogitAdjuster(self.params, request.prompt_token_ids, self.stop_ids)
            if self.params.adjusts_logits
            else None
        )
        self.text = ""  # decoded so far (cut at a stop string once one appears)
        self.shown = 0  # characters of text already emitted
        self.finish_reason: str | None = None

    @property
    def prompt_left(self) -> int:
        return len(self.request.prompt_token_ids) - self.cached

    def advance(
        self, token: int, logprob: float | None, top: dict[int, float] | None = None
    ) -> Event:
        """Take one sampled token (its raw log-prob and the most likely tokens', when
        asked for); decide whether the request has finished."""
        token_offset, text_offset = len(self.output), self.shown
        params = self.params
        new: list[int] = []
        if token in self.stop_ids:
            self.finish_reason = "stop"  # a stop token ends the request and is not part of it
        else:
            new = [token]
            self.output.append(token)
            if logprob is not None:
                self.logprobs.append(logprob)
            if self.adjuster is not None:
                self.adjuster.add(token)
            before = len(self.text)
            self.text += self.decoder.add(token)
            # Stop strings, as stop ids, cannot end it before min_tokens (vLLM's rule).
            if params.stop and len(self.output) > params.min_tokens and self._stopped(before):
                self.finish_reason = "stop"
            elif len(self.output) >= self.budget:
                self.finish_reason = "length"
            else:
                self.pending = token
        if self.finish_reason is None:
            shown = len(self.text) - _held_back(self.text, params.stop)
        else:
            if not (params.stop and self.finish_reason == "stop" and new):
                self.text += self.decoder.flush()
            shown = len(self.text)
        piece = self.text[self.shown : shown]
        self.shown = max(self.shown, shown)
        return Event(
            self.request.id,
            new,
            ([logprob] if new else []) if params.logprobs else None,
            piece,
            token_offset,
            text_offset,
            self.finish_reason,
            top_logprobs=([top] if new and top is not None else [])
            if params.top_logprobs
            else None,
        )

    def _stopped(self, before: int) -> bool:
        """Cut the text at the first stop string, if the new text completed one. Only the
        tail can hold a new match: text before ``before`` was searched already."""
        hits = []
        for s in self.params.stop:
            i = self.text.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                hits.append(i)
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def finish(self, reason: str) -> Event:
        """End it without a token (an abort)."""
        self.finish_reason = reason
        return Event(self.request.id, [], None, "", len(self.output), self.shown, reason)


def _held_back(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string: they
    are not shown until the next tokens say whether the stop string completes."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


class Runner:
    """The lead rank's scheduler and step loop over ``slots`` KV-cache slots."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prefill_chunk_tokens: int,
        broadcast: Broadcast | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.slots = model.slots
        self.max_seq_len = model.max_seq_len
        self.chunk = prefill_chunk_tokens
        self.broadcast = broadcast
        self.free = list(range(self.slots))  # a heap: the lowest free slot first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.live: dict[str, Sequence] = {}
        self.inbox: list[Event] = []  # events made outside a step (errors, aborts)
        self.steps = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.inbox)

    def add(self, requests: Iterable[Request]) -> None:
        """Queue requests (first come, first served); bad ones finish with an error."""
        for request in requests:
            problem = check_request(request, self.max_seq_len, self.model.args.vocab_size)
            if problem is None and request.id in self.live:
                problem = f"request id {request.id!r} is already running"
            if problem is not None:
                self.inbox.append(Event(request.id, [], None, "", 0, 0, "error", problem))
                continue
            seq = Sequence(request, self.tokenizer, self.max_seq_len, self.model.device)
            self.live[request.id] = seq
            self.waiting.append(seq)

    def abort(self, ids: Iterable[str]) -> None:
        """Give up requests; their slots are free for the next step. Unknown ids (already
        finished, never seen) are ignored."""
        for rid in ids:
            seq = self.live.pop(rid, None)
            if seq is None:
                continue
            if seq.slot < 0:
                self.waiting.remove(seq)
            else:
                self._release(seq)
            self.inbox.append(seq.finish("abort"))

    def step(self) -> list[Event]:
        """One scheduling step; returns the events it made (possibly none)."""
        events, self.inbox = self.inbox, []
        plan, chunks = self._schedule()
        # In slot order: when the running slots are consecutive, each layer reads its
        # cache as a view instead of gathering it.
        decoding = sorted((s for s in self.running if s.pending is not None), key=_slot)
        for s in decoding:
            plan.dec_slots.append(s.slot)
            plan.dec_starts.append(s.cached)
            plan.dec_tokens.append(s.pending)  # type: ignore[arg-type]
        if not chunks and not decoding:
            return events
        parts = _parts(plan)
        publish(plan, self.slots, self.broadcast, parts.get("pf_tokens"))
        pf_logits, dec_logits = execute(self.model, parts)
        self.steps += 1

        rows: list[Sequence] = []
        picked: list[torch.Tensor] = []
        done_prompts = [i for i, (s, n) in enumerate(chunks) if s.prompt_left == n]
        for s, n in chunks:
            s.cached += n
        if done_prompts:
            rows += [chunks[i][0] for i in done_prompts]
            picked.append(pf_logits[done_prompts])  # type: ignore[index]
        for s in decoding:
            s.cached += 1
            s.pending = None
        if decoding:
            rows += decoding
            picked.append(dec_logits)  # type: ignore[arg-type]
        if rows:
            events += self._sample(rows, torch.cat(picked) if len(picked) > 1 else picked[0])
        return events

    def idle(self) -> None:
        """Tell the followers the lead is alive but has nothing to run."""
        publish(Plan(op=OP_IDLE), self.slots, self.broadcast)

    def stop(self) -> None:
        publish(Plan(op=OP_STOP), self.slots, self.broadcast)

    # ------------------------------------------------------------------ internals

    def _schedule(self) -> tuple[Plan, list[tuple[Sequence, int]]]:
        """Prompt chunks for this step, at most ``chunk`` tokens in all: prompts already
        being prefilled go first, then waiting requests take free slots in arrival order."""
        plan = Plan()
        chunks: list[tuple[Sequence, int]] = []
        budget = self.chunk
        for s in self.running:
            if budget > 0 and s.prompt_left > 0:
                chunks.append((s, min(s.prompt_left, budget)))
                budget -= chunks[-1][1]
        while budget > 0 and self.waiting and self.free:
            s = self.waiting.popleft()
            s.slot = heapq.heappop(self.free)
            self.running.append(s)
            chunks.append((s, min(s.prompt_left, budget)))
            budget -= chunks[-1][1]
        for s, n in chunks:
            plan.pf_slots.append(s.slot)
            plan.pf_starts.append(s.cached)
            plan.pf_tokens.append(s.request.prompt_token_ids[s.cached : s.cached + n])
        return plan, chunks

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[Event]:
        params = [s.params for s in rows]
        # Rows with penalties, logit_bias or min_tokens pick from an adjusted float32
        # copy; the others' logits are the same numbers (an exact upcast), so they pick
        # as they would alone. Log-probs stay the raw model distribution's.
        adjusted = logits
        if any(s.adjuster is not None for s in rows):
            adjusted = logits.to(torch.float32, copy=True)
            for row, s in enumerate(rows):
                if s.adjuster is not None:
                    s.adjuster.apply(adjusted[row])
        tokens = next_tokens(adjusted, params, [s.generator for s in rows]).tolist()
        # Log-probs for the rows that asked only: a log-softmax over 128k entries a row.
        lps: list[float | None] = [None] * len(rows)
        want = [i for i, p in enumerate(params) if p.logprobs]
        if want:
            index = torch.tensor(want, device=logits.device)
            picked = torch.tensor([tokens[i] for i in want], device=logits.device)
            for i, lp in zip(want, log_probs(logits[index], picked).tolist(), strict=True):
                lps[i] = lp
        tops: list[dict[int, float] | None] = [None] * len(rows)
        for i, p in enumerate(params):
            if p.top_logprobs:
                tops[i] = top_log_probs(logits[i], p.top_logprobs)
        events = []
        for s, token, lp, top in zip(rows, tokens, lps, tops, strict=True):
            events.append(s.advance(token, lp if s.params.logprobs else None, top))
            if s.finish_reason is not None:
                self.live.pop(s.request.id, None)
                self._release(s)
        return events

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        heapq.heappush(self.free, seq.slot)
        seq.slot = -1


def _slot(seq: Sequence) -> int:
    return seq.slot


def _parts(plan: Plan) -> dict[str, torch.Tensor]:
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
