"""``AsyncLLM``: ``LLM`` for asyncio programs. Each ``generate`` call runs one request and
yields its outputs as they are made; concurrent calls share the running batch, and
cancelling a consumer aborts its request."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .api import LLM
from .config import RunConfig, SamplingParams, load_run_config
from .outputs import PartialOutput, RequestOutput, token_list
from .protocol import Event, Request, derive_seed

__all__ = ["AsyncLLM"]


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
        placement_group: Any = None,
        **settings: Any,
    ) -> None:
        self.llm = LLM(
            checkpoint_dir,
            tokenizer_path,
            config=config,
            placement_group=placement_group,
            **settings,
        )
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

        self.llm.router.submit([request], sink)
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
                self.llm.router.abort([request.id])

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests, as ``LLM.counts``."""
        return self.llm.counts()

    def cache_stats(self) -> dict[str, float]:
        """The KV pool and prefix cache, as ``LLM.cache_stats``."""
        return self.llm.cache_stats()

    async def abort(self, request_id: str) -> None:
        """Give up a request: its generate() ends with finish_reason "abort"."""
        self.llm.router.abort([request_id])

    def _request(
        self, prompt: str | Sequence[int], params: SamplingParams | None, request_id: str | None
    ) -> tuple[Request, PartialOutput]:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params is {type(params).__name__}, not SamplingParams")
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            ids = self.llm.prompts.encode(prompt)
        else:
            ids = token_list(prompt, 0)
        rid = request_id if request_id is not None else uuid.uuid4().hex
        seed = (
            params.seed if params.seed is not None else derive_seed(self.config.runtime.seed, rid)
        )
        request = Request(rid, ids, params, seed)
        self.llm.prompts.check([request], f"request {rid!r}")
        return request, PartialOutput(0, text, request, self.llm.prompts.echo_text(text, request))

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
