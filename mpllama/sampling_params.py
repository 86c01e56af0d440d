"""``SamplingParams``: how one request is decoded, and the checks on every field. No
torch, no Ray: the driver, the server and the job reader build and check them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .guided import Guided
from .typecheck import check_types

MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's do
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-100, 100], as OpenAI's does
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat allows


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (names as vLLM users know them).

    The logits of a request are adjusted in vLLM's order before anything is drawn:
    ``logit_bias`` is added and, until ``min_tokens`` tokens are made, its stop ids are
    masked; then the repetition, frequency and presence penalties; then temperature,
    top-k and top-p. Greedy picks the argmax of the adjusted logits. ``logprobs`` are
    always those of the raw model distribution, before any of it.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = derived from the engine seed and the request index
    stop: tuple[str, ...] = ()
    # Token ids that also end the request, beside the model's own stop ids (Llama 3:
    # <|end_of_text|>, <|eom_id|>, <|eot_id|>; else EOS). Like stop strings, they are not
    # part of the output.
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # ignore the model's stop ids (stop_token_ids still stop)
    logprobs: bool = False  # return the log-probability of each generated token
    # With logprobs: also this many of the most likely tokens at each step, with their
    # raw log-probabilities (as logprobs), at most MAX_TOP_LOGPROBS.
    top_logprobs: int = 0
    echo: bool = False  # include the prompt in the returned text
    # OpenAI's penalties, over the tokens generated so far (not the prompt):
    # logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's (CTRL's) penalty over the prompt and the generated tokens: a positive logit
    # of a token seen is divided by it, a negative one multiplied. 1 = off.
    repetition_penalty: float = 1.0
    # Token id -> a number in [-100, 100] added to its logit (OpenAI's JSON keys are
    # strings: "123" is accepted for 123). Left out of the hash: a dict has none.
    logit_bias: dict[int, float] = field(default_factory=dict, hash=False)
    # The stop ids (model's and stop_token_ids) cannot be made, nor stop strings match,
    # before this many tokens (vLLM's rule).
    min_tokens: int = 0
    # Structured output: the text must match a JSON schema, any JSON object, a regex, a
    # grammar or one of some strings (``Guided``; a dict such as {"regex": "..."} is taken).
    guided: Guided | None = None

    def __post_init__(self) -> None:
        if isinstance(self.guided, dict):
            object.__setattr__(self, "guided", Guided.of(self.guided))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, dict):  # a copy, with "123" keys made ints
            object.__setattr__(self, "logit_bias", _bias_keys(self.logit_bias))
        check_types(self, "SamplingParams")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # what torch's generators take
            raise ValueError(f"seed must be in [0, 2**64) or None, got {self.seed}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(i < 0 for i in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be token ids (>= 0), got {list(self.stop_token_ids)}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        bad = {t: b for t, b in self.logit_bias.items() if t < 0 or not abs(b) <= MAX_LOGIT_BIAS}
        if bad:
            raise ValueError(
                "logit_bias maps token ids (>= 0) to numbers in [-100, 100], got "
                f"{dict(list(bad.items())[:5])}"
            )
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in 0..max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything changes the logits before temperature, top-k and top-p."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _bias_keys(bias: dict[Any, Any]) -> dict[Any, Any]:
    """``bias`` with decimal string keys ("123", as JSON has them) made ints and integer
    values floats; anything else is left for the type check to name."""
    out = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out
