"""What the clients hand back, and how a call's inputs become requests: ``RequestOutput``
(a request's output so far, with the newest piece), the per-request progress that
builds it from events, and the argument shaping shared by ``LLM`` and ``AsyncLLM``.
No torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import SamplingParams
from .errors import PromptError
from .protocol import Event, Request

ERROR_MODES = ("raise", "return")


@dataclass
class RequestOutput:
    """One request's output so far; the last one (``finished``) is its result."""

    index: int  # position in the call's input (0 for AsyncLLM)
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # everything generated so far (after the prompt, when echo is set)
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None  # "stop" or "length" once finished; "abort"; "error"
    delta_text: str = ""  # what this output adds to the previous one
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    request_id: str = ""
    error: str | None = None  # with finish_reason "error": what was wrong with the input
    replica: int = 0  # the gang that made it
    # Per token, the top_logprobs most likely tokens {id: raw log-prob}, when asked for.
    top_logprobs: list[dict[int, float]] | None = None


class PartialOutput:
    """A request's cumulative output, grown from its events."""

    def __init__(
        self, index: int, prompt: str | None, request: Request, shown: str, errors: str = "raise"
    ) -> None:
        self.index, self.prompt, self.request, self.errors = index, prompt, request, errors
        self.prefix = shown  # the echoed prompt, handed out with the first piece
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if request.params.logprobs else None
        self.top_logprobs: list[dict[int, float]] | None = (
            [] if request.params.top_logprobs else None
        )
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.replica = 0
        self.delta_text = ""
        self.delta_token_ids: list[int] = []

    @classmethod
    def failed(cls, index: int, prompt: Any, ids: list[int], error: str) -> PartialOutput:
        """An input refused before it ran (``errors="return"``)."""
        text = prompt if isinstance(prompt, str) else None
        progress = cls(index, text, Request(f"refused-{index}", ids), "")
        progress.finish_reason, progress.error = "error", error
        return progress

    def add(self, e: Event) -> None:
        if e.finish_reason == "error" and self.errors == "raise":
            raise PromptError(f"request #{self.index}: {e.error}")
        self.delta_text, self.prefix = self.prefix + e.text, ""
        self.delta_token_ids = e.token_ids
        self.text += self.delta_text
        self.token_ids += e.token_ids
        if self.logprobs is not None and e.logprobs is not None:
            self.logprobs += e.logprobs
        if self.top_logprobs is not None and e.top_logprobs is not None:
            self.top_logprobs += e.top_logprobs
        self.finish_reason, self.error, self.replica = e.finish_reason, e.error, e.replica

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
            self.error,
            self.replica,
            None if self.top_logprobs is None else list(self.top_logprobs),
        )


def check_errors_mode(errors: str) -> None:
    if errors not in ERROR_MODES:
        raise ValueError(f"errors must be one of {ERROR_MODES}, got {errors!r}")


def per_request(
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


def token_list(ids: Any, index: int) -> list[int]:
    """A copy of one prompt's token ids, type-checked (their values: check_request)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"prompt_token_ids[{index}] must be a list of ints")
    out = list(ids)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in out):
        raise TypeError(f"prompt_token_ids[{index}] must be a list of ints")
    return out
