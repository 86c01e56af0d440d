"""Stop signals for the commands: SIGTERM (``kill``, ``ray job stop``, systemd, a
container stop, to the process or its whole group) and SIGINT (Ctrl-C) unwind the main
thread alike, once, so every command cleans up the same way whichever arrives."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Stop(KeyboardInterrupt):
    """A stop signal (SIGTERM or SIGINT), raised in the main thread as Ctrl-C is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[threading.Event]:
    """SIGTERM and SIGINT raise ``Stop`` in the main thread, once: after the first (or
    once the caller sets the event it gets: cleanup has begun) they are ignored, so a
    second Ctrl-C, or a group signal that arrives twice, cannot cut the cleanup short.
    The main thread only; the previous handlers come back on exit."""
    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            raise Stop(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopping
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
