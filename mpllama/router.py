"""Several gangs behind one front (data parallelism): each request goes to the gang with
the fewest outstanding tokens. A gang that fails is rebuilt in the background while its
unfinished requests move to the healthy gangs, so one failing never stops the others;
requests fail only when every gang is down and rebuilding keeps failing.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from typing import Any

from .config import ParallelConfig
from .engine import Engine
from .errors import ConfigError, PlacementError, WorkerError
from .gang import node_fits, rank_bundle
from .live_requests import Live, Sink
from .protocol import RankSpec, Request

log = logging.getLogger(__name__)


class Router:
    """``replicas`` engines of one model; the same calls as one ``Engine``."""

    def __init__(
        self, spec: RankSpec, parallel: ParallelConfig, placement_group: Any = None
    ) -> None:
        """``placement_group``: a group lent by its owner for the one gang (see Gang)."""
        self.spec = spec
        self.parallel = parallel
        self.engines: list[Engine] = []
        self._lock = threading.Lock()
        auto = parallel.replicas == "auto"
        if placement_group is not None and parallel.replicas != 1:
            raise ConfigError(
                "a lent placement group holds one gang: use replicas: 1 with it (a Serve "
                "deployment scales with its own replicas)"
            )
        if placement_group is not None:
            nodes: list[str | None] = [None]
        else:
            nodes = plan_nodes(rank_bundle(spec, parallel), spec.world_size, parallel, auto)
        several = len(nodes) > 1
        started: dict[int, Engine] = {}
        errors: dict[int, BaseException] = {}

        def start(i: int, node: str | None) -> None:
            try:
                started[i] = Engine(
                    spec,
                    parallel,
                    replica=i,
                    on_failure=self._failover if several else None,
                    keep_up=several,
                    node_id=node,
                    placement_group=placement_group,
                )
            except BaseException as exc:  # noqa: BLE001 - reported below, per replica
                errors[i] = exc

        # Gangs load their shards in parallel: N replicas start in the time of one.
        threads = [threading.Thread(target=start, args=(i, n)) for i, n in enumerate(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors and not (auto and started):
            for engine in started.values():
                engine.close()
            i, first = min(errors.items())
            if isinstance(first, PlacementError) and several:
                raise PlacementError(
                    f"replica {i} of {len(nodes)}: {first}. Ask for fewer replicas, or "
                    "replicas: auto to run as many as fit"
                ) from None
            raise first
        for i, exc in sorted(errors.items()):
            log.warning(
                "replicas: auto: replica %d did not start (%s); going on without it", i, exc
            )
        self.engines = [started[i] for i in sorted(started)]
        for n, engine in enumerate(self.engines):
            engine.replica = n

    # ------------------------------------------------------------------ requests

    def submit(self, requests: list[Request], sink: Sink) -> None:
        """Spread ``requests`` over the gangs, each to the one with the least work."""
        if len(self.engines) == 1:
            self.engines[0].submit(requests, sink)
            return
        with self._lock:
            # Ids are unique across gangs: an abort by id reaches every gang.
            taken = [r.id for r in requests if any(e.owns(r.id) for e in self.engines)]
            if taken:
                raise ValueError(f"request id(s) {taken} are already in use")
            targets = self._targets()
            loads = [e.outstanding_tokens for e in targets]
            batches: list[list[Request]] = [[] for _ in targets]
            for r in requests:
                i = min(range(len(targets)), key=loads.__getitem__)
                batches[i].append(r)
                loads[i] += r.params.max_tokens
            for engine, batch in zip(targets, batches, strict=True):
                if batch:
                    engine.submit(batch, sink)

    def abort(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        for engine in self.engines:
            engine.abort(ids)

    def _targets(self) -> list[Engine]:
        """The healthy gangs; when none is, all (a down gang retries on new work)."""
        return [e for e in self.engines if e.healthy] or list(self.engines)

    def _failover(self, failed: Engine, lives: list[Live]) -> list[Live]:
        """Called by a failed engine: move its requests to the healthy gangs, or give
        them back when there are none (it replays them once rebuilt)."""
        with self._lock:
            others = [e for e in self.engines if e is not failed and e.healthy]
            if not others:
                return lives
            loads = [e.outstanding_tokens for e in others]
            moves: list[list[Live]] = [[] for _ in others]
            for live in lives:
                i = min(range(len(others)), key=loads.__getitem__)
                moves[i].append(live)
                loads[i] += live.outstanding
        log.warning(
            "replica %d failed: %d unfinished request(s) move to replica(s) %s",
            failed.replica,
            len(lives),
            [e.replica for e, m in zip(others, moves, strict=True) if m],
        )
        kept: list[Live] = []
        for engine, batch in zip(others, moves, strict=True):
            if batch:
                try:
                    engine.adopt(batch)
                except WorkerError:  # closed meanwhile
                    kept += batch
        return kept

    # ------------------------------------------------------------------ state

    def counts(self) -> tuple[int, int]:
        """Requests holding a slot and requests queued for one, over every gang, as the
        leads' schedulers last reported them."""
        return sum(e.running for e in self.engines), sum(e.waiting for e in self.engines)

    def stats(self) -> list[dict[str, Any]]:
        """Per replica: where it runs, how often its gang failed and was rebuilt, and its
        KV pool and prefix cache as its lead last reported them."""
        return [
            {
                "replica": e.replica,
                "nodes": sorted({i.get("node_ip", "?") for i in e.rank_info}),
                "restarts": e.restarts,
                "failures": list(e.failures),
                "cache": dict(e.cache),
            }
            for e in self.engines
        ]

    def cache_stats(self) -> dict[str, float]:
        """Every gang's KV pool and prefix cache together: blocks in use and cached, prompt
        tokens looked up and found (since each gang started), preemptions, and the
        derived ``kv_cache_usage`` and ``prefix_hit_rate`` (0..1)."""
        keys = (
            "kv_blocks",
            "kv_blocks_used",
            "kv_blocks_cached",
            "prefix_hit_tokens",
            "prefix_query_tokens",
            "preemptions",
        )
        out: dict[str, float] = {k: sum(e.cache.get(k, 0) for e in self.engines) for k in keys}
        out["kv_cache_usage"] = (
            out["kv_blocks_used"] / out["kv_blocks"] if out["kv_blocks"] else 0.0
        )
        queried = out["prefix_query_tokens"]
        out["prefix_hit_rate"] = out["prefix_hit_tokens"] / queried if queried else 0.0
        return out

    def close(self) -> None:
        threads = [threading.Thread(target=e.close) for e in self.engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def plan_nodes(
    bundle: dict[str, float], world: int, parallel: ParallelConfig, auto: bool
) -> list[str | None]:
    """One entry per replica: the node its gang must use, or None to let Ray choose.

    ``spread`` puts each gang on the node with the fewest gangs so far among those with
    room for a whole gang; ``pack`` (or gangs too big for any node) leaves it to Ray.
    ``auto`` counts how many gangs the cluster's free resources hold (at least one).
    """
    from ray._private.state import available_resources_per_node

    free = {n: r for n, r in available_resources_per_node().items() if r.get("CPU", 0) > 0}
    fits = {n: _how_many(r, bundle, world) for n, r in free.items()}
    one_node = node_fits(bundle, world)
    if auto:
        if one_node:
            count = sum(fits.values())
        else:  # each gang spans nodes: count by the cluster's totals
            total: dict[str, float] = {}
            for r in free.values():
                for k, v in r.items():
                    total[k] = total.get(k, 0) + v
            count = _how_many(total, bundle, world)
        count = max(1, count)
        log.info("replicas: auto: %d gang(s) of %d x %s fit", count, world, bundle)
    else:
        count = int(parallel.replicas)
    if count == 1 or parallel.replica_placement == "pack" or not one_node or len(free) < 2:
        return [None] * count
    placed = dict.fromkeys(fits, 0)
    out: list[str | None] = []
    for _ in range(count):
        room = [n for n in fits if placed[n] < fits[n]]
        if not room:  # more gangs than fit now: let Ray queue them
            out.append(None)
            continue
        node = min(room, key=lambda n: (placed[n], n))
        placed[node] += 1
        out.append(node)
    return out


def _how_many(have: dict[str, float], bundle: dict[str, float], world: int) -> int:
    return min(math.floor(have.get(k, 0) / (v * world) + 1e-9) for k, v in bundle.items())
