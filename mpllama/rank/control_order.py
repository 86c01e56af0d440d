"""The lead rank's control calls (submits and aborts) taken in the order the engine made
them, whatever order Ray delivers them in.

The engine numbers its control calls to a gang's lead from 0 (``ControlSender``) and
sends them from one thread, in order. The rank actor lets Ray run calls as they arrive
(gang.py), so one can still arrive before an earlier one: it waits here until those
before it came, so an abort is never taken before the submit it aborts. A gap means Ray
lost or cancelled a call (Ray Serve's cancellation once did, before the engine sent them
from its own thread: every later request on the gang hung). A call missing for
``CONTROL_GAP_S`` is passed over, logged, and taken when it comes after all.

Not thread-safe: the caller holds its own lock (``RankWorker._cond``).
"""

from __future__ import annotations

import logging
import time
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

# How long the later calls wait for a missing one.
CONTROL_GAP_S = 5.0

Call = TypeVar("Call")


class ControlOrder(Generic[Call]):
    """Numbered calls in, the calls to take now out, in their numbers' order."""

    def __init__(self) -> None:
        self._next = 0  # the number of the next call to take
        self._early: dict[int, Call] = {}  # calls waiting on one before them
        self._gap_since: float | None = None  # since when they wait

    def arrive(self, order: int | None, call: Call) -> list[Call]:
        """The calls to take now that ``call``, numbered ``order``, came: itself where
        unnumbered (None) or late (its number passed over), else those of its run that
        are due."""
        if order is None or order < self._next:
            return [call]
        self._early[order] = call
        return self._due()

    def overdue(self) -> list[Call]:
        """The waiting calls to take once the one they wait on has been missing for
        ``CONTROL_GAP_S``: its number (and any after it still missing) is passed over."""
        if self._gap_since is None or time.monotonic() - self._gap_since < CONTROL_GAP_S:
            return []
        first = min(self._early)
        log.warning(
            "control call(s) %d-%d never came in %.0f s; taking the %d after them (a late "
            "one is taken when it comes)",
            self._next,
            first - 1,
            CONTROL_GAP_S,
            len(self._early),
        )
        self._next, self._gap_since = first, None
        return self._due()

    def wait(self, longest: float) -> float:
        """How long its caller may wait for other work: at most ``longest``, and no longer
        than until ``overdue`` would pass a gap over."""
        if self._gap_since is None:
            return longest
        return min(longest, max(self._gap_since + CONTROL_GAP_S - time.monotonic(), 0.01))

    def _due(self) -> list[Call]:
        due = []
        while self._next in self._early:
            due.append(self._early.pop(self._next))
            self._next += 1
        if not self._early:
            self._gap_since = None
        elif self._gap_since is None:
            self._gap_since = time.monotonic()
        return due
