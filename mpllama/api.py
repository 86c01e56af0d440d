"""The public client. ``LLM`` validates everything it can before any actor starts, makes
the caller's inputs into requests (``Prompts``, prompts.py), hands them to the engine
(which schedules them step by step on the gang) and shapes what comes back: whole
results in input order (``generate``, ``chat``) or a stream of ``RequestOutput`` deltas
as tokens are made (``stream``). ``AsyncLLM`` (async_llm.py) is the same for asyncio
programs.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import queue
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import checkpoint, memory, ray_session, shard_axes
from .config import (
    ParallelConfig,
    RunConfig,
    RuntimeConfig,
    SamplingParams,
    load_run_config,
    ray_address_from_env,
)
from .errors import ConfigError, MpllamaError, WorkerError
from .outputs import (
    PartialOutput,
    RequestOutput,
)
from .prompts import Prompts
from .protocol import Event, RankSpec
from .tokenizer import Dialog

__all__ = ["LLM", "RequestOutput"]

log = logging.getLogger(__name__)


# Keyword arguments of LLM(...) and the settings section each belongs to.
_SECTIONS = {f.name: "parallel" for f in dataclasses.fields(ParallelConfig)}
_SECTIONS.update({f.name: "runtime" for f in dataclasses.fields(RuntimeConfig)})


class LLM:
    """A model-parallel LLaMA on a gang of Ray actors.

    ``LLM(checkpoint_dir, tokenizer_path=None, **settings)`` where settings are any field
    of ParallelConfig or RuntimeConfig (model_parallel_size, max_batch_size,
    max_seq_len, seed, backend, device, dtype, ray_address, placement_strategy, ...).
    Their defaults live in those dataclasses.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        tokenizer_path: str | os.PathLike[str] | None = None,
        *,
        config: RunConfig | None = None,
        placement_group: Any = None,
        **settings: Any,
    ) -> None:
        config = config or RunConfig()
        unknown = sorted(set(settings) - set(_SECTIONS))
        if unknown:
            raise TypeError(f"LLM() got unknown setting(s) {unknown}; allowed: {sorted(_SECTIONS)}")
        try:
            parallel = dataclasses.replace(
                config.parallel, **{k: v for k, v in settings.items() if _SECTIONS[k] == "parallel"}
            )
            runtime = dataclasses.replace(
                config.runtime, **{k: v for k, v in settings.items() if _SECTIONS[k] == "runtime"}
            )
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        model = config.model
        if checkpoint_dir is not None:
            model = dataclasses.replace(model, checkpoint_dir=str(checkpoint_dir))
        if tokenizer_path is not None:
            model = dataclasses.replace(model, tokenizer_path=str(tokenizer_path))
        if not model.checkpoint_dir:
            raise ConfigError(
                "no checkpoint_dir given (LLM(checkpoint_dir=...) or "
                "model.checkpoint_dir in the YAML)"
            )
        self.config = dataclasses.replace(config, model=model, parallel=parallel, runtime=runtime)
        self.router: Any = None
        self._ray: ray_session.Hold | None = None  # set once Ray is joined
        self._closed = False

        # Everything that can be checked on the driver is checked before Ray starts.
        self.tokenizer, self.args, shards = checkpoint.inspect(
            model.checkpoint_dir, model.tokenizer_path, model.rope_scale_factor
        )
        world = parallel.model_parallel_size or len(shards)
        shard_axes.check_model_parallel(self.args, world)
        shard_axes.shard_plan(len(shards), world)
        checkpoint.check_shards(shards, self.args)
        memory.check_kv_cache(self.args, world, runtime, parallel.gpus_per_rank)
        # Callers' inputs to requests, checked as the ranks will (every API shares it).
        self.prompts = Prompts(
            self.tokenizer, runtime.max_seq_len, self.args.vocab_size, runtime.seed
        )
        self.world_size = world
        self.spec = RankSpec(
            checkpoint_dir=str(Path(model.checkpoint_dir).resolve()),
            args=self.args,
            tokenizer_proto=self.tokenizer.model_proto,
            world_size=world,
            device=runtime.device,
            dtype=runtime.dtype,
            backend=parallel.backend,
            shm_collectives=parallel.shm_collectives,
            max_batch_size=runtime.max_batch_size,
            max_seq_len=runtime.max_seq_len,
            kv_cache_memory_gb=runtime.kv_cache_memory_gb,
            kv_block_size=runtime.kv_block_size,
            prefix_caching=runtime.prefix_caching,
            prefill_chunk_tokens=runtime.prefill_chunk_tokens,
            cpu_linear=runtime.cpu_linear,
            quantization=runtime.quantization,
            quant_group_size=runtime.quant_group_size,
            collective_timeout_s=parallel.collective_timeout_s,
            log_level=logging.getLogger("mpllama").getEffectiveLevel(),
        )
        local = self._start_ray()
        if parallel.cpus_per_rank is None:
            # A local runtime of our own: the ranks share the machine's cores.
            cpus = max(1, (os.cpu_count() or 1) // world) if local else 1
            self.config = dataclasses.replace(
                self.config, parallel=dataclasses.replace(parallel, cpus_per_rank=float(cpus))
            )
        try:
            from .router import Router

            self.router = Router(self.spec, self.config.parallel, placement_group)
        except BaseException:
            self.close()
            raise
        _LIVE.add(self)
        _close_at_exit()

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str],
        overrides: list[str] | dict[str, dict[str, Any]] | None = None,
        **settings: Any,
    ) -> LLM:
        """Build from a YAML job file; ``overrides`` are ``section.key=value`` strings."""
        return cls(config=load_run_config(path, overrides), **settings)

    @property
    def engine(self) -> Any:
        """The engine of the one gang (``replicas: 1``); with several, ``router.engines``."""
        if self.router is None or len(self.router.engines) != 1:
            raise AttributeError("this LLM has several replicas: use llm.router.engines[i]")
        return self.router.engines[0]

    @property
    def replicas(self) -> int:
        return len(self.router.engines)

    def counts(self) -> tuple[int, int]:
        """(running, waiting): requests holding KV-cache blocks and requests queued for
        one, over every gang, as the leads' schedulers last reported them."""
        return self.router.counts()

    def cache_stats(self) -> dict[str, float]:
        """The KV pool and prefix cache over every gang, as the leads last reported them
        (``Router.cache_stats``): ``kv_cache_usage``, ``prefix_hit_rate``, block and
        token counts, preemptions."""
        return self.router.cache_stats()

    # ------------------------------------------------------------------ Ray runtime

    def _start_ray(self) -> bool:
        """Join or start Ray; True when it is a local runtime started for this LLM.

        The runtime is started on a thread that outlives it, whichever thread makes this
        LLM (see ray_session.py): an LLM made in one thread, used in another and closed in a
        third leaves the process and its runtime sound."""
        address = self.config.parallel.ray_address
        if address is None:
            address = ray_address_from_env()
        # A local runtime sized for the gang, even on a laptop with fewer cores.
        need = self.world_size * (self.config.parallel.cpus_per_rank or 1)
        self._ray = ray_session.acquire(address, ray_session.local_cpus(need))
        self._ray.on_lost(self._lose)
        return self._ray.local

    def _lose(self, error: MpllamaError) -> None:
        """The runtime died under this LLM (ray_session.py's watchdog): its requests fail
        with ``error`` now, rather than wait on ranks that are gone."""
        if self.router is not None:
            for engine in self.router.engines:
                engine.lose(error)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        errors: str = "raise",
    ) -> list[RequestOutput]:
        """Complete every prompt (any number); results come back in input order.

        ``errors="return"``: an input that cannot run (too long, empty, not a string,
        ids outside the vocabulary) gets an output with finish_reason "error" and an
        ``error`` message instead of failing the call; the others run as usual.
        """
        entries = self.prompts.requests(prompts, prompt_token_ids, sampling_params, errors)
        return _finals(self._run(entries, stream=False), len(entries))

    def chat(
        self,
        dialogs: Dialog | Sequence[Dialog],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        errors: str = "raise",
    ) -> list[RequestOutput]:
        """Chat in the model's format (Llama 2 [INST] or Llama 3 headers, as the tokenizer
        says): each dialog is a list of {"role", "content"} messages, roles system, user,
        assistant and (Llama 3) tool. ``errors="return"`` also turns a malformed dialog,
        or one using a reserved Llama 2 chat tag, into an error output."""
        entries = self.prompts.dialog_requests(dialogs, sampling_params, errors)
        return _finals(self._run(entries, stream=False), len(entries))

    def stream(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        errors: str = "raise",
    ) -> Iterator[RequestOutput]:
        """Like ``generate``, but yields a ``RequestOutput`` whenever a request has new
        tokens, interleaved across requests in the order they are made; each carries the
        cumulative result and the new piece (``delta_text``, ``delta_token_ids``). A
        request's last output (``finished``) equals what ``generate`` returns for it.
        Closing the iterator early aborts the requests still running."""
        entries = self.prompts.requests(prompts, prompt_token_ids, sampling_params, errors)
        return (p.output() for p in self._run(entries))

    def as_completed(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        errors: str = "raise",
    ) -> Iterator[RequestOutput]:
        """Like ``generate``, but yields each request's finished output as soon as it
        finishes (``index`` says which input it was), for callers that act on each
        result (a batch job writing records) without reading tokens as they come: the
        lead then sends tokens in fewer, larger batches, as for ``generate``. Closing
        the iterator early aborts the requests still running."""
        entries = self.prompts.requests(prompts, prompt_token_ids, sampling_params, errors)
        return (p.output() for p in self._run(entries, stream=False) if p.finish_reason)

    def _run(self, entries: list[PartialOutput], stream: bool = True) -> Iterator[PartialOutput]:
        """Submit every request; yield each one's progress as its events arrive (the
        refused inputs first, already finished). ``stream`` False: the caller wants only
        finished outputs, so the lead may send tokens in fewer, larger batches."""
        if self._closed:
            raise WorkerError("this LLM has been closed; make a new one")
        lost = self._ray.lost() if self._ray is not None else None
        if lost is not None:
            raise lost
        refused = [p for p in entries if p.finish_reason == "error"]
        yield from refused
        by_id = {p.request.id: p for p in entries if p.finish_reason is None}
        if not by_id:
            return
        inbox: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()
        for p in by_id.values():
            p.request.stream = stream
        self.router.submit([p.request for p in by_id.values()], inbox.put)
        try:
            while by_id:
                try:
                    item = inbox.get(timeout=1.0)  # a timeout keeps Ctrl-C responsive
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                progress = by_id[item.id]
                if item.finish_reason is not None:
                    del by_id[item.id]
                progress.add(item)
                yield progress
        finally:
            if by_id:  # the caller stopped early, or something failed: free the slots
                self.router.abort(list(by_id))

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop the ranks and free their resources; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.router is not None:
            self.router.close()
        if self._ray is not None:
            self._ray.release()  # the last LLM on mpllama's own runtime stops it
        _LIVE.discard(self)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _finals(progress: Iterator[PartialOutput], n: int) -> list[RequestOutput]:
    done = {p.index: p.output(delta=False) for p in progress if p.finish_reason is not None}
    return [done[i] for i in range(n)]


# Close engines left open on interpreter exit, so no actor or placement group outlives
# the driver (Ray would reap them, but only after its own timeouts).
_LIVE: weakref.WeakSet[LLM] = weakref.WeakSet()


def _close_all() -> None:
    for llm in list(_LIVE):
        try:
            llm.close()
        except Exception:
            pass


def _close_at_exit() -> None:
    """(Re-)register ``_close_all`` so it runs before Ray's own exit hook: atexit runs
    the last registered first, and Ray registers its hook when first imported, which
    may be after mpllama was. Closing after Ray has shut down could not kill anything."""
    atexit.unregister(_close_all)
    atexit.register(_close_all)


atexit.register(_close_all)
