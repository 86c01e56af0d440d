"""Soak: thousands of short requests through a two-rank engine while a background thread
SIGKILLs a random rank every twelfth of the way. Every request must finish exactly once, with
the greedy output an undisturbed run gives, and its streamed deltas must add up to it. Slow (about a minute): not in the
default run; `pytest -m slow tests/test_soak.py`."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mpllama import LLM, SamplingParams

N_REQUESTS = 3000
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
WORDS = ["llama", "model", "rank", "gang", "shard", "token", "batch", "cache", "ray", "gloo"]


def prompts() -> list[str]:
    rng = random.Random(0)
    return [
        f"Request {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
        for i in range(N_REQUESTS)
    ]


class Killer(threading.Thread):
    """SIGKILLs a random rank of the current gang each time another ``every`` requests
    have finished (so the kills spread over the run however fast the engine is), at
    least ``gap`` seconds apart so each rebuilt gang serves a while."""

    def __init__(self, llm: LLM, finished: Callable[[], int], every: int, gap: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.llm, self.finished, self.every, self.gap = llm, finished, every, gap
        self.rng = random.Random(1)
        self.stop = threading.Event()
        self.kills: list[tuple[float, int]] = []  # (time, rank)

    def run(self) -> None:
        due, last = self.every, -self.gap
        while not self.stop.wait(0.01):
            if self.finished() < due or time.monotonic() - last < self.gap:
                continue
            info = list(self.llm.engine.rank_info)
            rank = self.rng.randrange(len(info))
            try:
                os.kill(info[rank]["pid"], signal.SIGKILL)
                self.kills.append((time.monotonic(), rank))
                last = time.monotonic()
                due += self.every
            except ProcessLookupError:  # that gang is already gone, being rebuilt
                pass


@pytest.mark.slow
def test_every_request_comes_back_once_and_right_while_ranks_are_killed(
    tiny_ckpt: Path, ray_runtime, caplog: pytest.LogCaptureFixture
) -> None:
    texts = prompts()
    with LLM(
        tiny_ckpt,
        cpus_per_rank=0.5,
        max_seq_len=64,
        max_batch_size=16,
        max_restarts=8,
        restart_backoff_s=0.1,
        call_timeout_s=30,
    ) as llm:
        started = time.monotonic()
        reference = llm.generate(texts, PARAMS)
        undisturbed_s = time.monotonic() - started

        seen: dict[int, list[int]] = {}
        deltas: dict[int, list[int]] = {}
        killer = Killer(llm, lambda: len(seen), every=N_REQUESTS // 12)
        started = time.monotonic()
        killer.start()
        try:
            with caplog.at_level(logging.WARNING, logger="mpllama.engine"):
                for out in llm.stream(texts, PARAMS):
                    assert out.index not in seen, f"request {out.index} finished twice"
                    assert out.prompt == texts[out.index]
                    deltas.setdefault(out.index, []).extend(out.delta_token_ids)
                    if out.finished:
                        seen[out.index] = out.token_ids
        finally:
            killer.stop.set()
            killer.join()
        disturbed_s = time.monotonic() - started

    rebuilds = caplog.text.count("rebuilding the gang")
    print(
        f"\n{N_REQUESTS} requests: undisturbed {undisturbed_s:.1f}s, with "
        f"{len(killer.kills)} kills {disturbed_s:.1f}s, {rebuilds} rebuilds"
    )
    assert sorted(seen) == list(range(N_REQUESTS))
    wrong = [i for i in range(N_REQUESTS) if seen[i] != reference[i].token_ids]
    assert not wrong, f"{len(wrong)} request(s) differ from the undisturbed run: {wrong[:10]}"
    repeated = [i for i in range(N_REQUESTS) if deltas[i] != seen[i]]
    assert not repeated, f"{len(repeated)} stream(s) repeated or lost tokens: {repeated[:10]}"
    # The kills really happened, and each landed on a live gang that had to be rebuilt.
    assert len(killer.kills) >= 5
    assert rebuilds >= len(killer.kills) // 2
