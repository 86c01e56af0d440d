"""Choosing the next token from logits: pure functions, randomness only through an
explicit ``torch.Generator`` (never the global seed), so a request seeded alike picks
alike whatever else shares its batch.

With a 128256-entry vocabulary (Llama 3) a full sort per row, or ``torch.multinomial``
over every entry (it draws one exponential per entry), costs more than a small model's
whole step (benchmarks/RESULTS.md, "Figures behind the code"). So no sampled
row sorts its whole vocabulary: top-k takes ``torch.topk``; top-p takes ``torch.topk``
of 256 and, when those hold under p, bisects for a logit threshold whose tokens hold p
and sorts only them. The draw is one uniform number per row against the kept tokens'
cumulative probabilities (inverse CDF). The kept set is the one a full sort gives
(``top_p_filter(top_k_filter(...))``, the reference); seeded draws differ from those of
the multinomial sampler this replaced, but repeat exactly.
"""

from __future__ import annotations

import math

import torch

from ..config import SamplingParams

# Top-p's first guess at how many tokens it needs: the nucleus of a trained model at
# p = 0.9 is mostly tens of tokens, and topk of 256 costs what topk of 64 does. A flatter
# row bisects for a threshold instead, _BISECT rounds over the logits' range (a range
# of 30 resolved to 0.007: few tokens past the nucleus are sorted).
_FIRST_GUESS, _BISECT = 256, 12


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...] the most likely token ids (lowest id on exact ties)."""
    return logits.argmax(dim=-1)


def log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, V], [B] -> [B] log-probability of each token under the raw model distribution
    (before temperature, top-k or top-p), as a float32 tensor."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]


def top_log_probs(logits: torch.Tensor, k: int) -> dict[int, float]:
    """[V] -> the ``k`` most likely token ids under the raw model distribution and their
    log-probabilities, most likely first (ties by id)."""
    ls = torch.log_softmax(logits.float(), dim=-1)
    ids, values = _ranked(ls, _top_set(ls, min(k, ls.shape[-1])))
    return dict(zip(ids[:k].tolist(), values[:k].tolist(), strict=True))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the cut kept), -inf the rest."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``.

    The most likely token always survives, so a tiny ``p`` degenerates to greedy. Equal
    logits are ranked by id (a stable sort), so of a tie that straddles the cut the lower
    ids stay. This full-sort form is the reference that ``sample`` reproduces cheaply.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # A token is dropped when the tokens before it already reach p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _ranked(x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` (ascending) of the [V] row ``x`` ranked as a stable descending sort ranks
    them: by value, then by id. Returns (ids, values)."""
    values, order = torch.sort(x[ids], descending=True, stable=True)
    return ids[order], values


def _top_set(x: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending ids of every entry of [V] ``x`` at least its n-th largest value: the
    top n plus any tied with the n-th, so no tie is split by topk's arbitrary choice."""
    values, ids = torch.topk(x, n, sorted=False)
    at_least = x >= values.min()
    if int(at_least.sum()) == n:  # nothing else ties the n-th: topk's own ids will do
        return ids.sort().values
    return at_least.nonzero()[:, 0]


def kept_tokens(x: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens top-k then top-p keep of the [V] float32 row ``x``, most likely first
    (ties by id): (ids [m], logits [m]). The same set as
    ``top_p_filter(top_k_filter(x, top_k), top_p)``, without sorting all V entries."""
    V = x.shape[-1]
    if 0 < top_k < V:
        ids, values = _ranked(x, _top_set(x, top_k))
        if top_p >= 1.0:
            return ids, values
        probs = torch.softmax(values, dim=-1)
        return _nucleus(ids, values, probs, top_p)
    if top_p >= 1.0:
        return torch.arange(V, device=x.device), x
    full = torch.softmax(x, dim=-1)  # the probabilities over the whole vocabulary
    # Most rows: the nucleus is within the top _FIRST_GUESS.
    ids, values = _ranked(x, _top_set(x, min(_FIRST_GUESS, V)))
    probs = full[ids]
    if ids.numel() == V or _reaches(probs, top_p):
        return _nucleus(ids, values, probs, top_p)
    # A flatter row: bisect for a logit threshold whose tokens hold p, sort only those.
    ids = (x >= _threshold(x, full, top_p)).nonzero()[:, 0]
    ids, values = _ranked(x, ids)
    probs = full[ids]
    if ids.numel() == V or _reaches(probs, top_p):
        return _nucleus(ids, values, probs, top_p)
    return _flat_nucleus(x, full, top_p)  # the threshold fell a hair short: sort it all


def _reaches(probs: torch.Tensor, p: float) -> bool:
    """Whether ranked candidates hold the whole nucleus: they reach p before their last
    one (which top-p would then drop), summed as ``_nucleus`` sums them."""
    return float(probs.cumsum(dim=-1)[-1] - probs[-1]) >= p


def _threshold(x: torch.Tensor, full: torch.Tensor, p: float) -> float:
    """A logit t such that the tokens at or above it hold at least p besides the
    smallest of them, found by bisection on the value (each round one pass over V)."""
    top = float(x.max())
    # Below top - 110 a float32 probability is exactly 0: no need to look lower.
    lo, hi = max(float(x.min()), top - 110.0), top
    log_top = float(full.max().log())  # the top token's log-probability, at logit top
    for _ in range(_BISECT):
        mid = (lo + hi) / 2
        held = float(full.mul(x >= mid).sum())
        if held - math.exp(log_top + mid - top) >= p:  # minus one token at the cut
            lo = mid
        else:
            hi = mid
    return lo


def _flat_nucleus(
    x: torch.Tensor, full: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p by one full sort, an unstable one (a stable sort of 128k costs 10% more).
    Tied logits have equal probabilities, so the running mass, and with it the number
    kept, is the same whatever order the sort leaves ties in; only which of a tie
    straddling the cut stay is fixed afterwards (the lowest ids, as a stable sort)."""
    values, ids = torch.sort(x, descending=True)
    m = _nucleus(ids, values, full[ids], p)[0].numel()
    cut = values[m - 1]
    above = (x > cut).nonzero()[:, 0]
    tied = (x == cut).nonzero()[:, 0][: m - above.numel()]
    return _ranked(x, torch.cat([above, tied]).sort().values)


def _nucleus(
    ids: torch.Tensor, values: torch.Tensor, probs: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix of ranked candidates that top-p keeps (top_p_filter's rule)."""
    keep = (probs.cumsum(dim=-1) - probs) < p
    keep[0] = True
    m = int(keep.sum())  # a prefix: the running mass only grows
    return ids[:m], values[:m]


# ------------------------------------------------------------- logit adjustments
# In vLLM's order, on a float32 [V] row, in place: logit_bias and the min_tokens mask,
# then the penalties. Temperature, top-k and top-p come after, in ``sample``.


def add_bias(row: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """row[ids] += bias (``ids`` distinct)."""
    return row.index_add_(0, ids, bias)


def mask_ids(row: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """row[ids] = -inf: tokens that cannot be picked."""
    return row.index_fill_(0, ids, float("-inf"))


def apply_penalties(
    row: torch.Tensor,
    counts: torch.Tensor | None,
    seen: torch.Tensor | None,
    presence: float,
    frequency: float,
    repetition: float,
) -> torch.Tensor:
    """vLLM's penalties. ``counts`` [V] float32: how often each token was generated;
    ``seen`` [V] bool: in the prompt or generated. A seen token's logit is divided by
    ``repetition`` when positive, multiplied when not; then
    ``row -= frequency * counts`` and ``row -= presence * (counts > 0)``."""
    if repetition != 1.0 and seen is not None:
        scaled = torch.where(row > 0, row / repetition, row * repetition)
        row.copy_(torch.where(seen, scaled, row))
    if counts is not None:
        if frequency:
            row.sub_(frequency * counts)
        if presence:
            row.sub_(presence * (counts > 0).float())
    return row


class LogitAdjuster:
    """One request's logit adjustments and the history they need: the counts of its
    generated tokens (presence, frequency) and the tokens seen in its prompt or output
    (repetition), both [V], kept up to date a token at a time. Built from the request's
    prompt alone, so a replayed request, regenerating its tokens, sees the same history.
    """

    def __init__(self, params: SamplingParams, prompt: list[int], stop_ids: frozenset[int]) -> None:
        self.params = params
        self.prompt = prompt
        self.stop_ids = sorted(stop_ids) if params.min_tokens else []
        self.generated = 0
        self.counts: torch.Tensor | None = None  # made on first use: [V], the row's device
        self.seen: torch.Tensor | None = None
        self.history: list[int] = []  # tokens added before the tensors exist
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, token: int) -> None:
        """A token the request generated."""
        self.generated += 1
        if self.counts is None:
            self.history.append(token)
            return
        self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def apply(self, row: torch.Tensor) -> torch.Tensor:
        """Adjust the float32 [V] ``row`` of the next token's logits, in place."""
        p = self.params
        if self.counts is None:
            self._start(row)
        if self.bias is not None:
            add_bias(row, *self.bias)
        if self.generated < p.min_tokens and self.stop_ids:
            mask_ids(row, torch.tensor(self.stop_ids, device=row.device))
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            apply_penalties(
                row,
                self.counts,
                self.seen,
                p.presence_penalty,
                p.frequency_penalty,
                p.repetition_penalty,
            )
        return row

    def _start(self, row: torch.Tensor) -> None:
        V, device, p = row.shape[-1], row.device, self.params
        self.counts = torch.zeros(V, dtype=torch.float32, device=device)
        for t in self.history:
            self.counts[t] += 1
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(V, dtype=torch.bool, device=device)
            self.seen[torch.tensor(self.prompt + self.history, device=device)] = True
        self.history = []
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device)
            values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
            self.bias = (ids, values)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """[n, m] probabilities (rows need not sum to 1) -> [n] indices, each row from its
    own generator: one uniform number against the row's cumulative sums (in float64, so
    the smallest probabilities keep their share). Never picks a zero-probability index."""
    cdf = probs.double().cumsum(dim=-1)  # (faster than cumsum's dtype=)
    u = torch.cat(
        [torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators]
    )
    # The first index whose cumulative sum passes u * total.
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return index.clamp_(max=probs.shape[-1] - 1)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """[V] logits of one row -> a 0-d token id tensor, following ``params``."""
    if params.greedy:
        return greedy(logits)
    scaled = logits.float() / params.temperature
    ids, values = kept_tokens(scaled, params.top_k, params.top_p)
    return ids[draw(torch.softmax(values, dim=-1)[None], [generator])[0]]


def next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """[B, V] -> [B]: all-greedy batches in one argmax, else each row on its own, a
    sampled one with its own generator (so its pick does not depend on its batch). Row by row: on a CPU one row's 128k
    entries stay in cache through softmax and cumsum, where a [32, 128k] batch spills
    (slower, measured: benchmarks/RESULTS.md, "Figures behind the code"), and a group of rows would be a copy."""
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(
            f"{logits.shape[0]} rows of logits need as many params and generators, "
            f"got {len(params)} and {len(generators)}"
        )
    if all(p.greedy for p in params):
        return greedy(logits)
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        tokens[row] = sample(logits[row], p, gen)
    return tokens
