"""The public clients. ``LLM`` validates everything it can before any actor starts, hands
requests to the engine (which schedules them step by step on the gang) and shapes what
comes back: whole results in input order (``generate``, ``chat``) or a stream of
``RequestOutput`` deltas as tokens are made (``stream``). ``AsyncLLM`` is the same for
asyncio programs: one request per ``generate`` call, many calls sharing the batch.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import logging
import math
import os
import queue
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
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
from .errors import CheckpointError, ConfigError, PromptError, WorkerError
from .protocol import Event, RankSpec, Request, check_request, derive_seed
from .tokenizer import Dialog, Tokenizer, encode_dialog

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """One request's output so far; the last one (``finished``) is its result."""

    index: int  # position in the call's input (0 for AsyncLLM)
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # everything generated so far (after the prompt, when echo is set)
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None  # "stop" or "length" once finished ("abort" if given up)
    delta_text: str = ""  # what this output adds to the previous one
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    request_id: str = ""


class _Progress:
    """A request's cumulative output, grown from its events."""

    def __init__(self, index: int, prompt: str | None, request: Request, shown: str) -> None:
        self.index, self.prompt, self.request = index, prompt, request
        self.prefix = shown  # the echoed prompt, handed out with the first piece
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if request.params.logprobs else None
        self.finish_reason: str | None = None

    def add(self, e: Event) -> None:
        if e.finish_reason == "error":
            raise PromptError(f"request #{self.index}: {e.error}")
        self.delta_text, self.prefix = self.prefix + e.text, ""
        self.delta_token_ids = e.token_ids
        self.text += self.delta_text
        self.token_ids += e.token_ids
        if self.logprobs is not None and e.logprobs is not None:
            self.logprobs += e.logprobs
        self.finish_reason = e.finish_reason

    def output(self, delta: bool = True) -> RequestOutput:
        return RequestOutput(
            self.index,
            self.prompt,
            self.request.prompt_token_ids,
            self.text,
            list(self.token_ids),
            None if self.logprobs is None else list(self.logprobs),
            self.finish_reason,
            self.delta_text if delta else "",
            list(self.delta_token_ids) if delta else [],
            self.finish_reason is not None,
            self.request.id,
        )


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
        self._calls = itertools.count()

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
            prefill_chunk_tokens=runtime.prefill_chunk_tokens,
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
            from .engine import Engine

            self.engine = Engine(self.spec, self.config.parallel)
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

    def _start_ray(self) -> bool:
        """Join or start Ray; True when it is a local runtime this LLM started."""
        import ray

        if ray.is_initialized():
            return False  # the caller's runtime: use it, leave it running
        address = self.config.parallel.ray_address
        if address is None:
            address = ray_address_from_env()
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
            self._owns_ray = True
            return False
        # A local runtime sized for the gang, even on a laptop with fewer cores: a
        # rank's CPUs are a scheduling share, not a hard reservation.
        need = math.ceil(self.world_size * (self.config.parallel.cpus_per_rank or 1))
        # address="local": never attach to a cluster `ray start` left on this machine.
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, need),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        self._owns_ray = True
        return True

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (any number); results come back in input order."""
        entries = self._requests(prompts, prompt_token_ids, sampling_params)
        done = {p.index: p.output(delta=False) for p in self._run(entries) if p.finish_reason}
        return [done[i] for i in range(len(entries))]

    def chat(
        self,
        dialogs: Dialog | Sequence[Dialog],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Llama 2 chat: each dialog is a list of {"role", "content"} messages."""
        return self.generate(
            sampling_params=sampling_params, prompt_token_ids=self.encode_dialogs(dialogs)
        )

    def stream(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> Iterator[RequestOutput]:
        """Like ``generate``, but yields a ``RequestOutput`` whenever a request has new
        tokens, interleaved across requests in the order they are made; each carries the
        cumulative result and the new piece (``delta_text``, ``delta_token_ids``). A
        request's last output (``finished``) equals what ``generate`` returns for it.
        Closing the iterator early aborts the requests still running."""
        entries = self._requests(prompts, prompt_token_ids, sampling_params)
        return (p.output() for p in self._run(entries))

    def encode_dialogs(self, dialogs: Dialog | Sequence[Dialog]) -> list[list[int]]:
        if dialogs and isinstance(dialogs[0], dict):
            dialogs = [dialogs]  # type: ignore[list-item]
        token_ids = []
        for i, dialog in enumerate(dialogs):
            try:
                token_ids.append(encode_dialog(self.tokenizer, dialog))  # type: ignore[arg-type]
            except PromptError as exc:
                raise PromptError(f"dialog {i}: {exc}") from None
        return token_ids

    def _requests(
        self,
        prompts: str | Sequence[str] | None,
        prompt_token_ids: Sequence[Sequence[int]] | None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[_Progress]:
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
            ids = [_token_list(t, i) for i, t in enumerate(prompt_token_ids)]  # type: ignore[arg-type]
            texts = [None] * len(ids)
        params = _per_request(sampling_params, len(ids))
        call = next(self._calls)
        seed = self.config.runtime.seed
        requests = [
            Request(f"{call}-{i}", t, p, p.seed if p.seed is not None else derive_seed(seed, i))
            for i, (t, p) in enumerate(zip(ids, params, strict=True))
        ]
        self._check(requests)
        return [
            _Progress(i, text, r, self._echo(text, r))
            for i, (text, r) in enumerate(zip(texts, requests, strict=True))
        ]

    def _check(self, requests: list[Request], what: str = "prompt #{}") -> None:
        """Refuse the call, before anything runs, if any request could not run."""
        limit, vocab = self.config.runtime.max_seq_len, self.args.vocab_size
        problems = [
            f"{what.format(i)}: {problem}"
            for i, r in enumerate(requests)
            if (problem := check_request(r, limit, vocab)) is not None
        ]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise PromptError("; ".join(problems[:3]) + more)

    def _echo(self, prompt: str | None, request: Request) -> str:
        if not request.params.echo:
            return ""
        return prompt if prompt is not None else self.tokenizer.decode(request.prompt_token_ids)

    def encode_prompt(self, prompt: Any, index: int = 0) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt #{index} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise PromptError(f"prompt #{index} is empty; give at least one character")
        return self.tokenizer.encode(prompt, bos=True, eos=False)

    def _run(self, entries: list[_Progress]) -> Iterator[_Progress]:
        """Submit every request; yield each one's progress as its events arrive."""
        if self._closed:
            raise WorkerError("this LLM has been closed; make a new one")
        if not entries:
            return
        by_id = {p.request.id: p for p in entries}
        inbox: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()
        self.engine.submit([p.request for p in entries], inbox.put)
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
                self.engine.abort(list(by_id))

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop the ranks and free their resources; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.engine is not None:
            self.engine.close()
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


class AsyncLLM:
    """``LLM`` for asyncio programs: each ``generate`` call runs one request and yields its
    outputs as they are made; concurrent calls share the running batch. Takes the same
    constructor arguments as ``LLM``."""

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        tokenizer_path: str | os.PathLike[str] | None = None,
        *,
        config: RunConfig | None = None,
        **settings: Any,
    ) -> None:
        self.llm = LLM(checkpoint_dir, tokenizer_path, config=config, **settings)
        self.tokenizer = self.llm.tokenizer
        self.config = self.llm.config

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str],
        overrides: list[str] | dict[str, dict[str, Any]] | None = None,
        **settings: Any,
    ) -> AsyncLLM:
        return cls(config=load_run_config(path, overrides), **settings)

    async def generate(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Run one request (a prompt string or its token ids); yield its outputs.

        Cancelling the consuming task, or closing this iterator, aborts the request.
        """
        request, progress = self._request(prompt, sampling_params, request_id)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event | BaseException] = asyncio.Queue()

        def sink(item: Event | BaseException) -> None:  # on the engine's pump thread
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

        self.llm.engine.submit([request], sink)
        finished = False
        try:
            while not finished:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    raise item
                progress.add(item)
                finished = item.finish_reason is not None
                yield progress.output()
        finally:
            if not finished:
                self.llm.engine.abort([request.id])

    async def abort(self, request_id: str) -> None:
        """Give up a request: its generate() ends with finish_reason "abort"."""
        self.llm.engine.abort([request_id])

    def _request(
        self, prompt: str | Sequence[int], params: SamplingParams | None, request_id: str | None
    ) -> tuple[Request, _Progress]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params is {type(params).__name__}, not SamplingParams")
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            ids = self.llm.encode_prompt(prompt)
        else:
            ids = _token_list(prompt, 0)
        rid = request_id if request_id is not None else uuid.uuid4().hex
        seed = (
            params.seed if params.seed is not None else derive_seed(self.config.runtime.seed, rid)
        )
        request = Request(rid, ids, params, seed)
        self.llm._check([request], f"request {rid!r}")
        return request, _Progress(0, text, request, self.llm._echo(text, request))

    def close(self) -> None:
        self.llm.close()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _token_list(ids: Any, index: int) -> list[int]:
    """A copy of one prompt's token ids, type-checked (their values: check_request)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"prompt_token_ids[{index}] must be a list of ints")
    out = list(ids)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in out):
        raise TypeError(f"prompt_token_ids[{index}] must be a list of ints")
    return out


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
