"""The per-step engine. The lead rank owns a ``Runner``: requests wait in a queue, each
admitted one holds a KV-cache slot until it finishes, and every ``step()``

    retires aborted requests -> admits waiting ones into free slots -> prefills prompt
    chunks -> decodes one token for every running slot -> samples -> emits events.

The lead publishes each step as a ``Plan`` (``step_plan``) before running it; the other
ranks follow it. A request's own state lives in its ``Sequence``. No Ray here: the caller
moves requests in and events out.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable

import torch

from ..protocol import Event, Request, check_request
from ..tokenizer import Tokenizer
from .constrain import Grammars
from .model import Transformer
from .sampling import greedy, log_probs, next_tokens, top_log_probs
from .sequence import Sequence
from .step_plan import OP_IDLE, OP_STOP, Broadcast, Plan, execute, lead_parts, publish


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
        self.grammars = Grammars(tokenizer, model.args.vocab_size)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.inbox)

    def add(self, requests: Iterable[Request]) -> None:
        """Queue requests (first come, first served); bad ones finish with an error."""
        for request in requests:
            problem = check_request(request, self.max_seq_len, self.model.args.vocab_size)
            if problem is None and request.id in self.live:
                problem = f"request id {request.id!r} is already running"
            guide = None
            if problem is None and request.params.guided is not None:
                try:
                    guide = self.grammars.matcher(request.params.guided)
                except ValueError as exc:
                    problem = str(exc)
            if problem is not None:
                self.inbox.append(Event(request.id, [], None, "", 0, 0, "error", problem))
                continue
            seq = Sequence(request, self.tokenizer, self.max_seq_len, self.model.device, guide)
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
        # The rows sampled this step: prompts this step completes, then every decode.
        done_prompts = [i for i, (s, n) in enumerate(chunks) if s.prompt_left == n]
        rows = [chunks[i][0] for i in done_prompts] + decoding
        guides = [s.guide for s in rows if s.guide is not None]
        masks = self.grammars.submit(guides) if guides else None  # while the forward runs
        parts = lead_parts(plan)
        publish(plan, self.slots, self.broadcast, parts.get("pf_tokens"))
        pf_logits, dec_logits = execute(self.model, parts)
        self.steps += 1

        picked: list[torch.Tensor] = []
        for s, n in chunks:
            s.cached += n
        if done_prompts:
            picked.append(pf_logits[done_prompts])  # type: ignore[index]
        for s in decoding:
            s.cached += 1
            s.pending = None
        if decoding:
            picked.append(dec_logits)  # type: ignore[arg-type]
        if rows:
            logits = torch.cat(picked) if len(picked) > 1 else picked[0]
            events += self._sample(rows, logits, masks.result() if masks else None)
        return events

    def idle(self) -> None:
        """Tell the followers the lead is alive but has nothing to run."""
        publish(Plan(op=OP_IDLE), self.slots, self.broadcast)

    def stop(self) -> None:
        publish(Plan(op=OP_STOP), self.slots, self.broadcast)
        self.grammars.close()

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

    def _sample(
        self, rows: list[Sequence], logits: torch.Tensor, masks: torch.Tensor | None
    ) -> list[Event]:
        params = [s.params for s in rows]
        tokens = self._pick(rows, logits, masks)
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
                s.guide = None
                self.live.pop(s.request.id, None)
                self._release(s)
        return events

    def _pick(
        self, rows: list[Sequence], logits: torch.Tensor, masks: torch.Tensor | None
    ) -> list[int]:
        """The next token of every row. Rows with penalties, logit_bias, min_tokens or a
        grammar (``masks``: one additive row per guided row, in order) pick from a float32
        copy of their logits, adjusted; the others from the model's logits untouched, so
        they pick exactly as they would alone. Log-probs stay the raw distribution's."""
        params = [s.params for s in rows]
        generators = [s.generator for s in rows]
        special = [i for i, s in enumerate(rows) if s.adjuster is not None or s.guide is not None]
        if not special:
            return next_tokens(logits, params, generators).tolist()
        if masks is not None and len(masks) == len(special):
            # Every special row is guided: its mask row (0 or MASKED, float32, ours) takes
            # the logits in place, saving a [rows, V] copy (1.4 ms at 32 x 128k).
            adjusted = masks.to(logits.device)
            for row, i in zip(adjusted, special, strict=True):
                row.add_(logits[i])
        else:
            adjusted = logits[special].float()  # a copy: indexing copies
            guided = 0
            for row, i in zip(adjusted, special, strict=True):
                if rows[i].guide is not None:
                    assert masks is not None
                    row.add_(masks[guided].to(row.device))
                    guided += 1
        # The mask first: allowed entries gain exactly 0, so the adjustments see the raw
        # values there; masked ones stay near MASKED whatever a penalty does to them.
        for row, i in zip(adjusted, special, strict=True):
            if rows[i].adjuster is not None:
                rows[i].adjuster.apply(row)
        tokens = [0] * len(rows)
        picks = next_tokens(
            adjusted, [params[i] for i in special], [generators[i] for i in special]
        )
        for i, token in zip(special, picks.tolist(), strict=True):
            tokens[i] = token
        plain = sorted(set(range(len(rows))) - set(special))
        if plain and all(params[i].greedy for i in plain):
            best = greedy(logits).tolist()  # one argmax over every row beats a copy
            for i in plain:
                tokens[i] = best[i]
        elif plain:
            picks = next_tokens(
                logits[plain], [params[i] for i in plain], [generators[i] for i in plain]
            )
            for i, token in zip(plain, picks.tolist(), strict=True):
                tokens[i] = token
        return tokens

    def _release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        heapq.heappush(self.free, seq.slot)
        seq.slot = -1


def _slot(seq: Sequence) -> int:
    return seq.slot
