"""The engine's side of the control protocol (``rank/control_order.py`` is the lead's):
submits and aborts to a gang's lead, numbered from 0 per lead and sent in that order
from a thread of their own.

Why a thread: a Ray call made inside a Ray task is that task's child, and Ray Serve
cancels a request's task with its children when its client leaves (``ray.cancel``,
recursive). An abort made on the caller's thread as the client left was cancelled before
it ran (the replica's log: "Cancelling an actor task ... function_name=abort"), its
number never reached the lead, and the lead waited for it for good: every later request
on the gang hung.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any

log = logging.getLogger(__name__)


class ControlSender:
    """Numbered control calls, made in order by a thread that lives until ``close``."""

    def __init__(self) -> None:
        self._next = 0  # the number the next call to this lead gets
        self._outbox: queue.SimpleQueue[tuple[Any, str, Any, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._loop, name="mpllama-engine-control", daemon=True
        )
        self._thread.start()

    def new_lead(self) -> None:
        """A rebuilt gang's lead counts from 0."""
        self._next = 0

    def send(self, lead: Any, method: str, payload: Any) -> None:
        """Queue ``lead.<method>.remote(payload, number)``; the number is the next one."""
        number, self._next = self._next, self._next + 1
        self._outbox.put((lead, method, payload, number))

    def close(self) -> None:
        """Drop what is still queued (the gang goes: what it was owed does not matter) and
        end the thread. The thread may take an item between an empty() and a get_nowait():
        get until the queue says it is empty."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._outbox.get_nowait()
        self._outbox.put(None)

    def _loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            lead, method, payload, number = item
            try:
                getattr(lead, method).remote(payload, number)
            except Exception as exc:  # noqa: BLE001  (a dead lead: the pump rebuilds the gang)
                log.warning("the %s call to the lead failed: %s", method, exc)
