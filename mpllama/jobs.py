"""YAML batch jobs: a JSONL file of requests in, a JSONL file of results out.

Each input line is an object ``{"id": ..., "prompt": "..."}`` or ``{"id": ...,
"messages": [...]}`` (a chat dialog, in the model's chat format), optionally with ``"sampling": {...}``
overriding the job's sampling section for that request.

Nothing is lost and nothing is written twice: every request is appended to the output,
flushed and fsynced as soon as it finishes (in the order they finish); a rerun reads the output first,
drops a torn last line left by a killed run, and only runs the ids not yet there.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from .config import RunConfig, SamplingParams
from .errors import ConfigError, PromptError
from .job_files import JobRequest, append_records, read_done_ids, read_requests, request_key
from .protocol import derive_seed

log = logging.getLogger(__name__)

_SHOWN_PROBLEMS = 20  # bad lines listed in an error; the rest are counted


@dataclass
class JobSummary:
    input: Path
    output: Path
    requests: int = 0  # valid requests in the input
    already_done: int = 0  # found in the output from an earlier run, not run again
    completed: int = 0  # finished by this run (errors included)
    errors: int = 0  # requests answered with an error record by this run
    bad_lines: int = 0  # input lines skipped (on_bad_line: skip)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    # Per gang: {"requests", "tokens", "failures": [one line per gang failure], "nodes"}.
    replicas: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        text = (
            f"{self.requests} request(s): {self.completed} run now, {self.already_done} "
            f"already done, {self.errors} error(s), {self.bad_lines} bad line(s) skipped; "
            f"{self.completion_tokens} token(s) generated in {self.wall_s:.1f}s "
            f"({self.tokens_per_s:.1f} tokens/s)"
        )
        if len(self.replicas) > 1 or any(r["failures"] for r in self.replicas.values()):
            for i, r in sorted(self.replicas.items()):
                text += (
                    f"\n  replica {i} ({', '.join(r['nodes']) or '?'}): {r['requests']} "
                    f"request(s), {r['tokens']} token(s), {len(r['failures'])} failure(s)"
                )
                text += "".join(f"\n    {line}" for line in r["failures"])
        return text


def _default_llm(config: RunConfig) -> Any:
    from .api import LLM

    return LLM(config=config)


def run_job(
    config: RunConfig,
    llm_factory: Callable[[RunConfig], Any] = _default_llm,
    *,
    llm: Any = None,
) -> JobSummary:
    """Run every request of ``config.job.input`` not yet in ``config.job.output``.

    The input is checked in full before any model work. ``llm`` reuses an open LLM (left
    open; its runtime settings win over ``config.runtime``); otherwise ``llm_factory``
    builds one from ``config`` and it is closed at the end.
    """
    started = time.perf_counter()
    job = config.job
    if not job.input or not job.output:
        raise ConfigError(
            "a job needs job.input (JSONL requests) and job.output (JSONL "
            "results); set them in the YAML or with --set job.input=..."
        )
    in_path, out_path = Path(job.input).resolve(), Path(job.output).resolve()
    if in_path == out_path:  # every request would read as done, and results join it
        raise ConfigError(f"job.output is job.input ({in_path}); name another file")
    requests, problems = read_requests(in_path, config.sampling)
    if problems and job.on_bad_line == "stop":
        raise ConfigError(
            f"{in_path}: {len(problems)} bad line(s), nothing was run: "
            + "; ".join(problems[:_SHOWN_PROBLEMS])
            + (
                f"; and {len(problems) - _SHOWN_PROBLEMS} more"
                if len(problems) > _SHOWN_PROBLEMS
                else ""
            )
            + ". Fix them, or set job.on_bad_line=skip to run the rest"
        )
    for problem in problems:
        log.warning("%s: skipping %s", in_path, problem)

    done = read_done_ids(out_path)
    pending = [r for r in requests if request_key(r.id) not in done]
    summary = JobSummary(
        in_path,
        out_path,
        requests=len(requests),
        already_done=len(requests) - len(pending),
        bad_lines=len(problems),
    )
    if summary.already_done:
        log.info(
            "%s: %d of %d request(s) already done, resuming",
            out_path,
            summary.already_done,
            len(requests),
        )
    if pending:
        own = llm is None
        if own:
            llm = llm_factory(config)
        try:
            _run_pending(llm, config, pending, out_path, summary)
        finally:
            if own:
                llm.close()
    summary.wall_s = time.perf_counter() - started
    log.info("job done: %s; results in %s", summary.describe(), out_path)
    return summary


# ------------------------------------------------------------------------ running


def _run_pending(
    llm: Any, config: RunConfig, pending: list[JobRequest], out_path: Path, summary: JobSummary
) -> None:
    runtime = llm.config.runtime
    runnable: list[tuple[JobRequest, list[int], SamplingParams]] = []
    errors: list[dict[str, Any]] = []
    for request in pending:
        try:
            if request.messages is not None:
                ids = llm.tokenizer.encode_dialog(request.messages)
            else:
                ids = llm.prompts.encode(request.prompt, request.line)
        except PromptError as exc:
            errors.append(_error(request, str(exc)))
            continue
        params = request.params
        if params.seed is None:
            # Seeded by its id, not its position: a resumed run samples alike.
            params = params.replace(seed=derive_seed(runtime.seed, request_key(request.id)))
        runnable.append((request, ids, params))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    progress = _ProgressBar(summary.requests, summary.already_done, config.job.progress)
    with open(out_path, "ab") as f:
        append_records(f, errors)
        summary.completed += len(errors)
        summary.errors += len(errors)
        progress.update(len(errors), 0)
        if not runnable:
            progress.close()
            return
        # Each request is appended and fsynced the moment it finishes: a killed job
        # loses only the requests still running.
        start = time.perf_counter()
        # errors="return": a prompt the model cannot run (too long for the context,
        # ids outside the vocabulary) gets its error record; the others go on.
        finished = llm.as_completed(
            prompt_token_ids=[ids for _, ids, _ in runnable],
            sampling_params=[p for _, _, p in runnable],
            errors="return",
        )
        for out in finished:
            if out.finish_reason == "error":
                append_records(f, [_error(runnable[out.index][0], out.error or "error")])
                summary.completed += 1
                summary.errors += 1
                progress.update(1, 0)
                continue
            timing = round(time.perf_counter() - start, 4)
            _flush(f, [_record(runnable[out.index], out, timing)], summary, progress)
            mine = summary.replicas.setdefault(out.replica, _replica())
            mine["requests"] += 1
            mine["tokens"] += len(out.token_ids)
    progress.close()
    router = getattr(llm, "router", None)
    for stats in router.stats() if router is not None else []:
        mine = summary.replicas.setdefault(stats["replica"], _replica())
        mine.update(failures=stats["failures"], nodes=stats["nodes"])


def _replica() -> dict[str, Any]:
    return {"requests": 0, "tokens": 0, "failures": [], "nodes": []}


def _error(request: JobRequest, message: str) -> dict[str, Any]:
    log.warning("request %r (line %d): %s", request.id, request.line, message)
    return {"id": request.id, "error": message, "finish_reason": "error"}


def _record(
    job: tuple[JobRequest, list[int], SamplingParams], out: Any, timing: float
) -> dict[str, Any]:
    request, ids, params = job
    record: dict[str, Any] = {
        "id": request.id,
        "text": out.text,
        "token_ids": out.token_ids,
        "finish_reason": out.finish_reason,
    }
    if params.logprobs:
        record["logprobs"] = out.logprobs
    if params.top_logprobs:  # JSON's keys are strings: {"123": -0.5}
        record["top_logprobs"] = out.top_logprobs
    record.update(prompt_tokens=len(ids), completion_tokens=len(out.token_ids), timing=timing)
    return record


def _flush(
    f: IO[bytes], batch: list[dict[str, Any]], summary: JobSummary, progress: _ProgressBar
) -> None:
    append_records(f, batch)
    tokens = sum(r["completion_tokens"] for r in batch)
    summary.completed += len(batch)
    summary.prompt_tokens += sum(r["prompt_tokens"] for r in batch)
    summary.completion_tokens += tokens
    progress.update(len(batch), tokens)


class _ProgressBar:
    """``requests: 40%|####      | 40/100 [00:12<00:18, 3.21req/s, 123.4 tokens/s]`` on
    stderr (tqdm: elapsed time, ETA, request rate, and the generation rate in tokens/s).

    ``enabled`` None shows it only when stderr is a terminal (tqdm's own rule); a bar
    forced on where stderr is a file or a pipe (a job's log) is redrawn every 10 s.
    """

    def __init__(self, total: int, done: int, enabled: bool | None) -> None:
        tty = sys.stderr.isatty()
        self.tokens = 0
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total,
            initial=done,  # done by an earlier run: counted, but not in the rates
            desc="requests",
            unit="req",
            file=sys.stderr,
            disable=None if enabled is None else not enabled,
            mininterval=0.1 if tty else 10.0,
            dynamic_ncols=tty,
        )

    def update(self, requests: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} tokens/s", refresh=False)
        self.bar.update(requests)

    def close(self) -> None:
        self.bar.close()
