"""YAML batch jobs: a JSONL file of requests in, a JSONL file of results out.

Each input line is an object ``{"id": ..., "prompt": "..."}`` or ``{"id": ...,
"messages": [...]}`` (a chat dialog, in the model's chat format), optionally with ``"sampling": {...}``
overriding the job's sampling section for that request.

Nothing is lost and nothing is written twice: every request is appended to the output,
flushed and fsynced as soon as it finishes (in the order they finish); a rerun reads the output first,
drops a torn last line left by a killed run, and only runs the ids not yet there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from .config import RunConfig, SamplingParams, run_config_from_dict
from .errors import ConfigError, MpllamaError, PromptError
from .protocol import derive_seed

log = logging.getLogger(__name__)

REQUEST_FIELDS = ("id", "prompt", "messages", "sampling")
_SHOWN_PROBLEMS = 20  # bad lines listed in an error; the rest are counted


@dataclass
class JobRequest:
    id: str | int
    line: int  # 1-based line in the input file
    prompt: str | None
    messages: list[Any] | None
    params: SamplingParams


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
    pending = [r for r in requests if _key(r.id) not in done]
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


# ------------------------------------------------------------------------ input


def read_requests(path: Path, defaults: SamplingParams) -> tuple[list[JobRequest], list[str]]:
    """The valid requests of a JSONL file, and one ``"line N: why"`` per bad line.

    A duplicate id keeps its first line and reports the later ones.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read job input {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"job input {path} is not UTF-8 text: {exc}") from None
    requests: list[JobRequest] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines carry no request
        try:
            request = _parse_request(raw, number, defaults)
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        key = _key(request.id)
        if key in first_line:
            problems.append(
                f"line {number}: duplicate id {request.id!r} (first on line {first_line[key]})"
            )
            continue
        first_line[key] = number
        requests.append(request)
    return requests, problems


def _parse_request(raw: str, number: int, defaults: SamplingParams) -> JobRequest:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {list(REQUEST_FIELDS)}")
    if "id" not in obj:
        raise ValueError("missing id; every request needs an 'id' (string or integer)")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise ValueError(f"id must be a non-empty string or an integer, got {rid!r}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError(
            f"id {rid!r}: give exactly one of 'prompt' (text) or 'messages' (a chat dialog)"
        )
    if has_prompt and not isinstance(obj["prompt"], str):
        raise ValueError(f"id {rid!r}: prompt must be a string, got {type(obj['prompt']).__name__}")
    if has_messages and not isinstance(obj["messages"], list):
        raise ValueError(f"id {rid!r}: messages must be a list of {{role, content}} objects")
    params = defaults
    overrides = obj.get("sampling")
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise ValueError(f"id {rid!r}: sampling must be an object of SamplingParams fields")
        merged = {**dataclasses.asdict(defaults), **overrides}
        try:
            params = run_config_from_dict({"sampling": merged}, f"id {rid!r}").sampling
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    return JobRequest(rid, number, obj.get("prompt"), obj.get("messages"), params)


def _key(rid: str | int) -> str:
    # 7 and "7" name the same request: output readers should not have to tell them apart.
    return str(rid)


# ------------------------------------------------------------------------ output


def read_done_ids(path: Path) -> set[str]:
    """Ids already in the output; a torn last line (a killed run) is cut off the file."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    done: set[str] = set()
    good_end = 0  # byte offset just past the last complete, parseable line
    offset = 0
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        end = offset + len(raw) + 1
        complete = i < len(lines) - 1  # the last piece has no newline after it
        if raw.strip():
            record = _parse_result(raw) if complete else None
            if record is None:
                if any(rest.strip() for rest in lines[i + 1 :]):
                    raise MpllamaError(
                        f"{path}: line {i + 1} is not a result record but more lines follow; "
                        "the file was not written by mpllama or was edited. Repair or move it "
                        "away, then run again"
                    )
                break  # torn tail: redo that request
            done.add(_key(record["id"]))
        if complete:
            good_end = end
        offset = end
    if good_end < len(data):
        log.warning(
            "%s: dropping a torn last line (%d bytes) left by an interrupted run; "
            "that request runs again",
            path,
            len(data) - good_end,
        )
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return done


def _parse_result(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
        return None
    return record


def _append(f: IO[bytes], records: Iterable[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if data:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
            params = params.replace(seed=derive_seed(runtime.seed, _key(request.id)))
        runnable.append((request, ids, params))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    progress = _ProgressBar(summary.requests, summary.already_done, config.job.progress)
    with open(out_path, "ab") as f:
        _append(f, errors)
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
                _append(f, [_error(runnable[out.index][0], out.error or "error")])
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
    _append(f, batch)
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
