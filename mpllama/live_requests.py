"""The requests an engine owes events to (``Live``) and their table (``LiveTable``):
what each consumer has seen, so a replayed request's events reach it exactly once, and
the id each request went to the lead under.

Each time a request is handed to a lead it goes under an id of its own, its caller's
with a number: a caller may reuse an id as soon as it aborted the request, while the
lead may still be sending the old one's events; under the same id they would reach the
new request (its tokens, its "abort"), and the lead would refuse it as still running.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

from .protocol import Event, Request

# Receives a request's events on the pump thread (or the caller's, for aborts), then an
# exception instead if the request can no longer finish. Must not block.
Sink = Callable[[Event | BaseException], None]

_handovers = itertools.count()  # numbers the ids requests go to a lead under


@dataclass
class Live:
    """A request an engine owes events to, and how much of it the consumer has seen."""

    request: Request  # as its caller made it
    sink: Sink
    tokens: int = 0  # tokens already delivered
    text: int = 0  # characters already delivered
    wire: Request | None = None  # as it went to the lead (``LiveTable.put``)

    @property
    def outstanding(self) -> int:
        """Tokens it may still make: the load it puts on a gang."""
        return self.request.params.max_tokens - self.tokens

    @property
    def sent(self) -> Request:
        """The request as its table handed it to the lead."""
        assert self.wire is not None, "not in a LiveTable"
        return self.wire

    def unseen(self, e: Event, replica: int) -> Event | None:
        """The part of ``e`` (an event of ``sent``) its consumer has not seen yet (all
        of it, unless replayed), under the caller's id."""
        skip = max(0, self.tokens - e.token_offset)
        tokens = e.token_ids[skip:]
        text = e.text[max(0, self.text - e.text_offset) :]
        if not tokens and not text and e.finish_reason is None:
            return None
        self.tokens = max(self.tokens, e.token_offset + len(e.token_ids))
        self.text = max(self.text, e.text_offset + len(e.text))
        return Event(
            self.request.id,
            tokens,
            e.logprobs[skip:] if e.logprobs is not None else None,
            text,
            e.token_offset + skip,
            e.text_offset + len(e.text) - len(text),
            e.finish_reason,
            e.error,
            replica,
            e.top_logprobs[skip:] if e.top_logprobs is not None else None,
        )


class LiveTable:
    """An engine's unfinished requests, by their callers' ids and by the ids the lead
    knows them by. Not locked: the engine's lock guards it."""

    def __init__(self) -> None:
        self._by_caller: dict[str, Live] = {}
        self._by_wire: dict[str, Live] = {}

    def put(self, live: Live) -> Request:
        """Hold ``live`` under its caller's id and a new id for the lead; the request
        to hand the lead."""
        live.wire = replace(live.request, id=f"{live.request.id}#{next(_handovers)}")
        self._by_caller[live.request.id] = live
        self._by_wire[live.wire.id] = live
        return live.wire

    def drop(self, live: Live) -> None:
        del self._by_caller[live.request.id]
        del self._by_wire[live.sent.id]

    def drop_all(self) -> list[Live]:
        """Forget every request; return them."""
        lives = list(self._by_caller.values())
        self._by_caller, self._by_wire = {}, {}
        return lives

    def get(self, request_id: str) -> Live | None:
        """The request its caller named ``request_id``."""
        return self._by_caller.get(request_id)

    def of_event(self, e: Event) -> Live | None:
        """The request an event of the lead's is about (None once finished or aborted)."""
        return self._by_wire.get(e.id)

    def values(self) -> list[Live]:
        return list(self._by_caller.values())

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_caller

    def __len__(self) -> int:
        return len(self._by_caller)
