"""What the benchmarks run: the models (random checkpoints), the seeded request sets and
the result records every runner returns, so each runner sees exactly the same work."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from mpllama.checkpoint import read_params
from mpllama.model_args import ModelArgs
from mpllama.offline.fixtures import init_checkpoint

# About 110M parameters: 8 layers of 12.8M (FFN width 2816) plus two 4000 x 1024 tables.
BENCH_MODEL = ModelArgs(dim=1024, n_layers=8, n_heads=16, norm_eps=1e-5)
# The --quick stand-in: the same shape of work, a model small enough for a smoke run.
QUICK_MODEL = ModelArgs(dim=256, n_layers=2, n_heads=8, multiple_of=64, norm_eps=1e-5)
VOCAB_SIZE = 4000
NEW_TOKEN_CHOICES = (4, 8, 16, 24, 32, 48, 64, 96, 128, 160)
FIRST_PLAIN_ID = 3  # ids 0, 1, 2 are <unk>, <s>, </s>; prompts never contain them past BOS
BOS_ID = 1


@dataclass(frozen=True)
class Workload:
    """A request set: prompt i asks for exactly new_tokens[i] tokens (greedy, EOS ignored)."""

    prompts: list[list[int]]
    new_tokens: list[int]

    def __post_init__(self) -> None:
        assert len(self.prompts) == len(self.new_tokens)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def useful_tokens(self) -> int:
        return sum(self.new_tokens)

    @property
    def longest(self) -> int:
        """Longest prompt plus its new tokens: what a KV-cache slot must hold."""
        return max(len(p) + n for p, n in zip(self.prompts, self.new_tokens, strict=True))


@dataclass
class RunResult:
    """One runner's timed pass over a workload."""

    name: str
    useful_tokens: int
    seconds: float
    token_ids: list[list[int]] | None = None  # per request, input order; None if not kept

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.seconds


def make_checkpoint(
    root: Path, name: str, model: ModelArgs | str, parts: int, vocab_size: int = VOCAB_SIZE
) -> Path:
    """A seeded random checkpoint in ``root/name-parts``, reused when already there with
    the same shape (a --quick run's smaller model under the same name is replaced).

    Every ``parts`` gets the same weights (same seed, same tokenizer corpus), so MP=1
    and MP=2 runs and the transformers baselines all decode the same model.
    """
    out = root / f"{name}-{parts}"
    if (out / "params.json").exists() and isinstance(model, ModelArgs):
        have = read_params(out)
        if any(getattr(have, f) != getattr(model, f) for f in _SHAPE):
            shutil.rmtree(out)
    if not (out / "params.json").exists():
        init_checkpoint(out, model, parts=parts, seed=0, vocab_size=vocab_size)
    return out


_SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """BOS and ``length - 1`` ids drawn uniformly from the plain pieces of the vocabulary."""
    return [BOS_ID] + [rng.randrange(FIRST_PLAIN_ID, vocab_size) for _ in range(length - 1)]


def mixed_workload(
    n: int, vocab_size: int, seed: int, prompt_lens: tuple[int, int] = (8, 64)
) -> Workload:
    """``n`` requests with prompt lengths uniform in ``prompt_lens`` (inclusive) and new
    token counts drawn from NEW_TOKEN_CHOICES: the spread that static batches waste on."""
    rng = random.Random(seed)
    prompts = [random_prompt(rng, rng.randint(*prompt_lens), vocab_size) for _ in range(n)]
    new_tokens = [rng.choice(NEW_TOKEN_CHOICES) for _ in range(n)]
    return Workload(prompts, new_tokens)


def uniform_workload(
    n: int, prompt_len: int, new_tokens: int, vocab_size: int, seed: int
) -> Workload:
    """``n`` prompts of one length, each asking for the same number of tokens. Equal
    lengths mean transformers needs no padding, so its tokens are comparable one to one."""
    rng = random.Random(seed)
    return Workload(
        [random_prompt(rng, prompt_len, vocab_size) for _ in range(n)], [new_tokens] * n
    )


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of ``n`` requests at ``rate`` per second."""
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """(equal tokens, compared tokens), position by position, over requests in order; a
    row cut short (a runner that stopped early) is compared as far as it goes."""
    rows = zip(a, b, strict=True)
    pairs = [(x, y) for row_a, row_b in rows for x, y in zip(row_a, row_b, strict=False)]
    return sum(x == y for x, y in pairs), len(pairs)
