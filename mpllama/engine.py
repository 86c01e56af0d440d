"""The driver's side of one running gang: submit requests, abort them, and deliver the
events the lead makes to whoever waits for each request.

One pump thread per engine polls the lead (one Ray call returns every step made since
the last one) and watches each rank's loop. When a rank fails, the gang is torn down and
rebuilt, and every unfinished request is replayed: on the rebuilt gang, or, when the
engine is one replica of several, at once on the healthy ones (``on_failure``). Replay is
exact (each request samples from its own seed), and events carry offsets, so the pump
drops what a consumer has already seen: each consumer gets every token exactly once
(``live_requests``: the unfinished requests, what each consumer has seen, and the id each
went to the lead under).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from .config import ParallelConfig
from .control_sender import ControlSender
from .errors import MpllamaError, PlacementError, WorkerError
from .gang import Gang, Heartbeats, worker_error
from .live_requests import Live, LiveTable, Sink
from .protocol import Event, RankSpec, Request

log = logging.getLogger(__name__)

# How long one poll waits on the lead for a step to finish before answering empty.
POLL_WAIT_S = 0.2

# Given the requests of an engine whose gang just failed, place what it can elsewhere and
# return the rest, which the engine replays itself once rebuilt.
FailureHandler = Callable[["Engine", list[Live]], list[Live]]


class Engine:
    """One gang serving requests; starts it at once (raising what fails on the way).

    ``replica`` numbers it among several; ``on_failure`` hands a failed gang's requests
    to the others; ``keep_up`` rebuilds a failed gang even when it has no requests.
    """

    def __init__(
        self,
        spec: RankSpec,
        parallel: ParallelConfig,
        *,
        replica: int = 0,
        on_failure: FailureHandler | None = None,
        keep_up: bool = False,
        node_id: str | None = None,
        placement_group: Any = None,
    ) -> None:
        self.spec = spec
        self.parallel = parallel
        self.replica = replica
        self.on_failure = on_failure
        self.keep_up = keep_up
        self.gang = Gang(spec, parallel, node_id, placement_group)
        self._lock = threading.RLock()
        self._live = LiveTable()
        self._up = False
        self._closed = False
        self._gone: MpllamaError | None = None  # why the engine can no longer run (lose)
        self._wake = threading.Event()
        self._poll: Any = None
        self._loops: list[Any] = []
        self._control = ControlSender()  # submits and aborts to the lead, in order
        self._failures = 0  # failures since the last step that made progress
        self._last_error: MpllamaError = WorkerError("no failure yet")
        self.restarts = 0
        self.failures: list[str] = []  # one line per gang failure, for summaries
        self.steps_seen = 0
        self.running = self.waiting = 0  # the lead's counts at its last poll
        self.cache: dict[str, int] = {}  # its KV pool and prefix cache (Runner.stats)
        self.down = False  # rebuilds kept failing; tried again when work arrives
        with self._lock:
            self._start_loops()
        self._thread = threading.Thread(target=self._pump, name="mpllama-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side

    def submit(self, requests: list[Request], sink: Sink) -> None:
        """Queue requests; returns at once. ``sink`` gets each one's events."""
        with self._lock:
            if self._closed:
                raise self._gone or WorkerError("the engine has been closed")
            ids = [r.id for r in requests]
            taken = [i for i in ids if i in self._live]
            if taken or len(set(ids)) != len(ids):
                raise ValueError(f"request id(s) {taken or ids} are already in use")
            self._add([Live(r, sink) for r in requests])

    def adopt(self, lives: list[Live]) -> None:
        """Take over requests another engine started: their consumers keep their place."""
        with self._lock:
            if self._closed:
                raise WorkerError("the engine has been closed")
            self._add(lives)

    def _add(self, lives: list[Live]) -> None:
        sent = [self._live.put(live) for live in lives]
        if self._up:
            self._control.send(self.gang.lead, "submit", sent)
        else:
            self._wake.set()  # the pump rebuilds the gang and replays them

    def abort(self, ids: Iterable[str]) -> None:
        """Give up requests: their sinks get a final "abort" event now, and the lead
        frees their KV blocks at its next step. Unknown or finished ids are ignored."""
        gone = []
        with self._lock:
            for rid in ids:
                live = self._live.get(rid)
                if live is not None:
                    self._live.drop(live)
                    gone.append(live)
            if gone and self._up:
                self._control.send(self.gang.lead, "abort", [g.sent.id for g in gone])
        for g in gone:
            g.sink(Event(g.request.id, [], None, "", g.tokens, g.text, "abort"))

    @property
    def rank_info(self) -> list[dict[str, Any]]:
        """What each rank reported at set-up (device, backend, pid, node, ...); the lead's
        entry also holds its KV pool and prefix cache as of its last poll (``cache``)."""
        info = [dict(i) for i in self.gang.rank_info]
        if info:
            info[0]["cache"] = dict(self.cache)
        return info

    def owns(self, request_id: str) -> bool:
        """Whether ``request_id`` is one of its unfinished requests."""
        return request_id in self._live

    @property
    def load(self) -> int:
        """Requests not yet finished."""
        return len(self._live)

    @property
    def outstanding_tokens(self) -> int:
        with self._lock:
            return sum(live.outstanding for live in self._live.values())

    @property
    def healthy(self) -> bool:
        """Serving now: set up and not being rebuilt."""
        return self._up and not self._closed

    @property
    def alive(self) -> bool:
        return self.gang.alive

    def call_all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """A set-up style call on every rank (e.g. ``memory``); a failure stops the gang,
        which is rebuilt when requests need it."""
        try:
            return self.gang.call_all(method, *args, timeout=timeout)
        except WorkerError as exc:
            self._fail(exc)
            raise

    def close(self) -> None:
        """Stop the pump and the gang; unfinished requests fail. Idempotent."""
        self._end(
            lambda: WorkerError("the engine was closed before the request finished"),
            self.gang.shutdown,
        )

    def lose(self, error: MpllamaError) -> None:
        """The Ray runtime died under the engine: fail every unfinished request with
        ``error`` and stop, making no Ray call that needs the GCS (the ranks go with the
        runtime). Later submits raise ``error``. Idempotent; a no-op once closed."""
        self._end(lambda: error, self.gang.forget, gone=error)

    def _end(
        self,
        error: Callable[[], BaseException],
        teardown: Callable[[], None],
        gone: MpllamaError | None = None,
    ) -> None:
        """Stop the pump, ``teardown`` the gang, fail what was still running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._up = False
            if gone is not None:
                self._gone = gone
            live = self._live.drop_all()
            self._control.close()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5 * POLL_WAIT_S + 5)
        teardown()
        for entry in live:
            entry.sink(error())

    # ------------------------------------------------------------------ pump thread

    def _start_loops(self) -> None:
        """Start every rank's loop and the first poll on a set-up gang; replay what is
        live. Called with the lock held."""
        self._loops = [a.run.remote() for a in self.gang.actors]
        self._poll = self.gang.lead.poll.remote(POLL_WAIT_S)
        self._control.new_lead()
        if self._live:
            self._control.send(self.gang.lead, "submit", [e.sent for e in self._live.values()])
        self._up = True

    def _pump(self) -> None:
        try:
            self._pump_loop()
        except BaseException as exc:  # a bug of ours: nobody must wait forever for it
            log.exception("the engine's pump thread failed")
            with self._lock:
                self._closed = True
                live = self._live.drop_all()
            self.gang.shutdown()
            error = WorkerError(f"the engine failed and was stopped: {exc!r}")
            for entry in live:
                entry.sink(error)

    def _pump_loop(self) -> None:
        heartbeats: Heartbeats | None = None
        last_beat = 0.0
        while not self._closed:
            if not self._up:
                heartbeats = None
                self._rebuild()
                continue
            if heartbeats is None:
                heartbeats = Heartbeats(
                    self.gang,
                    list(range(len(self.gang.actors))),
                    self.parallel.heartbeat_timeout_s,
                )
            poll = self._poll
            try:
                ready, _ = ray.wait(
                    [poll, *self._loops], num_returns=1, timeout=heartbeats.interval
                )
            except Exception as exc:  # Ray itself is going away
                if not self._closed:
                    self._fail(WorkerError(f"lost contact with the gang: {exc}"))
                continue
            if self._closed:
                return
            if ready and ready[0] is poll:
                try:
                    polled = ray.get(poll)
                except (RayTaskError, RayActorError, GetTimeoutError) as exc:
                    self._fail(self._loop_error(exc, 0, "poll"))
                    continue
                with self._lock:
                    if self._up:
                        self._poll = self.gang.lead.poll.remote(POLL_WAIT_S)
                self.running, self.waiting = polled.running, polled.waiting
                self.cache = polled.cache
                self._dispatch(polled.steps)
            elif ready:
                rank = self._loops.index(ready[0])
                try:
                    ray.get(ready[0])
                    error = WorkerError(f"rank {rank}'s loop ended unexpectedly", rank=rank)
                except (RayTaskError, RayActorError) as exc:
                    error = self._loop_error(exc, rank, "run")
                self._fail(error)
            if self._up and time.monotonic() - last_beat >= heartbeats.interval:
                last_beat = time.monotonic()
                silent = heartbeats.check()
                if silent is not None:
                    self._fail(
                        WorkerError(
                            f"rank {silent} stopped answering: no heartbeat for "
                            f"{heartbeats.limit:g}s (parallel.heartbeat_timeout_s); the "
                            "process is stopped or starved",
                            rank=silent,
                            method="heartbeat",
                        )
                    )

    def _loop_error(self, exc: Exception, rank: int, method: str) -> WorkerError:
        """The root cause: a rank whose loop broke because a peer died names the peer."""
        if not isinstance(exc, RayActorError):
            ready, _ = ray.wait(self._loops, num_returns=len(self._loops), timeout=0.5)
            for ref in ready:
                try:
                    ray.get(ref)
                except RayActorError as dead:
                    return worker_error(dead, self._loops.index(ref), "run")
                except Exception:
                    pass
        return worker_error(exc, rank, method)

    def _dispatch(self, groups: list[list[Event]]) -> None:
        deliveries: list[tuple[Sink, Event]] = []
        with self._lock:
            for events in groups:
                self.steps_seen += 1
                for e in events:
                    live = self._live.of_event(e)
                    if live is None:
                        continue  # aborted by the caller meanwhile
                    new = live.unseen(e, self.replica)
                    if new is None:
                        continue
                    if new.finish_reason is not None:
                        self._live.drop(live)
                    deliveries.append((live.sink, new))
            if groups:
                self._failures = 0
        for sink, event in deliveries:
            sink(event)

    def _fail(self, error: MpllamaError) -> None:
        if self._closed:
            return
        error = self._where(error)
        with self._lock:
            self._up = False
            self._failures += 1
            self._last_error = error
            self.failures.append(str(error).splitlines()[0])
            moving = self._live.drop_all() if self.on_failure and self._live else []
        log.warning("%s; the gang was stopped", str(error).splitlines()[0])
        self.gang.shutdown()
        if moving:
            assert self.on_failure is not None
            kept = self.on_failure(self, moving)
            if kept:
                with self._lock:
                    for live in kept:
                        self._live.put(live)

    def _where(self, error: MpllamaError) -> MpllamaError:
        """Name the replica and the failed rank's node in the message."""
        if not isinstance(error, WorkerError):
            return error
        rank = error.rank
        info = self.gang.rank_info
        node = info[rank].get("node_ip") if rank is not None and rank < len(info) else None
        where = f"replica {self.replica}" + (f", node {node}" if node else "")
        first, _, rest = str(error).partition("\n")
        message = f"{first} ({where})" + (f"\n{rest}" if rest else "")
        out = WorkerError(message, rank=error.rank, method=error.method)
        out.remote_traceback = error.remote_traceback
        return out

    def _rebuild(self) -> None:
        """Bring the gang back when requests wait for it; give up on them after
        ``max_restarts`` failures in a row without progress."""
        with self._lock:
            idle = not self._live
        if idle and (self.down or not self.keep_up):
            self._wake.wait(POLL_WAIT_S)
            self._wake.clear()
            return
        if self._failures > self.parallel.max_restarts:
            self._give_up(self._last_error)
            return
        delay = self.parallel.restart_backoff_s * 2 ** max(0, self._failures - 1)
        log.warning(
            "rebuilding the gang in %.1fs (retry %d of %d)",
            delay,
            self._failures,
            self.parallel.max_restarts,
        )
        if self._wake.wait(delay) and self._closed:
            return
        self._wake.clear()
        try:
            self.gang.start()
        except (WorkerError, PlacementError) as exc:
            error = self._where(exc)
            log.warning("%s", str(error).splitlines()[0])
            with self._lock:
                self._failures += 1
                self._last_error = error
                self.failures.append(str(error).splitlines()[0])
            return
        with self._lock:
            if self._closed:
                self.gang.shutdown()
                return
            self.restarts += 1
            self.down = False
            self._start_loops()

    def _give_up(self, error: MpllamaError) -> None:
        with self._lock:
            live = self._live.drop_all()
            self._failures = 0
            self.down = True
        if live:
            log.error("giving up on %d request(s): %s", len(live), str(error).splitlines()[0])
        else:
            log.error("replica %d stays down: %s", self.replica, str(error).splitlines()[0])
        for entry in live:
            entry.sink(error)
