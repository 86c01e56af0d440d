"""The Ray side of one gang: one placement group and one actor per model-parallel rank,
rendezvous through rank 0, ``call_all`` for set-up calls, and heartbeats that notice a
stopped rank. ``engine.py`` drives the running gang (submit, abort, events, rebuild).

Any failure of any rank (an exception, a dead process, a call past its timeout) takes
the whole gang down: a surviving rank would otherwise sit in its next collective forever.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import (
    NODE_ID_LABEL_KEY,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import ray_session
from .config import ParallelConfig
from .errors import PlacementError, WorkerError
from .protocol import Polled, RankSpec, Request

log = logging.getLogger(__name__)


class RankActor:
    """One rank in a Ray actor: a RankWorker, plus what only Ray knows (the node's
    address). The worker (torch, fairscale, the model) is imported in the actor's own
    process, so the driver side (LLM, AsyncLLM, Serve replicas, jobs) never loads torch."""

    def __init__(self, rank: int, spec: RankSpec) -> None:
        from .rank.dist import use_huge_pages
        from .rank.worker import RankWorker, configure_rank_logging

        use_huge_pages()  # before this process allocates any tensor
        configure_rank_logging(rank, spec.log_level)
        self.worker = RankWorker(rank, spec)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def open_store(self, host: str) -> int:
        return self.worker.open_store(host)

    def setup_on_node(self, host: str, port: int) -> dict[str, Any]:
        info = self.worker.setup(host, port, self.node_ip())
        return {
            **info,
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": self.node_ip(),
        }

    def memory(self) -> dict[str, float]:
        return self.worker.memory()

    def kv_written(self) -> list[int]:
        return self.worker.kv_written()

    @ray.method(concurrency_group="health")
    def heartbeat(self) -> int:
        """Answered on its own thread even mid-step: silence means a stopped process."""
        return self.worker.rank

    # The loop holds its thread for the gang's life; the lead's control calls reach it
    # through RankWorker's queues from a thread of their own.
    @ray.method(concurrency_group="loop")
    def run(self) -> None:
        self.worker.run()

    @ray.method(concurrency_group="control")
    def submit(self, requests: list[Request], order: int) -> None:
        self.worker.submit(requests, order)

    @ray.method(concurrency_group="control")
    def abort(self, ids: list[str], order: int) -> None:
        self.worker.abort(ids, order)

    # Its own thread: a poll waits for the next step, and submit/abort must not queue
    # behind it.
    @ray.method(concurrency_group="events")
    def poll(self, wait_s: float) -> Polled:
        return self.worker.poll(wait_s)

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        self.worker.stop()


# Set-up calls run one at a time on the default thread; the loop, the lead's control
# calls and heartbeats each on a thread of their own. Ray runs each call as it arrives
# (allow_out_of_order_execution), not in its caller's order: an in-order actor waits for
# each caller's calls by sequence number, and in Ray 2.60 that wait, per concurrency group,
# twice stalled a rank on a call that never came ("Timed out waiting for seq_no ... an
# expected task failed to arrive"), after which Ray failed every queued call and the gang
# was rebuilt. Nothing here needs Ray's order: set-up calls are awaited one by one, and
# the engine numbers its submits and aborts, which the lead takes in that order
# (RankWorker._control).
_RemoteRank = ray.remote(
    max_restarts=0,
    max_task_retries=0,
    concurrency_groups={"health": 1, "loop": 1, "control": 1, "events": 1},
    allow_out_of_order_execution=True,
)(RankActor)


class Gang:
    """The rank actors of one engine, set up and ready to run. Needs ``ray.init``."""

    def __init__(
        self,
        spec: RankSpec,
        parallel: ParallelConfig,
        node_id: str | None = None,
        placement_group: Any = None,
    ) -> None:
        self.spec = spec
        self.parallel = parallel
        self.node_id = node_id  # a node every rank must run on (replicas spread this way)
        # A group lent by its owner (a Ray Serve replica lends its own, so Serve reserves
        # every rank's resources with the replica): rank i goes in bundle i, rebuilds reuse
        # the same bundles, and only the owner removes it. None = reserve a group of our own.
        self.lent_pg = placement_group
        self.world_size = spec.world_size
        self.actors: list[Any] = []
        self.pg: Any = None
        self.rank_info: list[dict[str, Any]] = []
        self._up = False  # set once the gang is set up: heartbeats are checked from then on
        self.start()

    # ------------------------------------------------------------------ life cycle

    def bundle(self) -> dict[str, float]:
        return rank_bundle(self.spec, self.parallel)

    def start(self) -> None:
        """Reserve the placement group, start the actors, rendezvous, load the shards.

        Always a fresh gang: a new placement group, new actors, a new rendezvous port.
        Whatever fails on the way (including Ctrl-C) leaves nothing behind.
        """
        self.shutdown()
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    def _start(self) -> None:
        bundle = self.bundle()
        strategy = self.parallel.placement_strategy
        if strategy == "auto":
            # One node when one can hold the whole gang (collectives stay off the network).
            strategy = "STRICT_PACK" if node_fits(bundle, self.world_size) else "PACK"
        pin = [{NODE_ID_LABEL_KEY: self.node_id}] * self.world_size if self.node_id else None
        if self.lent_pg is not None:
            self.pg = _check_lent(self.lent_pg, bundle, self.world_size)
        else:
            self.pg = placement_group(
                [dict(bundle)] * self.world_size, strategy=strategy, bundle_label_selector=pin
            )
        ready, _ = ray.wait([self.pg.ready()], timeout=self.parallel.placement_timeout_s)
        if not ready:
            available = {
                k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU", "memory")
            }
            self.shutdown()
            where = f" on node {self.node_id[:12]}" if self.node_id else ""
            raise PlacementError(
                f"could not place {self.world_size} rank(s) of {bundle} each ({strategy}{where}) "
                f"within {self.parallel.placement_timeout_s:g}s; the cluster has {available} "
                "free. Check `ray status`, lower parallel.cpus_per_rank / gpus_per_rank, "
                "or use a looser placement_strategy"
            )
        # Ray sets OMP_NUM_THREADS from num_cpus; torch's own thread count follows it.
        threads = max(1, math.floor(self.parallel.cpus_per_rank))
        spec = self.spec if self.spec.threads == threads else _with_threads(self.spec, threads)
        self.actors = [
            _RemoteRank.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=rank
                ),
            ).remote(rank, spec)
            for rank in range(self.world_size)
        ]
        timeout = self.parallel.call_timeout_s
        host = self.call_one(0, "node_ip", timeout=timeout)
        port = self.call_one(0, "open_store", host, timeout=timeout)
        self.rank_info = self.call_all("setup_on_node", host, port, timeout=timeout)
        self._up = True
        log.info(
            "engine up: %d rank(s) %s",
            self.world_size,
            [(i["device"], i["backend"]) for i in self.rank_info],
        )

    def shutdown(self) -> None:
        """Kill every actor and free the placement group. Safe to call twice."""
        if ray_session.lost() is not None or not ray.is_initialized():
            self.forget()  # a dead GCS would hang the calls below; the ranks die with it
            return
        self._up = False
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead, or Ray is shutting down
                pass
        self.actors = []
        if self.pg is not None and self.pg is not self.lent_pg:  # a lent group is its owner's
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None

    def forget(self) -> None:
        """Drop the actors and the placement group without a Ray call: for a runtime
        that died, whose processes take the ranks with them."""
        self._up = False
        self.actors = []
        self.pg = None

    @property
    def alive(self) -> bool:
        return bool(self.actors)

    @property
    def lead(self) -> Any:
        return self.actors[0]

    # ------------------------------------------------------------------ calls

    def call_one(self, rank: int, method: str, *args: Any, timeout: float | None = None) -> Any:
        return self._gather(
            {rank: getattr(self.actors[rank], method).remote(*args)}, method, timeout
        )[0]

    def call_all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Call ``method`` on every rank; return each rank's result, in rank order.

        The first failure (or the timeout) tears the gang down and raises WorkerError
        naming the rank and method, with the remote traceback.
        """
        if not self.actors:
            raise WorkerError(f"cannot call {method}: the engine has been shut down", method=method)
        refs = {rank: getattr(a, method).remote(*args) for rank, a in enumerate(self.actors)}
        return self._gather(refs, method, timeout)

    def _gather(self, refs: dict[int, Any], method: str, timeout: float | None) -> list[Any]:
        timeout = self.parallel.call_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        rank_of = {ref: rank for rank, ref in refs.items()}
        pending = list(refs.values())
        results: dict[int, Any] = {}
        heartbeats = Heartbeats(self, list(refs), self.parallel.heartbeat_timeout_s)
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(
                pending, num_returns=1, timeout=max(0.0, min(left, heartbeats.interval))
            )
            if not ready and left > heartbeats.interval:
                silent = heartbeats.check() if self._up else None
                if silent is not None:
                    self.shutdown()
                    raise WorkerError(
                        f"rank {silent} stopped answering during {method}: no heartbeat for "
                        f"{heartbeats.limit:g}s (parallel.heartbeat_timeout_s); the process "
                        "is stopped or starved. The gang was stopped",
                        rank=silent,
                        method=method,
                    )
                continue
            if not ready:
                late = sorted(rank_of[r] for r in pending)
                self.shutdown()
                raise WorkerError(
                    f"rank(s) {late} did not finish {method} within {timeout:g}s "
                    "(parallel.call_timeout_s); the gang was stopped",
                    rank=late[0],
                    method=method,
                )
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except (RayTaskError, RayActorError, GetTimeoutError) as exc:
                    error = worker_error(exc, rank, method)
                    if not isinstance(exc, RayActorError) and pending:
                        # A rank that raised may be a survivor whose collective broke
                        # because a peer died: name the dead peer, the root cause.
                        error = _dead_peer(pending, rank_of, method) or error
                    self.shutdown()
                    raise error from None
        return [results[rank] for rank in sorted(results)]


def rank_bundle(spec: RankSpec, parallel: ParallelConfig) -> dict[str, float]:
    """What one rank reserves: its CPUs, and a GPU when the cluster has them (unless the
    spec asks for the CPU) or when gpus_per_rank says so."""
    gpus = parallel.gpus_per_rank
    if gpus is None:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0 and spec.device != "cpu"
        gpus = 1.0 if has_gpu else 0.0
    bundle = {"CPU": float(parallel.cpus_per_rank or 1)}
    if gpus:
        bundle["GPU"] = float(gpus)
    return bundle


def node_fits(bundle: dict[str, float], count: int) -> bool:
    """Whether some live node has, in all, room for ``count`` bundles."""
    for node in ray.nodes():
        have = node.get("Resources", {})
        if node.get("Alive") and all(have.get(k, 0) >= v * count for k, v in bundle.items()):
            return True
    return False


def _check_lent(pg: Any, bundle: dict[str, float], world_size: int) -> Any:
    specs = pg.bundle_specs
    if len(specs) != world_size or any(
        spec.get(k, 0.0) < v for spec in specs for k, v in bundle.items()
    ):
        raise PlacementError(
            f"the placement group lent to this gang has bundles {specs}; {world_size} rank(s) "
            f"need {world_size} bundle(s) of at least {bundle} each"
        )
    return pg


class Heartbeats:
    """One outstanding ``heartbeat`` call per rank while a long call runs. Gloo does not
    time out a collective whose peer process is stopped (SIGSTOP, a frozen VM): without
    this, such a rank would only be noticed after call_timeout_s."""

    def __init__(self, gang: Gang, ranks: list[int], limit: float) -> None:
        self.gang, self.ranks, self.limit = gang, ranks, limit
        self.interval = min(1.0, limit / 4)
        self.sent: dict[int, tuple[Any, float]] = {}  # rank -> (ref, when sent)

    def check(self) -> int | None:
        """Send a heartbeat to each rank without one in flight; return a rank whose
        heartbeat has gone unanswered for ``limit`` seconds, if any."""
        now = time.monotonic()
        in_flight = [ref for ref, _ in self.sent.values()]
        done = (
            set(ray.wait(in_flight, num_returns=len(in_flight), timeout=0)[0])
            if in_flight
            else set()
        )
        for rank in self.ranks:
            if rank in self.sent and self.sent[rank][0] in done:
                del self.sent[rank]  # answered (or the rank died: the call itself says so)
            if rank not in self.sent:
                self.sent[rank] = (self.gang.actors[rank].heartbeat.remote(), now)
            elif now - self.sent[rank][1] > self.limit:
                return rank
        return None


# How long a failed call waits to see whether another rank died (the likelier root cause).
_PEER_GRACE_S = 0.5


def _dead_peer(pending: list[Any], rank_of: dict[Any, int], method: str) -> WorkerError | None:
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=_PEER_GRACE_S)
    for ref in ready:
        try:
            ray.get(ref)
        except RayActorError as exc:
            return worker_error(exc, rank_of[ref], method)
        except Exception:
            pass
    return None


def worker_error(exc: Exception, rank: int, method: str) -> WorkerError:
    # Ray colours the task name for terminals; logs and error files want plain text.
    remote = _ANSI.sub("", str(exc))
    if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
        cause = getattr(exc, "cause", None) or exc
        message = f"rank {rank} raised {type(cause).__name__} in {method}: {cause}"
        return WorkerError(message, rank=rank, method=method, remote_traceback=remote)
    return WorkerError(
        f"rank {rank} died during {method}: {remote.splitlines()[0]}",
        rank=rank,
        method=method,
        remote_traceback=remote,
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _with_threads(spec: RankSpec, threads: int) -> RankSpec:
    return replace(spec, threads=threads)
