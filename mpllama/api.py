"""``LLM``: the public client. Validates everything it can before any actor starts,
splits prompts into batches, runs each batch on the rank gang in one call, replays a
batch on a rebuilt gang when a rank fails, and returns results in input order.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import (
    ModelArgs,
    ParallelConfig,
    RunConfig,
    RuntimeConfig,
    SamplingParams,
    load_run_config,
    ray_address_from_env,
)
from .errors import CheckpointError, ConfigError, PlacementError, PromptError, WorkerError
from .generate import Completion, Request
from .tokenizer import Dialog, Tokenizer, encode_dialog
from .worker import RankSpec

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    index: int  # position in the call's input
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" or "length"


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
        self.engine: Any = None
        self._owns_ray = False
        self._closed = False

        # Everything that can be checked on the driver is checked before Ray starts.
        self.tokenizer, self.args, shards = _inspect_checkpoint(
            model.checkpoint_dir, model.tokenizer_path
        )
        world = parallel.model_parallel_size or len(shards)
        checkpoint.check_model_parallel(self.args, world)
        checkpoint.shard_plan(len(shards), world)
        _check_shards(shards, self.args)
        self.world_size = world
        self.spec = RankSpec(
            checkpoint_dir=str(Path(model.checkpoint_dir).resolve()),
            args=self.args,
            tokenizer_proto=self.tokenizer.model_proto,
            world_size=world,
            device=runtime.device,
            dtype=runtime.dtype,
            backend=parallel.backend,
            max_batch_size=runtime.max_batch_size,
            max_seq_len=runtime.max_seq_len,
            seed=runtime.seed,
            collective_timeout_s=parallel.collective_timeout_s,
            log_level=logging.getLogger("mpllama").getEffectiveLevel(),
        )
        self._start_ray()
        try:
            from .engine import Engine

            self.engine = Engine(self.spec, parallel)
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

    # ------------------------------------------------------------------ Ray runtime

    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return  # the caller's runtime: use it, leave it running
        address = self.config.parallel.ray_address
        if address is None:
            address = ray_address_from_env()
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # A local runtime sized for the gang, even on a laptop with fewer cores: a
            # rank's CPUs are a scheduling share, not a hard reservation.
            need = math.ceil(self.world_size * self.config.parallel.cpus_per_rank)
            # address="local": never attach to a cluster `ray start` left on this machine.
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, need),
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        self._owns_ray = True

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (any number); results come back in input order."""
        requests = self._requests(prompts, prompt_token_ids, sampling_params)
        return [out for batch in self._run(requests) for out in batch]

    def chat(
        self,
        dialogs: Dialog | Sequence[Dialog],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Llama 2 chat: each dialog is a list of {"role", "content"} messages."""
        if dialogs and isinstance(dialogs[0], dict):
            dialogs = [dialogs]  # type: ignore[list-item]
        token_ids = []
        for i, dialog in enumerate(dialogs):
            try:
                token_ids.append(encode_dialog(self.tokenizer, dialog))  # type: ignore[arg-type]
            except PromptError as exc:
                raise PromptError(f"dialog {i}: {exc}") from None
        return self.generate(sampling_params=sampling_params, prompt_token_ids=token_ids)

    def stream(
        self,
        prompts: Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> Iterator[list[RequestOutput]]:
        """Like ``generate``, but yields each batch's results (in input order) as soon as
        that batch is done, so a caller can save them before the next batch runs."""
        yield from self._run(self._requests(prompts, prompt_token_ids, sampling_params))

    def _requests(
        self,
        prompts: str | Sequence[str] | None,
        prompt_token_ids: Sequence[Sequence[int]] | None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[tuple[str | None, Request]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass either prompts or prompt_token_ids (exactly one)")
        if isinstance(prompts, str):
            prompts = [prompts]
        texts: list[str | None]
        if prompts is not None:
            if not isinstance(prompts, Sequence):
                raise TypeError(
                    f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
                )
            texts = list(prompts)
            ids = [self.encode_prompt(p, i) for i, p in enumerate(texts)]
        else:
            ids = [_check_ids(t, i, self.args.vocab_size) for i, t in enumerate(prompt_token_ids)]  # type: ignore[arg-type]
            texts = [None] * len(ids)
        params = _per_request(sampling_params, len(ids))
        limit = self.config.runtime.max_seq_len
        too_long = [f"#{i} ({len(t)} tokens)" for i, t in enumerate(ids) if len(t) >= limit]
        if too_long:
            raise PromptError(
                f"prompt(s) {', '.join(too_long[:5])} do not fit max_seq_len={limit} with room "
                "to generate; shorten them or raise max_seq_len (runtime.max_seq_len)"
            )
        seed = self.config.runtime.seed
        return [
            (text, Request(t, p, p.seed if p.seed is not None else _derive_seed(seed, i)))
            for i, (text, t, p) in enumerate(zip(texts, ids, params, strict=True))
        ]

    def encode_prompt(self, prompt: Any, index: int = 0) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt #{index} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise PromptError(f"prompt #{index} is empty; give at least one character")
        return self.tokenizer.encode(prompt, bos=True, eos=False)

    def _run(self, requests: list[tuple[str | None, Request]]) -> Iterator[list[RequestOutput]]:
        size = self.config.runtime.max_batch_size
        for start in range(0, len(requests), size):
            batch = requests[start : start + size]
            completions = self._run_batch([r for _, r in batch])
            yield [
                self._output(start + offset, text, request, done)
                for offset, ((text, request), done) in enumerate(
                    zip(batch, completions, strict=True)
                )
            ]

    def _run_batch(self, batch: list[Request]) -> list[Completion]:
        """One Ray call for the batch; on a rank failure rebuild the gang and replay."""
        parallel = self.config.parallel
        for attempt in range(parallel.max_restarts + 1):
            if self._closed:
                raise WorkerError("the LLM has been closed")
            try:
                if not self.engine.alive:
                    self.engine.start()
                return self.engine.call_all("generate", batch)[0]
            except (WorkerError, PlacementError) as exc:
                if attempt == parallel.max_restarts:
                    raise
                delay = parallel.restart_backoff_s * 2**attempt
                log.warning(
                    "%s; rebuilding the gang in %.1fs (retry %d of %d)",
                    str(exc).splitlines()[0],
                    delay,
                    attempt + 1,
                    parallel.max_restarts,
                )
                self.engine.shutdown()
                time.sleep(delay)
            except BaseException:
                # Ctrl-C (or any error of ours) mid-batch: the ranks would go on computing
                # a batch nobody reads and delay the next call; stop them, rebuild later.
                self.engine.shutdown()
                raise
        raise AssertionError("unreachable")

    def _output(
        self, index: int, prompt: str | None, request: Request, done: Completion
    ) -> RequestOutput:
        if done.error is not None:  # the driver checks first, so this is a rank-side veto
            raise PromptError(f"request #{index}: {done.error}")
        text = done.text
        if request.params.echo:
            shown = (
                prompt if prompt is not None else self.tokenizer.decode(request.prompt_token_ids)
            )
            text = shown + text
        return RequestOutput(
            index,
            prompt,
            request.prompt_token_ids,
            text,
            done.token_ids,
            done.logprobs,
            done.finish_reason,
        )

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop the ranks and free their resources; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.engine is not None:
            self.engine.shutdown()
        if self._owns_ray:
            import ray

            ray.shutdown()
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


def _inspect_checkpoint(
    checkpoint_dir: str, tokenizer_path: str | None
) -> tuple[Tokenizer, ModelArgs, list[Path]]:
    shards = checkpoint.find_shards(checkpoint_dir)
    args = checkpoint.read_params(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint.find_tokenizer(checkpoint_dir, tokenizer_path))
    args = checkpoint.resolve_vocab(
        args, tokenizer.n_words, str(Path(checkpoint_dir) / "params.json")
    )
    return tokenizer, args, shards


def _check_shards(shards: list[Path], args: ModelArgs) -> None:
    """Every shard's keys and shapes, read on the driver before any actor starts.

    Shards are memory-mapped, so this reads the pickled index of each file, not the
    weights: milliseconds even for a 70B checkpoint. A truncated file, one that would
    run code, or one that does not match params.json fails here, with the same
    CheckpointError the rank would raise.
    """
    expected = checkpoint.shard_shapes(args, len(shards))
    for path in shards:
        state = checkpoint.load_shard(path)
        try:
            checkpoint.check_state(state, expected, str(path))
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}. The shards were written for another model or are damaged: "
                "re-download or re-convert the checkpoint (mpllama convert / reshard)"
            ) from None
        del state


def _per_request(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(
            f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt"
        )
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params[{i}] is {type(p).__name__}, not SamplingParams")
    return params


def _check_ids(ids: Any, index: int, vocab_size: int) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"prompt_token_ids[{index}] must be a list of ints")
    out = list(ids)
    if not out:
        raise PromptError(f"prompt_token_ids[{index}] is empty")
    bad = [t for t in out if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise PromptError(
            f"prompt_token_ids[{index}] has id(s) {bad[:5]} outside the "
            f"vocabulary 0..{vocab_size - 1}"
        )
    return out


def _derive_seed(engine_seed: int, index: int) -> int:
    """A request's seed when it has none: fixed by the engine seed and its position."""
    return (engine_seed * 1_000_003 + index * 7_919 + 1) % (2**63)


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
