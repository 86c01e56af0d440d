"""One model-parallel rank: join the group and load this rank's slice of the checkpoint
(rank_setup.py), then run the step loop: the lead (rank 0) schedules and publishes each
step, the others follow. A plain class, so it runs (and is tested) without Ray; the engine wraps it in a
Ray actor whose ``run`` sits on one thread while ``submit``/``abort``/``poll`` are
answered on another.

All of a rank's torch work (joining the group, loading, the loop) runs on one thread of
its own, whichever threads the calls come in on. Under OpenMP every thread that starts
parallel work gets a team of worker threads; a second team (set-up on one thread, the
loop on another) makes more OpenMP threads than cores, and libgomp then stops spinning
between parallel regions, which measured markedly slower (benchmarks/RESULTS.md,
"Figures behind the code").
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ..protocol import Event, Polled, RankSpec, Request
from ..tokenizer import Tokenizer
from . import dist, rank_setup
from .control_order import ControlOrder
from .model import Transformer
from .process_memory import peak_rss_mb, resident_mb
from .runner import Runner
from .step_plan import follow

log = logging.getLogger(__name__)

T = TypeVar("T")


# How long a poll holds tokens that only continue streams, for the next steps' to join
# them: each poll answered is a Ray reply, about a millisecond of the rank's CPU, and on
# a machine whose cores all run the step's threads it delays the step it lands in by
# about twice that (benchmarks/RESULTS.md, "Figures behind the code"). A stream's first
# token, its last and any error are never held.
LINGER_S = 0.025
# How long a poll holds the tokens of requests nobody streams (``Request.stream`` False:
# ``LLM.generate``, which returns finished outputs only): one reply every so often
# instead of one every few steps. A finish or an error is still answered at once.
FINAL_HOLD_S = 0.5


class TorchThread:
    """One long-lived daemon thread that runs the calls handed to it, in order; the
    caller waits for each (a failure is raised in the caller, its traceback kept).
    Not a ThreadPoolExecutor: its thread is joined at interpreter exit, which would
    hang a rank whose loop sits in a collective for a peer that is gone."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        future: Future = Future()
        self._calls.put((fn, args, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            fn, args, future = self._calls.get()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001  (the caller re-raises it)
                future.set_exception(exc)


class RankWorker:
    def __init__(self, rank: int, spec: RankSpec) -> None:
        self.rank = rank
        self.spec = spec
        self.model: Transformer | None = None
        self.tokenizer = Tokenizer.from_bytes(spec.tokenizer_proto)
        self._store: Any = None
        self._rss_before_load = 0.0
        self._anon_before_load = 0.0
        # Lead only: what the control thread hands the loop, and what the loop made.
        self._cond = threading.Condition()
        self._submitted: list[Request] = []
        self._aborted: list[str] = []
        self._events: list[list[Event]] = []  # one list per step
        self._unstreamed: set[str] = set()  # running requests nobody streams
        self._due = math.inf  # when the events held for poll must be answered (_hold)
        self._orders: ControlOrder[tuple[list[Request], list[str]]] = ControlOrder()
        self._counts = (0, 0)  # running, waiting after the last step
        self._cache: dict[str, int] = {}  # the lead's KV pool and prefix cache stats
        self._failed: BaseException | None = None
        self._stopping = False
        self._torch = TorchThread(f"mpllama-rank{rank}")

    # --------------------------------------------------------------- set-up

    def open_store(self, host: str) -> int:
        """Rank 0 only: open the rendezvous store; returns the OS-chosen port."""
        self._store = dist.open_store(host, self.spec.world_size, self.spec.collective_timeout_s)
        return int(self._store.port)

    def setup(self, host: str, port: int, node_ip: str) -> dict[str, Any]:
        """Join the group, then load and place this rank's weights and KV cache."""
        return self._torch.call(self._setup, host, port, node_ip)

    def _setup(self, host: str, port: int, node_ip: str) -> dict[str, Any]:
        loaded = rank_setup.set_up(self.rank, self.spec, host, port, node_ip, self._store)
        self.model = loaded.model
        self._rss_before_load, self._anon_before_load = loaded.rss_before, loaded.anon_before
        log.info("ready: %s", loaded.info)
        return loaded.info

    # --------------------------------------------------------------- the loop

    def run(self) -> None:
        """The step loop, until ``stop``: the lead schedules, the others follow. Returns
        only on stop; any failure propagates (and, on the lead, reaches ``poll``)."""
        self._torch.call(self._run)

    def _run(self) -> None:
        if self.model is None:
            raise RuntimeError(f"rank {self.rank}: run() before setup()")
        broadcast = dist.broadcast_plan if self.spec.world_size > 1 else None
        if self.rank != 0:
            assert broadcast is not None
            follow(self.model, self.spec.max_batch_size, broadcast)
            return
        try:
            runner = Runner(
                self.model,
                self.tokenizer,
                self.spec.prefill_chunk_tokens,
                broadcast,
                max_running=self.spec.max_batch_size,
                prefix_caching=self.spec.prefix_caching,
            )
            self._lead(runner)
        except BaseException as exc:
            with self._cond:
                self._failed = exc
                self._cond.notify_all()
            raise

    def _lead(self, runner: Runner) -> None:
        # Followers wait in a collective for the next plan; an idle lead sends an empty
        # one before their collective timeout runs out.
        keepalive = self.spec.collective_timeout_s / 4
        while True:
            with self._cond:
                if not (runner.has_work or self._submitted or self._aborted or self._stopping):
                    self._cond.wait(self._orders.wait(keepalive))
                for call in self._orders.overdue():
                    self._take(*call)
                submitted, self._submitted = self._submitted, []
                aborted, self._aborted = self._aborted, []
                stopping = self._stopping
            runner.add(submitted)
            runner.abort(aborted)
            if stopping:
                runner.stop()
                return
            if not runner.has_work:
                runner.idle()
                continue
            events = runner.step()
            with self._cond:
                self._counts = (len(runner.running), len(runner.scheduler.waiting))
                self._cache = runner.stats()
                if events:
                    self._publish(events)

    def _publish(self, events: list[Event]) -> None:
        """Hand one step's events to ``poll`` (lock held). The poll thread is woken only
        when they are due before what it holds already: a wake-up every step would take
        a core from the step's threads."""
        self._events.append(events)
        due = time.monotonic() + min(map(self._hold, events))
        for e in events:
            if e.finish_reason is not None:
                self._unstreamed.discard(e.id)
        if due < self._due:
            self._due = due
            self._cond.notify_all()

    def _hold(self, event: Event) -> float:
        """How long a poll may hold ``event`` for later steps' events to join it."""
        if event.finish_reason is not None:
            return 0.0
        if event.id in self._unstreamed:
            return FINAL_HOLD_S
        return LINGER_S if event.token_offset > 0 else 0.0

    def submit(self, requests: list[Request], order: int | None = None) -> None:
        """Lead only: queue requests for the next step (returns at once). ``order``: see
        ``_control``."""
        self._control(order, requests, [])

    def abort(self, ids: list[str], order: int | None = None) -> None:
        """Lead only: drop requests at the next step; their slots are reused."""
        self._control(order, [], ids)

    def _control(self, order: int | None, requests: list[Request], ids: list[str]) -> None:
        """Take a submit or an abort in the order its caller made them (``order``: the
        engine's number for it; None: take it now), as ``ControlOrder`` hands them out."""
        with self._cond:
            for call in self._orders.arrive(order, (requests, ids)):
                self._take(*call)
            self._cond.notify_all()

    def _take(self, requests: list[Request], ids: list[str]) -> None:
        self._submitted.extend(requests)
        self._aborted.extend(ids)
        self._unstreamed.update(r.id for r in requests if not r.stream)
        self._unstreamed.difference_update(ids)

    def poll(self, wait_s: float) -> Polled:
        """Lead only: the events of every step since the last poll, grouped per step, and
        the scheduler's counts. Waits up to ``wait_s`` for a step; once there are events,
        until they are due (``_hold``: a stream's continuation ``LINGER_S`` after it was
        made, so that the next steps' join it; a request nobody streams ``FINAL_HOLD_S``;
        a first token, a finish or an error at once). Raises what stopped the loop."""
        with self._cond:
            idle_until = time.monotonic() + wait_s
            while self._failed is None and not self._stopping:
                until = self._due if self._events else idle_until
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._failed is not None:
                raise RuntimeError(f"the step loop failed: {self._failed!r}") from self._failed
            events, self._events = self._events, []
            self._due = math.inf
            return Polled(events, *self._counts, cache=self._cache)

    def stop(self) -> None:
        """Lead only: end the loop (the followers are told to stop too)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def memory(self) -> dict[str, float]:
        """Peak resident memory, how much of it came after the process had started
        (weights actually touched, KV cache, activations), and what is resident now,
        split into anonymous memory and pages of mapped files (a memory-mapped shard's
        pages count while mapped, but the kernel can drop them under pressure).

        With prepacked (oneDNN) weights the peak counts a weight twice, once as the
        mapped shard's pages read while packing and once packed; ``anon_growth_mb`` is
        what the rank holds that the kernel cannot drop."""
        peak = peak_rss_mb()
        now = resident_mb()
        out = {"peak_rss_mb": peak, "growth_mb": round(peak - self._rss_before_load, 1), **now}
        if "anon_rss_mb" in now:
            out["anon_growth_mb"] = round(now["anon_rss_mb"] - self._anon_before_load, 1)
        if self.model is not None:  # what the growth holds, counted tensor by tensor
            out["weights_mb"] = round(self.model.weight_bytes() / 2**20, 1)
            out["kv_cache_mb"] = round(self.model.kv_cache_bytes() / 2**20, 1)
        return out

    def kv_written(self) -> list[int]:
        """The KV cache positions this rank has written (nonzero keys in any layer), for
        checks that every rank of a gang laid its KV out as the lead planned. Read from
        the calling thread: meaningful only while the gang is idle."""
        if self.model is None:
            return []
        written = None
        for layer in self.model.layers:
            cache = layer.attention.cache_k
            assert cache is not None
            here = cache.ne(0).any(dim=2).any(dim=1)  # [P,K,D] -> [P]
            written = here if written is None else written | here
        assert written is not None
        return written.nonzero().squeeze(1).tolist()


def configure_rank_logging(rank: int, level: int = logging.INFO) -> None:
    """Put the rank in this process's log prefix (a rank's process is its own), at the
    driver's verbosity: ranks are never muted, just as chatty as the driver asked."""
    fmt = f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    if not any(getattr(h, "_mpllama_rank", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler._mpllama_rank = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for handler in root.handlers:
        if getattr(handler, "_mpllama_rank", False):
            handler.setFormatter(logging.Formatter(fmt))
    root.setLevel(level)
