"""``mpllama serve`` on the driver: join (or start) Ray, start Serve on
serve.host:serve.port, deploy the replicas of ``server.OpenAIServer`` and wait until
they answer; tear all of it down again on close or failure.

Closing drains: the application is deleted first, so the proxy stops routing new
requests to it while each replica finishes what it is running (Serve's graceful
shutdown, for up to serve.drain_timeout_s, then the replica and its gang are killed);
only then do Serve's proxy and controller go, then Ray if this server started it. Every
step is bounded: a Ray runtime that died under the server (ray_session.py watches the one
it starts) is not asked to tear anything down, and a teardown that hangs is given up.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import ray
from ray import serve

from . import checkpoint, shard_axes
from .config import RunConfig, api_key_from_env, ray_address_from_env
from .errors import ConfigError, MpllamaError, PlacementError
from .server import OpenAIServer

log = logging.getLogger(__name__)

APP_NAME = "mpllama"  # the Serve application's name (`serve status` shows it)
# How often a draining replica checks whether its requests are done, and the driver
# whether the application is gone.
DRAIN_POLL_S = 0.25
# Longest Serve's own teardown may take on top of the drain (the proxy and controller go
# in a second or two); past it the server gives up on Serve and stops Ray regardless.
TEARDOWN_S = 15.0


class Server:
    """``mpllama serve`` on the driver: joins (or starts) Ray, starts Serve on
    serve.host:serve.port, deploys ``serve.replicas`` replicas and waits until they
    answer. ``close()`` removes the application, Serve and Ray if it started them."""

    def __init__(self, config: RunConfig) -> None:
        if not config.model.checkpoint_dir:
            raise ConfigError("no model.checkpoint_dir in the serve YAML")
        if config.parallel.replicas != 1:
            raise ConfigError(
                f"parallel.replicas={config.parallel.replicas!r}: a Serve replica holds one "
                "gang; set serve.replicas for more gangs behind the server"
            )
        self.config = config
        self.model_name = (
            config.serve.model_name or Path(config.model.checkpoint_dir).resolve().name
        )
        self.api_key = config.serve.api_key or api_key_from_env()
        host = config.serve.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{config.serve.port}"
        self._owns_serve = self._deployed = False
        self._ray: Any = None  # ray_session.Hold once Ray is joined
        self._lost = threading.Event()  # set when the Ray runtime died under the server

    def start(self) -> str:
        """Deploy and wait until every replica is up and the HTTP proxy answers; returns
        the base URL (the OpenAI base_url is it plus /v1). On failure nothing is left."""
        world = self._check_checkpoint()
        try:
            local = self._start_ray(world)
            existing = serve.status()
            if existing.applications or existing.proxies:
                raise MpllamaError(
                    "Ray Serve already runs on this cluster (applications: "
                    f"{sorted(existing.applications) or 'none'}); `mpllama serve` starts its "
                    "own on serve.host:serve.port. Stop the other one (`serve shutdown`) first"
                )
            _check_port(self.config.serve.host, self.config.serve.port)
            serve.start(
                http_options={"host": self.config.serve.host, "port": self.config.serve.port}
            )
            self._owns_serve = True
            application = self.application(world, local)
            self._deployed = True
            serve.run_many(
                [serve.RunTarget(application, name=APP_NAME, route_prefix="/")],
                wait_for_applications_running=False,
            )
            self._wait_running()
            self._wait_http()
        except BaseException:
            self.close()
            raise
        return self.url

    def application(self, world: int, local: bool) -> Any:
        """The Serve application: ``replicas`` copies of OpenAIServer, each reserving one
        placement-group bundle per rank (the replica itself takes no resources of its own:
        it sits in rank 0's bundle)."""
        serve_cfg = self.config.serve
        bundle = self._bundle(world, local)
        strategy = _strategy(self.config.parallel.placement_strategy, bundle, world)
        parallel = dataclasses.replace(
            self.config.parallel,
            model_parallel_size=world,
            cpus_per_rank=bundle["CPU"],
            gpus_per_rank=bundle.get("GPU", 0.0),
            placement_strategy=strategy,
        )
        # The key travels as its own argument, not inside the config.
        serve_only = dataclasses.replace(serve_cfg, api_key=None)
        config = dataclasses.replace(self.config, parallel=parallel, serve=serve_only)
        capacity = self.config.runtime.max_batch_size + serve_cfg.max_queued_requests
        deployment = serve.deployment(
            OpenAIServer,
            name="OpenAIServer",
            num_replicas=serve_cfg.replicas,
            ray_actor_options={"num_cpus": 0},
            placement_group_bundles=[dict(bundle) for _ in range(world)],
            placement_group_strategy=strategy,
            # Above the replica's own limit, so the replica (not Serve) turns requests
            # away, with 429; Serve's router still prefers the least-busy replica.
            max_ongoing_requests=capacity + 16,
            max_constructor_retry_count=1,
            # Deleting the application drains each replica: it waits for its requests
            # in flight, for up to drain_timeout_s, before Serve kills it.
            graceful_shutdown_timeout_s=serve_cfg.drain_timeout_s,
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        )
        return deployment.bind(config, self.model_name, self.api_key)

    def _bundle(self, world: int, local: bool) -> dict[str, float]:
        """One rank's resources, settled on the driver because Serve reserves them."""
        parallel, replicas = self.config.parallel, self.config.serve.replicas
        cpus = parallel.cpus_per_rank
        if cpus is None:  # as LLM does: a local runtime of ours is shared by every rank
            cpus = max(1, (os.cpu_count() or 1) // (world * replicas)) if local else 1
        gpus = parallel.gpus_per_rank
        if gpus is None:
            has_gpu = ray.cluster_resources().get("GPU", 0) > 0
            gpus = 1 if has_gpu and self.config.runtime.device != "cpu" else 0
        return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}

    def close(self) -> None:
        """Drain and remove the application, then Serve and Ray if this server started
        them (see the module's doc). Returns within serve.drain_timeout_s + TEARDOWN_S,
        plus Ray's own shutdown; idempotent."""
        if self._deployed or self._owns_serve:
            if self.lost() is not None:
                log.warning("the Ray runtime died: nothing of Serve's is left to remove")
            else:
                self._teardown_serve()
            self._deployed = self._owns_serve = False
        if self._ray is not None:
            self._ray.release()  # stops Ray only if it was started for this server
            self._ray = None

    def lost(self) -> MpllamaError | None:
        """Why the Ray runtime this server started died under it, or None."""
        return self._ray.lost() if self._ray is not None else None

    def wait_lost(self, timeout: float) -> MpllamaError | None:
        """Wait up to ``timeout`` seconds for the runtime to die under the server (its
        watchdog says so); return why, or None if it still runs."""
        self._lost.wait(timeout)
        return self.lost()

    def _teardown_serve(self) -> None:
        """Serve's teardown, on a thread of its own so that the wait is bounded even if
        a Ray call blocks (a GCS that dies meanwhile)."""
        deadline = time.monotonic() + self.config.serve.drain_timeout_s + TEARDOWN_S
        deployed, owns = self._deployed, self._owns_serve
        worker = threading.Thread(
            target=_remove_serve, args=(deployed, owns, deadline), name="mpllama-serve-close"
        )
        worker.daemon = True
        worker.start()
        while worker.is_alive():
            worker.join(min(DRAIN_POLL_S, max(0.0, deadline - time.monotonic())))
            if self.lost() is not None:
                log.warning("the Ray runtime died while Serve was being removed")
                return
            if time.monotonic() > deadline and worker.is_alive():
                log.warning(
                    "Serve was not removed within serve.drain_timeout_s + %gs; stopping without it",
                    TEARDOWN_S,
                )
                return

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ start-up steps

    def _check_checkpoint(self) -> int:
        """Checks that need no Ray, so a bad path fails in a second, not in a replica."""
        model = self.config.model
        _, args, shards = checkpoint.inspect(model.checkpoint_dir, model.tokenizer_path)
        world = self.config.parallel.model_parallel_size or len(shards)
        shard_axes.check_model_parallel(args, world)
        shard_axes.shard_plan(len(shards), world)
        return world

    def _start_ray(self, world: int) -> bool:
        """Join or start Ray (on a thread that outlives it, see ray_session.py); True when it
        is a local runtime started for this server."""
        from . import ray_session

        address = self.config.parallel.ray_address or ray_address_from_env()
        need = world * self.config.serve.replicas * (self.config.parallel.cpus_per_rank or 1)
        self._ray = ray_session.acquire(address, ray_session.local_cpus(need))
        self._ray.on_lost(lambda error: self._lost.set())
        return self._ray.local

    def _wait_running(self) -> None:
        parallel = self.config.parallel
        limit = parallel.placement_timeout_s + parallel.call_timeout_s
        deadline = time.monotonic() + limit
        while True:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                messages = [status.message] + [d.message for d in status.deployments.values()]
                raise MpllamaError(f"the replicas did not start: {_cause(messages)}")
            if time.monotonic() > deadline:
                raise PlacementError(
                    f"the replicas were not up within {limit:g}s (parallel.placement_timeout_s "
                    "+ call_timeout_s); check `ray status` for free resources and `serve status`"
                )
            time.sleep(0.5)

    def _wait_http(self, timeout_s: float = 60.0) -> None:
        """The application runs; wait until the proxy routes to it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise MpllamaError(f"{self.url}/health did not answer within {timeout_s:g}s")
            time.sleep(0.2)


def _remove_serve(deployed: bool, owns: bool, deadline: float) -> None:
    """Delete the application and wait until its replicas have drained and gone, then
    shut Serve down when this server started it. Logs what fails, raises nothing."""
    try:
        if deployed:
            serve.delete(APP_NAME, _blocking=False)
            while time.monotonic() < deadline:
                status = serve.status().applications.get(APP_NAME)
                if status is None or status.status == "NOT_STARTED":
                    break
                time.sleep(DRAIN_POLL_S)
            else:
                log.warning("the Serve application was not deleted in time")
    except Exception as exc:
        log.warning("could not delete the Serve application: %s", exc)
    if owns:
        try:
            serve.shutdown()
        except Exception as exc:
            log.warning("could not shut Serve down: %s", exc)


def _strategy(strategy: str, bundle: dict[str, float], world: int) -> str:
    """A Ray placement strategy for the replica's group; "auto" = one node when one can
    hold the whole gang (collectives stay off the network), else PACK."""
    if strategy != "auto":
        return strategy
    for node in ray.nodes():
        have = node.get("Resources", {})
        if node.get("Alive") and all(have.get(k, 0) >= v * world for k, v in bundle.items()):
            return "STRICT_PACK"
    return "PACK"


def _check_port(host: str, port: int) -> None:
    """Fail early, and clearly, when the port is taken on this machine (Serve's proxy
    would otherwise retry quietly)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use; pick another with --set serve.port=N"
                ) from None


def _cause(messages: list[str]) -> str:
    """The last line of a replica's traceback that names an error."""
    lines = [line.strip() for m in messages for line in (m or "").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or ["no message"])[-1]
