"""The mpllama runners: the sync ``LLM`` over a whole workload, ``AsyncLLM`` under
Poisson arrivals on one asyncio loop, and each rank's memory growth."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_workloads import RunResult, Workload

from mpllama import LLM, AsyncLLM, SamplingParams

log = logging.getLogger("bench")
MAX_SEQ_LEN = 512  # every benchmark request fits: prompt <= 64 plus <= 200 new tokens


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def engine_settings(
    mp: int, slots: int, cpus_per_rank: float | None, **extra: object
) -> dict[str, object]:
    """The constructor settings every mpllama runner uses (LLM and AsyncLLM alike)."""
    return dict(
        model_parallel_size=mp,
        max_batch_size=slots,
        max_seq_len=MAX_SEQ_LEN,
        cpus_per_rank=cpus_per_rank,  # None: the ranks share the machine's cores
        **extra,
    )


def open_llm(ckpt: Path, mp: int, slots: int, cpus_per_rank: float | None, **extra: object) -> LLM:
    return LLM(ckpt, **engine_settings(mp, slots, cpus_per_rank, **extra))


def run_llm(llm: LLM, work: Workload, name: str, repeats: int = 1) -> RunResult:
    """The whole workload in one ``generate`` call, after a two-request warm-up; with
    ``repeats``, the fastest of that many calls (for a workload of a fraction of a
    second, which one of this machine's slow spells would decide).

    The warm-up's prompts are two of the workload's reversed: the same lengths, so the
    same kernel shapes, but no shared prefix, so the measured prompts find nothing in the
    prefix cache (the baselines have none). A repeat's prompts do share the previous
    call's, so repeats need an engine without prefix caching."""
    warm = [list(reversed(p)) for p in work.prompts[:2]]
    llm.generate(prompt_token_ids=warm, sampling_params=[greedy(2)] * len(warm))
    params = [greedy(n) for n in work.new_tokens]
    elapsed = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompt_token_ids=work.prompts, sampling_params=params)
        elapsed = min(elapsed, time.perf_counter() - start)
    tokens = [list(o.token_ids) for o in outputs]
    got = sum(map(len, tokens))
    if got != work.useful_tokens:
        log.warning("%s returned %d tokens, %d were asked for", name, got, work.useful_tokens)
    return RunResult(name, got, elapsed, tokens)


def rank_memory(llm: LLM) -> list[dict[str, float]] | str:
    """Each rank's memory report (``RankWorker.memory``: its growth, and the weights and
    KV cache it holds, counted tensor by tensor), or why it is unknown.

    Read through the engine's call-every-rank primitive, which the per-step engine may
    rename; a benchmark must not die on that, so a missing hook reads "n/a".
    """
    call_all = getattr(getattr(llm, "engine", None), "call_all", None)
    if call_all is None:
        return "n/a (llm.engine.call_all is gone)"
    try:
        return [dict(m) for m in call_all("memory")]
    except Exception as exc:  # any failure here costs only this one number
        return f"n/a ({type(exc).__name__}: {exc})"


def rank_memory_mb(llm: LLM) -> list[float] | str:
    """Each rank's resident-memory growth since it started (MiB), or why it is unknown:
    the anonymous memory it holds where the OS tells (prepacked weights, KV cache,
    activations; pages of a memory-mapped shard, which the kernel may drop, are not
    counted), else the growth of its peak."""
    reports = rank_memory(llm)
    if isinstance(reports, str):
        return reports
    return [float(m.get("anon_growth_mb", m["growth_mb"])) for m in reports]


# ------------------------------------------------------------------------ under load


@dataclass
class LoadResult:
    """Latencies seen by clients of AsyncLLM (seconds) and the throughput achieved."""

    name: str
    ttft: list[float] = field(default_factory=list)  # per request: arrival to first token
    itl: list[float] = field(default_factory=list)  # per token after the first
    tokens: int = 0
    seconds: float = 0.0  # first arrival to last token

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_load(
    ckpt: Path,
    mp: int,
    slots: int,
    cpus_per_rank: float | None,
    work: Workload,
    arrivals: list[float],
    name: str,
) -> LoadResult:
    """Request i enters ``AsyncLLM.generate`` at ``arrivals[i]`` seconds; all requests
    share one event loop, as a server's handlers would."""
    return asyncio.run(_load(ckpt, mp, slots, cpus_per_rank, work, arrivals, name))


async def _load(
    ckpt: Path,
    mp: int,
    slots: int,
    cpus_per_rank: float | None,
    work: Workload,
    arrivals: list[float],
    name: str,
) -> LoadResult:
    allm = AsyncLLM(ckpt, **engine_settings(mp, slots, cpus_per_rank))
    try:
        async for _ in allm.generate(work.prompts[0], greedy(2)):  # warm up
            pass
        result = LoadResult(name)
        start = time.perf_counter()
        jobs = [
            _client(allm, prompt, greedy(n), start + at, result)
            for prompt, n, at in zip(work.prompts, work.new_tokens, arrivals, strict=True)
        ]
        result.tokens = sum(await asyncio.gather(*jobs))
        result.seconds = time.perf_counter() - start
    finally:
        closing = allm.close()
        if inspect.isawaitable(closing):  # close() may become a coroutine; either works
            await closing
    return result


async def _client(
    allm: AsyncLLM, prompt: list[int], params: SamplingParams, arrive: float, into: LoadResult
) -> int:
    """One request, sent at perf_counter time ``arrive``; records its TTFT and ITLs."""
    await asyncio.sleep(max(0.0, arrive - time.perf_counter()))
    last, count = arrive, 0  # latencies run from the scheduled arrival, not a late wake-up
    async for out in allm.generate(prompt, params):
        n = len(out.delta_token_ids)
        if n == 0:
            continue
        now = time.perf_counter()
        if count == 0:
            into.ttft.append(now - arrive)
        else:  # an event carrying several tokens spreads its gap over them
            into.itl.extend([(now - last) / n] * n)
        last, count = now, count + n
    return count
