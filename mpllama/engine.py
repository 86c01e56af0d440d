"""The driver's side of one running gang: submit requests, abort them, and deliver the
events the lead makes to whoever waits for each request.

One pump thread per engine polls the lead (one Ray call returns every step made since
the last one) and watches each rank's loop. When a rank fails, the gang is torn down and
rebuilt, and every unfinished request is replayed: on the rebuilt gang, or, when the
engine is one replica of several, at once on the healthy ones (``on_failure``). Replay is
exact (each request samples from its own seed), and events carry offsets, so the pump
drops what a consumer has already seen: each consumer gets every token exactly once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from .config import ParallelConfig
from .control_sender import ControlSender
from .errors import MpllamaError, PlacementError, WorkerError
from .gang import Gang, Heartbeats, worker_error
from .protocol import Event, RankSpec, Request

log = logging.getLogger(__name__)

# Receives a request's events on the pump thread (or the caller's, for aborts), then an
# exception instead if the request can no longer finish. Must not block.
Sink = Callable[[Event | BaseException], None]

# How long one poll waits on the lead for a step to finish before answering empty.
POLL_WAIT_S = 0.2

# Each time a request is handed to a lead it goes under an id of its own, its caller's
# with a number: a caller may reuse an id as soon as it aborted the request, while the
# lead may still be sending the old one's events; under the same id they would reach the
# new request (its tokens, its "abort"), and the lead would refuse it as still running.
_sent = itertools.count()


@dataclass
class Live:
    """A request an engine owes events to, and how much of it the consumer has seen."""

    request: Request  # as its caller made it
    sink: Sink
    tokens: int = 0  # tokens already delivered
    text: int = 0  # characters already delivered
    wire: Request | None = None  # as its engine sent it to the lead (``Engine._put``)

    @property
    def outstanding(self) -> int:
        """Tokens it may still make: the load it puts on a gang."""
        return self.request.params.max_tokens - self.tokens


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
        self._live: dict[str, Live] = {}  # by the caller's request id
        self._wire: dict[str, Live] = {}  # the same, by the id the lead knows it by
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
        for live in lives:
            self._put(live)
        if self._up:
            self._control.send(self.gang.lead, "submit", [self._sent(live) for live in lives])
        else:
            self._wake.set()  # the pump rebuilds the gang and replays them

    def _put(self, live: Live) -> None:
        """Hold ``live`` under its caller's id and a new id for the lead (lock held)."""
        live.wire = replace(live.request, id=f"{live.request.id}#{next(_sent)}")
        self._live[live.request.id] = live
        self._wire[live.wire.id] = live

    @staticmethod
    def _sent(live: Live) -> Request:
        assert live.wire is not None
        return live.wire

    def _drop(self, live: Live) -> None:
        """Forget ``live`` (lock held)."""
        del self._live[live.request.id]
        del self._wire[self._sent(live).id]

    def _drop_all(self) -> list[Live]:
        """Forget every request; return them (lock held)."""
        live = list(self._live.values())
        self._live, self._wire = {}, {}
        return live

    def abort(self, ids: Iterable[str]) -> None:
        """Give up requests: their sinks get a final "abort" event now, and the lead
        frees their KV blocks at its next step. Unknown or finished ids are ignored."""
        gone = []
        with self._lock:
            for rid in ids:
                live = self._live.get(rid)
                if live is not None:
                    self._drop(live)
                    gone.append(live)
            if gone and self._up:
                self._control.send(self.gang.lead, "abort", [self._sent(g).id for g in gone])
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
            live = self._drop_all()
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
            self._control.send(
                self.gang.lead, "submit", [self._sent(e) for e in self._live.values()]
            )
        self._up = True

    def _pump(self) -> None:
        try:
            self._pump_loop()
        except BaseException as exc:  # a bug of ours: nobody must wait forever for it
            log.exception("the engine's pump thread failed")
            with self._lock:
                self._closed = True
                live = self._drop_all()
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
                    live = self._wire.get(e.id)
                    if live is None:
                        continue  # aborted by the caller meanwhile
                    new = _unseen(e, live, self.replica)
                    if new is None:
                        continue
                    if new.finish_reason is not None:
                        self._drop(live)
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
            moving = self._drop_all() if self.on_failure and self._live else []
        log.warning("%s; the gang was stopped", str(error).splitlines()[0])
        self.gang.shutdown()
        if moving:
            assert self.on_failure is not None
            kept = self.on_failure(self, moving)
            if kept:
                with self._lock:
                    for live in kept:
                        self._put(live)

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
            live = self._drop_all()
            self._failures = 0
            self.down = True
        if live:
            log.error("giving up on %d request(s): %s", len(live), str(error).splitlines()[0])
        else:
            log.error("replica %d stays down: %s", self.replica, str(error).splitlines()[0])
        for entry in live:
            entry.sink(error)


def _unseen(e: Event, live: Live, replica: int) -> Event | None:
    """The part of ``e`` its consumer has not seen yet (all of it, unless replayed)."""
    skip = max(0, live.tokens - e.token_offset)
    tokens = e.token_ids[skip:]
    text = e.text[max(0, live.text - e.text_offset) :]
    if not tokens and not text and e.finish_reason is None:
        return None
    live.tokens = max(live.tokens, e.token_offset + len(e.token_ids))
    live.text = max(live.text, e.text_offset + len(e.text))
    return Event(
        live.request.id,
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
