"""The per-step engine on the lead rank. A ``Runner`` ties the parts together: every
``step()``

    schedules (``Scheduler``: who runs, over the ``BlockManager``'s KV blocks) ->
    publishes the ``StepBatch`` to the followers -> runs the forwards (``execute``) ->
    samples the rows whose prompt completed and every decode row -> emits events.

A request's own state lives in its ``Sequence``. No Ray here: the caller moves requests
in and events out.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..protocol import Event, Request, check_request
from ..tokenizer import Tokenizer
from .blocks import BlockManager
from .constrain import Grammars
from .model import Transformer
from .sampling import greedy, log_probs, next_tokens, top_log_probs
from .scheduler import Scheduler
from .sequence import Sequence
from .step_plan import OP_IDLE, OP_STOP, Broadcast, StepBatch, execute, publish


class Runner:
    """The lead rank's step loop over at most ``max_running`` sequences at once (default:
    the model's ``setup_slots`` slots, else one per block), whose KV lives in the model's
    block pool."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prefill_chunk_tokens: int,
        broadcast: Broadcast | None = None,
        max_running: int | None = None,
        prefix_caching: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = model.max_seq_len
        self.max_running = max_running or model.slots or model.num_blocks
        self.broadcast = broadcast
        if model.num_blocks * model.block_size < self.max_seq_len:
            # One sequence alone must always fit: then whatever is preempted runs again
            # once the others are done, and no admission waits forever.
            raise ValueError(
                f"a KV pool of {model.num_blocks} blocks of {model.block_size} cannot hold "
                f"one sequence of max_seq_len {self.max_seq_len}"
            )
        self.blocks = BlockManager(model.num_blocks, model.block_size, prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, self.max_running, prefill_chunk_tokens, self.max_seq_len
        )
        self.live: dict[str, Sequence] = {}
        self.inbox: list[Event] = []  # events made outside a step (errors, aborts)
        self.steps = 0
        self.grammars = Grammars(tokenizer, model.args.vocab_size)

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.inbox)

    def stats(self) -> dict[str, int]:
        """The KV pool and the prefix cache: blocks, use, hits, preemptions."""
        return {**self.blocks.stats(), "preemptions": self.scheduler.preemptions}

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
            self.scheduler.add(seq)

    def abort(self, ids: Iterable[str]) -> None:
        """Give up requests; their blocks are free for the next step. Unknown ids (already
        finished, never seen) are ignored."""
        for rid in ids:
            seq = self.live.pop(rid, None)
            if seq is None:
                continue
            self.scheduler.remove(seq)
            self.inbox.append(seq.finish("abort"))

    def step(self) -> list[Event]:
        """One scheduling step; returns the events it made (possibly none)."""
        events, self.inbox = self.inbox, []
        batch, chunks, decoding = self.scheduler.schedule()
        if batch.empty:
            return events
        # The rows sampled this step: sequences whose fill this step completes (unless
        # a recomputed one, whose next token is known), then every decode.
        done = [i for i, (s, n) in enumerate(chunks) if s.fill_left == n and s.pending is None]
        rows = [chunks[i][0] for i in done] + decoding
        guides = [s.guide for s in rows if s.guide is not None]
        masks = self.grammars.submit(guides) if guides else None  # while the forward runs
        publish(batch, self.max_running, self.broadcast)
        pf_logits, dec_logits = execute(self.model, batch)
        self.steps += 1

        picked: list[torch.Tensor] = []
        for s, n in chunks:
            s.cached += n
        if done:
            picked.append(pf_logits[done])  # type: ignore[index]
        for s in decoding:
            s.cached += 1
            s.pending = None
            # Decode rows name their blocks after the forward (prefill rows, which may
            # share them, ran before the decode rows wrote them).
            self.blocks.name_full_blocks(s.table, s.tokens, s.cached)
        if decoding:
            picked.append(dec_logits)  # type: ignore[arg-type]
        if rows:
            logits = torch.cat(picked) if len(picked) > 1 else picked[0]
            events += self._sample(rows, logits, masks.result() if masks else None)
        return events

    def idle(self) -> None:
        """Tell the followers the lead is alive but has nothing to run."""
        publish(StepBatch(op=OP_IDLE), self.max_running, self.broadcast)

    def stop(self) -> None:
        publish(StepBatch(op=OP_STOP), self.max_running, self.broadcast)
        self.grammars.close()

    # ------------------------------------------------------------------ internals

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
                self.scheduler.remove(s)
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
            # the logits in place, saving a [rows, V] copy.
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
