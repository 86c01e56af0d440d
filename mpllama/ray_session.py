"""The Ray runtime mpllama starts for itself, shared by every client in the process.

``ray.init`` never runs on a caller's thread here, but on one that lives as long as the
process (ray_thread.py says why).

Why a local runtime's processes get a session of their own (Linux): Ray starts them in
the caller's process group, so a signal to the whole group (`kill -TERM -PGID`, a
supervisor stopping a process group) reached the GCS and raylet as well: they died while
the program was still shutting down through them, and it hung until Ray killed it (the
same 60 s). In their own session only the program gets the signal, and it stops them
itself; fate sharing (above) still stops them when the program dies.

Why the runtime is watched: if its GCS or raylet dies anyway (the OOM killer, a kill
of every process in a cgroup), every client would hang in its next Ray call that needs
them and the process would be killed 60 s later. A watchdog thread notices within half a
second, tells each client (``Hold.on_lost``: fail what is in flight with a clear
MpllamaError, make no more Ray calls), then shuts the dead runtime down, so the process
lives on and the next client starts a fresh one.

Clients share one runtime and count their holds (``acquire`` / ``Hold.release``): it is
stopped when the last client that holds it lets go. A runtime the caller started itself
(``ray.init`` before the first client) is theirs: used, never stopped or watched here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .errors import MpllamaError, RuntimeLostError
from .ray_thread import on_lasting_thread

log = logging.getLogger(__name__)


# How often the watchdog looks at a local runtime's GCS and raylet.
WATCH_EVERY_S = 0.5
# glibc's malloc setting the local runtime's processes start with (``_huge_page_malloc``).
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"
# Longest the watchdog waits for one client to stop using a runtime that died.
LOST_CALLBACK_TIMEOUT_S = 10.0
# How long a healthy runtime is left to deliver the workers' last output before this
# process shuts Ray down (``_stop``): what Ray's own exit hook waits.
LOG_FLUSH_S = 0.5
# Ray's driver waits this long at shutdown to flush task events to a GCS that may be
# gone (its default, 5 s, would be added to every shutdown of a runtime that died).
_SYSTEM_CONFIG = {"task_events_shutdown_flush_timeout_ms": 1000}

_lock = threading.RLock()  # held across a whole acquire/release: one start at a time
_current: _Runtime | None = None  # the runtime mpllama started and still holds


class _Runtime:
    """A runtime mpllama started: its holders, and (local ones) the watchdog's state."""

    def __init__(self, local: bool) -> None:
        self.local = local
        self.holders = 0
        self.stopped = False  # ray.shutdown() ran or runs (by its last holder or the watchdog)
        self.lost: MpllamaError | None = None  # why it died under its holders
        self.holds: weakref.WeakSet[Hold] = weakref.WeakSet()
        self.processes: dict[str, Any] = {}  # "gcs_server"/"raylet" -> subprocess.Popen

    def dead(self) -> str | None:
        """Which of its vital processes has exited, and how; None while all run."""
        for name, process in self.processes.items():
            code = process.poll()
            if code is not None:
                how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
                return f"its {name} (pid {process.pid}) exited ({how})"
        return None

    def lost_error(self) -> MpllamaError | None:
        """Why it died under its holders, or None; looks at the processes themselves, so
        it is right before the watchdog has looked."""
        if self.lost is not None or self.stopped:
            return self.lost  # None once stopped on purpose: its processes exit then
        why = self.dead()
        return _lost_error(why) if why is not None else None


class Hold:
    """One client's share of the runtime. ``local``: mpllama started a local runtime for
    this client (its ranks may then share the machine's cores)."""

    def __init__(self, runtime: _Runtime | None, local: bool) -> None:
        self.counted = runtime is not None  # False: the caller's own runtime
        self.local = local
        self._runtime = runtime
        self._released = False
        self._on_lost: Callable[[MpllamaError], None] | None = None
        if runtime is not None:
            runtime.holds.add(self)

    def lost(self) -> MpllamaError | None:
        """Why the runtime died under this client (its GCS or raylet exited), or None."""
        return self._runtime.lost_error() if self._runtime is not None else None

    def on_lost(self, callback: Callable[[MpllamaError], None]) -> None:
        """Have ``callback(error)`` run (once, on the watchdog thread) if the runtime
        dies under this client; it must fail what is in flight, make no Ray call that
        needs the GCS, and return within LOST_CALLBACK_TIMEOUT_S."""
        self._on_lost = callback

    def release(self) -> None:
        """Let go; the last holder of a runtime mpllama started stops it. Idempotent."""
        if self._released:
            return
        self._released = True
        runtime = self._runtime
        if runtime is None:
            return
        with _lock:
            if runtime.stopped:
                return  # stopped already (it died, or someone called ray.shutdown())
            runtime.holders -= 1
            if runtime.holders == 0:
                _stop(runtime)


def acquire(address: str | None, num_cpus: int) -> Hold:
    """Hold Ray for one client: the caller's runtime if Ray is already initialised, else
    the one mpllama started for an earlier client, else a new one: connected to
    ``address`` (a cluster), or a local runtime of ``num_cpus`` CPUs."""
    global _current
    import ray

    with _lock:
        if _current is not None and not ray.is_initialized():
            _current.stopped = True  # somebody called ray.shutdown() under us: start afresh
            _current = None
        if _current is not None:
            _current.holders += 1
            return Hold(_current, local=False)
        if ray.is_initialized():
            return Hold(None, local=False)
        runtime = _Runtime(local=not address)
        if address:
            on_lasting_thread(
                lambda: _keeping_sigterm(
                    lambda: ray.init(address=address, logging_level=logging.WARNING)
                )
            )
        else:
            on_lasting_thread(lambda: _keeping_sigterm(lambda: _init_local(num_cpus)))
            runtime.processes = _vital_processes()
            threading.Thread(
                target=_watch, args=(runtime,), name="mpllama-ray-watchdog", daemon=True
            ).start()
        runtime.holders = 1
        _current = runtime
        return Hold(runtime, local=runtime.local)


def lost() -> MpllamaError | None:
    """Why the runtime mpllama started and still holds died, or None (also when it holds
    none, or the watchdog has already shut the dead one down)."""
    runtime = _current
    return runtime.lost_error() if runtime is not None else None


def local_cpus(need: float) -> int:
    """CPUs to give a local runtime: the machine's, or more when the gang asks for more
    (a rank's CPUs are a scheduling share, not a hard reservation)."""
    return max(os.cpu_count() or 1, math.ceil(need))


def _init_local(num_cpus: int) -> None:
    """``ray.init`` of a local runtime whose processes each get a session of their own
    (Linux, where fate sharing stops them with this process; see the module's doc)."""
    import ray
    from ray._private import services, utils

    def init() -> None:
        # address="local": never attach to a cluster `ray start` left on this machine.
        with _huge_page_malloc():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                _system_config=dict(_SYSTEM_CONFIG),  # ray.init adds to the dict it is given
            )

    popen = getattr(services, "ConsolePopen", None)
    if popen is None or not (
        sys.platform.startswith("linux") and utils.detect_fate_sharing_support()
    ):
        return init()  # without fate sharing, Ray's reaper needs our process group

    class OwnSession(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, start_new_session=True, **kwargs)

    services.ConsolePopen = OwnSession
    try:
        init()
    finally:
        services.ConsolePopen = popen


@contextlib.contextmanager
def _huge_page_malloc() -> Iterator[None]:
    """While ``ray.init`` starts a local runtime: GLIBC_TUNABLES with glibc's malloc
    madvising its heaps and large blocks for transparent huge pages, in the environment
    the GCS and raylet start with and every worker (every rank) inherits from the raylet.

    torch's own setting (``rank.dist.use_huge_pages``) madvises each large tensor, but its
    allocations are not 2 MiB-aligned, so only their aligned interiors get huge pages:
    about half of a rank's bf16 weights on the bench model (a 2 MiB weight, none). With
    glibc's, nearly all; one request's products streamed at 92% of the memory's measured
    speed instead of 85% (benchmarks/RESULTS.md, "Figures behind the code"). glibc reads
    the setting when a process starts, so it changes nothing in this one, and it is put
    back once the runtime is up; a cluster's nodes take it from ``ray start``'s
    environment (launch/cluster.yaml)."""
    old = os.environ.get("GLIBC_TUNABLES")
    if old and "glibc.malloc.hugetlb" in old:  # the user's own choice stands
        yield
        return
    os.environ["GLIBC_TUNABLES"] = f"{old}:{HUGE_PAGE_MALLOC}" if old else HUGE_PAGE_MALLOC
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = old


def _keeping_sigterm(init: Callable[[], None]) -> None:
    """Run ``init`` (a ``ray.init``); on the main thread Ray sets a SIGTERM handler of
    its own (``sys.exit``), which is right for a program that has none, but a handler the
    program set itself (``mpllama serve``'s, say) stays."""
    if threading.current_thread() is not threading.main_thread():
        return init()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        init()
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _vital_processes() -> dict[str, Any]:
    """The GCS and raylet of the local runtime just started (their Popen objects)."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    found: dict[str, Any] = {}
    for name in ("gcs_server", "raylet"):
        for info in (getattr(node, "all_processes", None) or {}).get(name, []):
            found[name] = info.process
    if len(found) < 2:
        log.debug("cannot watch the local Ray runtime: its processes are not known")
    return found


def _watch(runtime: _Runtime) -> None:
    """The watchdog of one local runtime: returns when it is stopped, or after handling
    its death (see the module's doc)."""
    while True:
        if runtime.stopped:
            return
        why = runtime.dead()
        if why is not None:
            break
        time.sleep(WATCH_EVERY_S)
    with _lock:
        if runtime.stopped:
            return  # its processes exited because it was shut down
        runtime.lost = error = _lost_error(why)
        holds = list(runtime.holds)
    log.warning("the local Ray runtime died (%s): failing its clients' requests", why)
    for hold in holds:
        if hold._on_lost is not None and not hold._released:
            _call_bounded(hold._on_lost, error)
    with _lock:
        if not runtime.stopped:
            _stop(runtime)  # what is left of it; the process itself lives on


def _stop(runtime: _Runtime) -> None:
    """Shut a runtime mpllama started down. Called with ``_lock`` held."""
    global _current
    import ray

    runtime.stopped = True
    if _current is runtime:
        _current = None
    # A raylet that died leaves its agents and workers orphaned (the agents wait on the
    # dead GCS for a minute before they exit): end what is left of its session, before
    # ray.shutdown too, which otherwise waits 10 s on the orphaned metrics agent.
    sessions = {p.pid for p in runtime.processes.values()}
    if runtime.lost is not None or runtime.dead() is not None:
        _kill_sessions(sessions)
    elif ray.is_initialized():
        # Ray forwards the workers' output to this process a little after they print it,
        # and ray.shutdown() drops what has not arrived (ray-project/ray#31931): the ranks'
        # last lines, or a short run's set-up logs under -v. Ray's own exit hook waits
        # as long before it shuts down.
        time.sleep(LOG_FLUSH_S)
    if ray.is_initialized():
        ray.shutdown()
    _kill_sessions(sessions)


def _kill_sessions(sessions: set[int]) -> None:
    """SIGKILL every process left in these sessions (never this process's own)."""
    sessions.discard(os.getsid(0))
    if not sessions or not os.path.isdir("/proc"):
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) in sessions:
                os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass  # gone meanwhile, or not ours to see


def _call_bounded(callback: Callable[[MpllamaError], None], error: MpllamaError) -> None:
    done = threading.Thread(target=callback, args=(error,), name="mpllama-ray-lost", daemon=True)
    done.start()
    done.join(LOST_CALLBACK_TIMEOUT_S)
    if done.is_alive():
        log.warning(
            "a client of the lost Ray runtime did not stop within %gs", LOST_CALLBACK_TIMEOUT_S
        )


def _lost_error(why: str) -> RuntimeLostError:
    return RuntimeLostError(
        f"the local Ray runtime mpllama started for this process stopped under it: {why}. "
        "Requests in flight failed; make a new LLM (or restart the command) to start a "
        "fresh runtime, and see the logs under /tmp/ray/session_latest/logs for the cause"
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
