"""Choosing the next token from logits: pure functions, randomness only through an
explicit ``torch.Generator`` (never the global seed), so a request seeded alike picks
alike whatever else shares its batch.
"""

from __future__ import annotations

import torch

from .config import SamplingParams


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...] the most likely token ids (lowest id on exact ties)."""
    return logits.argmax(dim=-1)


def log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, V], [B] -> [B] log-probability of each token under the raw model distribution
    (before temperature, top-k or top-p), as a float32 tensor."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the cut kept), -inf the rest."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``.

    The most likely token always survives, so a tiny ``p`` degenerates to greedy.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # A token is dropped when the tokens before it already reach p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """[V] logits of one row -> a 0-d token id tensor, following ``params``."""
    if params.greedy:
        return greedy(logits)
    scaled = logits.float() / params.temperature
    scaled = top_p_filter(top_k_filter(scaled, params.top_k), params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """[B, V] -> [B]: greedy rows in one argmax, sampled rows each with its own generator."""
    tokens = greedy(logits)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[row] = sample(logits[row], p, gen)
    return tokens
