"""One request on the lead, from admission to retirement: its KV blocks and how many
positions they hold, what it has generated, its sampling state, the text it has shown,
and whether it has finished (stop ids, stop strings, its token budget)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..config import SamplingParams
from ..protocol import Event, Request
from ..tokenizer import IncrementalDecoder, Tokenizer
from .blocks import BlockTable
from .sampling import LogitAdjuster

if TYPE_CHECKING:
    from llguidance import LLMatcher


class Sequence:
    """One request from admission to retirement: its blocks, what they cache, what it
    has generated, and the text it has shown.

    Its known tokens are the prompt then the output. The last output token is
    ``pending`` until a decode writes its KV; so the positions to prefill (``fill``)
    are the prompt, or, for a sequence preempted and recomputed, every known token
    but the pending one."""

    def __init__(
        self,
        request: Request,
        tokenizer: Tokenizer,
        max_seq_len: int,
        device: torch.device,
        guide: LLMatcher | None = None,
    ) -> None:
        self.request = request
        self.params: SamplingParams = request.params
        self.table = BlockTable()
        self.running = False  # holds blocks (admitted, not preempted or finished)
        self.cached = 0  # positions whose KV its blocks hold
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
        # A guided request's grammar state: it has taken every token of the output. A
        # replayed request starts afresh and takes them again as it remakes them.
        self.guide = guide
        self.error: str | None = None
        self.text = ""  # decoded so far (cut at a stop string once one appears)
        self.shown = 0  # characters of text already emitted
        self.finish_reason: str | None = None

    @property
    def fill(self) -> int:
        """Positions to prefill before it decodes (see the class docstring)."""
        return len(self.request.prompt_token_ids) + max(len(self.output) - 1, 0)

    @property
    def fill_left(self) -> int:
        return self.fill - self.cached

    def tokens(self, lo: int, hi: int) -> list[int]:
        """Known tokens at positions lo..hi-1 (prompt, then output)."""
        prompt = self.request.prompt_token_ids
        n = len(prompt)
        if hi <= n:
            return list(prompt[lo:hi])
        return list(prompt[lo:n]) + self.output[max(lo - n, 0) : hi - n]

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
            if self.guide is not None and not self.guide.consume_token(token):
                self.finish_reason, self.error = "error", self.guide.get_error()
            # Stop strings, as stop ids, cannot end it before min_tokens (vLLM's rule).
            elif params.stop and len(self.output) > params.min_tokens and self._stopped(before):
                self.finish_reason = "stop"
            elif self.guide is not None and self.guide.is_stopped():
                self.finish_reason = "stop"  # the grammar is complete and takes nothing more
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
            self.error,
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
