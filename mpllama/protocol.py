"""What crosses the Ray boundary between the driver and a gang: requests going in, events
coming out, and the spec every rank is built from. No torch here, so driver-side code
(the API, jobs, a server) can build requests without importing torch or fairscale.

Two rules live here and nowhere else: which requests a model can run
(``check_request``) and how a request without a seed gets one (``derive_seed``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from .config import SamplingParams
from .model_args import ModelArgs

# Why a request ended. "abort": the caller gave it up; "error": it could not run.
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass
class Request:
    """One completion to run: token ids in, a seed already resolved (``derive_seed``)."""

    id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0  # used only when sampling; the same seed gives the same tokens
    # Whether its caller reads it token by token; False (``LLM.generate``) lets the lead
    # send its tokens in fewer, larger batches (rank.worker.FINAL_HOLD_S).
    stream: bool = True

    def budget(self, max_seq_len: int) -> int:
        """How many tokens it may generate: max_tokens, capped by the context left."""
        return min(self.params.max_tokens, max_seq_len - len(self.prompt_token_ids))


@dataclass
class Event:
    """What one step did for one request: the tokens and text it added, and whether it
    has finished. Offsets say where the new pieces start in the request's output, so a
    receiver can drop what it has already seen when a request is replayed after a fault.
    """

    id: str
    token_ids: list[int]
    logprobs: list[float] | None  # one per token, when the request asked for them
    text: str  # new text: never splits a character, never holds part of a stop string
    token_offset: int  # tokens generated before this event
    text_offset: int  # characters of text emitted before this event
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    error: str | None = None  # with finish_reason "error": what was wrong
    replica: int = 0  # which gang made it (set on the driver)
    # One {token id: log-prob} of the most likely tokens per token, when asked for.
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class Polled:
    """What one poll of the lead returns: the events of every step since the last poll
    (one list per step), and the scheduler's counts after the last of them."""

    steps: list[list[Event]]
    running: int = 0  # requests holding KV blocks
    waiting: int = 0  # requests queued for them
    cache: dict[str, int] = field(default_factory=dict)  # the lead's Runner.stats()


@dataclass(frozen=True)
class RankSpec:
    """What every rank of one gang is told; identical on all ranks."""

    checkpoint_dir: str
    args: ModelArgs  # vocab already resolved against the tokenizer
    tokenizer_proto: bytes  # the tokenizer travels as bytes: no path needed on the rank
    world_size: int
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    shm_collectives: bool = True
    max_batch_size: int = 8  # sequences running at once
    max_seq_len: int = 512
    kv_cache_memory_gb: float | None = None
    kv_block_size: int = 16
    prefix_caching: bool = True
    prefill_chunk_tokens: int = 512
    cpu_linear: str = "auto"
    quantization: str = "none"  # none | int8 | int4: quantize the linear weights on load
    quant_group_size: int | str = "auto"  # int4: see config.AUTO_GROUP_SIZES
    threads: int = 1
    collective_timeout_s: float = 60.0
    log_level: int = logging.WARNING  # the driver's level for mpllama's loggers


def check_request(request: Request, max_seq_len: int, vocab_size: int) -> str | None:
    """Why ``request`` cannot run on this model, or None when it can."""
    ids = request.prompt_token_ids
    if not ids:
        return "the prompt has no tokens"
    if len(ids) >= max_seq_len:
        return (
            f"the prompt has {len(ids)} tokens but max_seq_len is {max_seq_len}, which leaves "
            "no room to generate; shorten the prompt or raise runtime.max_seq_len"
        )
    bad = [
        t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size
    ]
    if bad:
        return f"token id(s) {bad[:5]} are outside the vocabulary 0..{vocab_size - 1}"
    return check_params(request.params, vocab_size)


def check_params(params: SamplingParams, vocab_size: int) -> str | None:
    """Why ``params`` name tokens this model does not have or hold a grammar that does not
    compile, or None."""
    stops = [t for t in params.stop_token_ids if t >= vocab_size]
    if stops:
        return (
            f"stop_token_ids {stops[:5]} are outside the vocabulary 0..{vocab_size - 1}: "
            "the model can never make them"
        )
    biased = [t for t in params.logit_bias if t >= vocab_size]
    if biased:
        return f"logit_bias token id(s) {biased[:5]} are outside the vocabulary 0..{vocab_size - 1}"
    if params.guided is not None:
        return params.guided.problem()
    return None


def derive_seed(engine_seed: int, key: str | int) -> int:
    """A request's seed when it brings none: fixed by the engine seed and a key the caller
    owns (an input index, a job's request id), so a rerun, a resumed job or a replay on
    another replica samples exactly alike."""
    digest = hashlib.sha256(f"{engine_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)
