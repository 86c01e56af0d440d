"""A thread that lives as long as the process, for ``ray.init`` (ray_session.py).

Why ``ray.init`` never runs on a caller's thread: Ray starts a local runtime's GCS and
raylet with ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (fate sharing), and Linux sends that
signal when the *thread* that started them ends, not the process. A runtime started from
a short-lived thread (a web app's startup hook, a notebook helper, a test harness) is
killed the moment that thread returns; the driver then hangs in its next Ray call, and
60 s later Ray's core worker terminates the whole process ("Failed to connect to GCS
within 60 seconds ... The program will terminate").

So ``ray.init`` runs on a thread that lives as long as the process: the main thread when
it is the caller, else mpllama's own runtime thread (one daemon thread, started on first
need, idle on a queue), to which the caller hands the call and waits. ``ray.shutdown``
may run on any thread: only the life of the thread that started the processes matters.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import MpllamaError

T = TypeVar("T")

# Longest a caller waits for the runtime thread to start or join Ray (ray.init has
# shorter timeouts of its own; this only bounds a wait that would otherwise be endless).
START_TIMEOUT_S = 300.0

_thread: _RuntimeThread | None = None


def on_lasting_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that outlives whatever it starts: here when this is the
    main thread (or the runtime thread), else on the runtime thread."""
    current = threading.current_thread()
    if current is threading.main_thread() or current is _thread:
        return fn()
    return _runtime_thread().call(fn)


def _runtime_thread() -> _RuntimeThread:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = _RuntimeThread()
        _thread.start()
    return _thread


class _RuntimeThread(threading.Thread):
    """Runs the calls handed to it, one at a time, for the life of the process."""

    def __init__(self) -> None:
        super().__init__(name="mpllama-ray", daemon=True)
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._jobs = queue.SimpleQueue()

    def call(self, fn: Callable[[], T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        try:
            return future.result(timeout=START_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            # A runtime that comes up after all must not outlive the caller's failure.
            future.add_done_callback(_shutdown_if_started)
            raise MpllamaError(
                f"Ray did not start within {START_TIMEOUT_S:g}s; check `ray status` and the "
                "logs under /tmp/ray/session_latest/logs"
            ) from None

    def run(self) -> None:
        # Ray warns that it cannot set its SIGTERM handler off the main thread: expected
        # here (the main program owns its signals), so that one line is not shown.
        logging.getLogger("ray._private.worker").addFilter(_not_sigterm_warning)
        while True:
            fn, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed back to the caller, who raises it
                future.set_exception(exc)


def _not_sigterm_warning(record: logging.LogRecord) -> bool:
    return not (
        record.threadName == "mpllama-ray"
        and str(record.msg).startswith("SIGTERM handler is not set")
    )


def _shutdown_if_started(future: concurrent.futures.Future[Any]) -> None:
    if future.exception() is None:
        import ray

        ray.shutdown()
