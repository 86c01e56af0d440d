"""The batch generation loop one rank runs: prefill every prompt in one pass, then decode
one token per row per step until every row has stopped.

Every rank runs this loop on the same inputs (SPMD). Only the lead rank (model-parallel
rank 0) chooses tokens and decides when rows stop; ``sync`` hands its choice to the other
ranks each step, so ranks can never drift apart and all run the same number of forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import SamplingParams
from .model import Transformer
from .sampling import log_probs, next_tokens
from .tokenizer import Tokenizer

# Broadcasts a tensor from the lead rank and returns the lead's value on every rank.
Sync = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0  # always resolved by the caller; used only when sampling


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens or context), "error"
    error: str | None = None


def check_request(request: Request, max_seq_len: int, vocab_size: int) -> str | None:
    """Why ``request`` cannot run on this model, or None when it can."""
    n = len(request.prompt_token_ids)
    if n == 0:
        return "the prompt has no tokens"
    if n >= max_seq_len:
        return (
            f"the prompt has {n} tokens but max_seq_len is {max_seq_len}, which leaves "
            "no room to generate; shorten the prompt or raise runtime.max_seq_len"
        )
    bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        return f"token id(s) {bad[:5]} are outside the vocabulary 0..{vocab_size - 1}"
    return None


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    requests: list[Request],
    *,
    lead: bool = True,
    sync: Sync | None = None,
) -> list[Completion]:
    """Complete every request; returns one Completion each on the lead rank, [] elsewhere.

    Requests beyond the KV cache's batch size run in successive chunks. A request that
    cannot run (see ``check_request``) gets finish_reason "error" and never enters the
    batch, so it cannot disturb the others.
    """
    out: list[Completion] = []
    size = model.max_batch_size
    for start in range(0, len(requests), size):
        out.extend(_generate_batch(model, tokenizer, requests[start : start + size], lead, sync))
    return out if lead else []


def _generate_batch(
    model: Transformer, tokenizer: Tokenizer, requests: list[Request], lead: bool, sync: Sync | None
) -> list[Completion]:
    results: list[Completion | None] = [None] * len(requests)
    runnable = []
    for i, request in enumerate(requests):
        problem = check_request(request, model.max_seq_len, model.args.vocab_size)
        if problem:
            results[i] = Completion([], "", None, "error", problem)
        else:
            runnable.append(i)
    if runnable:
        done = _decode(model, tokenizer, [requests[i] for i in runnable], lead, sync)
        if not lead:
            return []
        for i, completion in zip(runnable, done, strict=True):
            results[i] = completion
    return [r for r in results if r is not None]


def _decode(
    model: Transformer, tokenizer: Tokenizer, requests: list[Request], lead: bool, sync: Sync | None
) -> list[Completion]:
    device = model.device
    B = len(requests)
    lengths = torch.tensor([len(r.prompt_token_ids) for r in requests], device=device)
    # Right-padded prompts: padding sits at positions past each row's end, which no
    # real query attends to and which decoding overwrites.
    tokens = torch.zeros((B, int(lengths.max())), dtype=torch.long, device=device)
    for row, r in enumerate(requests):
        tokens[row, : len(r.prompt_token_ids)] = torch.tensor(r.prompt_token_ids, device=device)
    logits = model(tokens, torch.zeros_like(lengths), logits_at=lengths - 1)  # [B,V]
    positions = lengths.clone()

    params = [r.params for r in requests]
    budget = [
        min(p.max_tokens, model.max_seq_len - len(r.prompt_token_ids))
        for p, r in zip(params, requests, strict=True)
    ]
    generators = [
        None if p.greedy else torch.Generator(device=device).manual_seed(r.seed)
        for p, r in zip(params, requests, strict=True)
    ]
    want_logprobs = any(p.logprobs for p in params)
    generated: list[list[int]] = [[] for _ in requests]
    logprobs: list[list[float]] = [[] for _ in requests]
    texts: list[str | None] = [None] * B  # set when a stop string ends the row
    reasons: list[str | None] = [None] * B

    while True:
        if lead:
            chosen = next_tokens(logits, params, generators)
            chosen_lp = log_probs(logits, chosen).tolist() if want_logprobs else None
            for row, token in enumerate(chosen.tolist()):
                if reasons[row] is None:
                    _advance(
                        row,
                        token,
                        chosen_lp,
                        tokenizer,
                        params[row],
                        budget[row],
                        generated,
                        logprobs,
                        texts,
                        reasons,
                    )
            done = torch.tensor([r is not None for r in reasons], device=device)
            packet = torch.stack((chosen, done.long()))
        else:
            packet = torch.zeros((2, B), dtype=torch.long, device=device)
        if sync is not None:
            packet = sync(packet)
        chosen, done = packet[0], packet[1].bool()
        if bool(done.all()):
            break
        # Finished rows keep riding along (cheaper than reshaping the cache) but stay at
        # their last position, so they never run past the context.
        logits = model(chosen[:, None], positions, logits_at=torch.zeros_like(positions))
        positions = torch.where(done, positions, positions + 1)

    if not lead:
        return []
    out = []
    for row in range(B):
        text = texts[row] if texts[row] is not None else tokenizer.decode(generated[row])
        out.append(
            Completion(
                generated[row],
                text,
                logprobs[row] if params[row].logprobs else None,
                reasons[row] or "length",
            )
        )
    return out


def _advance(
    row: int,
    token: int,
    chosen_lp: list[float] | None,
    tokenizer: Tokenizer,
    params: SamplingParams,
    budget: int,
    generated: list[list[int]],
    logprobs: list[list[float]],
    texts: list[str | None],
    reasons: list[str | None],
) -> None:
    """Record one chosen token for ``row`` and decide whether the row has finished."""
    if token == tokenizer.eos_id and not params.ignore_eos:
        reasons[row] = "stop"  # EOS ends the row and is not part of the output
        return
    generated[row].append(token)
    if chosen_lp is not None:
        logprobs[row].append(chosen_lp[row])
    if params.stop:
        # Decode the whole continuation: a stop string may span token boundaries.
        text = tokenizer.decode(generated[row])
        hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        if hits:
            texts[row] = text[: min(hits)]
            reasons[row] = "stop"
            return
    if len(generated[row]) >= budget:
        reasons[row] = "length"
