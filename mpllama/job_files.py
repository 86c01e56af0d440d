"""The files of a batch job (jobs.py): its JSONL requests read and checked, and its JSONL
results, read back on a rerun (a torn last line cut off) and appended, flushed and
fsynced, so nothing is lost and nothing is written twice."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .config import SamplingParams, run_config_from_dict
from .errors import ConfigError, MpllamaError

log = logging.getLogger(__name__)

REQUEST_FIELDS = ("id", "prompt", "messages", "sampling")


@dataclass
class JobRequest:
    id: str | int
    line: int  # 1-based line in the input file
    prompt: str | None
    messages: list[Any] | None
    params: SamplingParams


# ------------------------------------------------------------------------ input


def read_requests(path: Path, defaults: SamplingParams) -> tuple[list[JobRequest], list[str]]:
    """The valid requests of a JSONL file, and one ``"line N: why"`` per bad line.

    A duplicate id keeps its first line and reports the later ones.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not content
    except OSError as exc:
        raise ConfigError(f"cannot read job input {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"job input {path} is not UTF-8 text: {exc}") from None
    requests: list[JobRequest] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    # JSON lines end at "\n" alone: splitlines would also cut at U+2028, U+2029, U+0085
    # and the like, which JSON strings may hold as they are.
    for number, line in enumerate(text.split("\n"), start=1):
        raw = line.removesuffix("\r")
        if not raw.strip():
            continue  # blank lines carry no request
        try:
            request = _parse_request(raw, number, defaults)
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        key = request_key(request.id)
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


def request_key(rid: str | int) -> str:
    # 7 and "7" name the same request: output readers should not have to tell them apart.
    return str(rid)


# ------------------------------------------------------------------------ output


def read_done_ids(path: Path) -> set[str]:
    """Ids already in the output; a torn last line (a killed run) is cut off the file, and
    the error records of requests that failed are taken out of it, so that they run
    again (an error may say to raise a setting; the rerun then gives its result)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    # Each record ends with its newline, so only what follows the last one can be a
    # killed run's torn line: a whole line that is no record was not written by mpllama,
    # and cutting it off would empty someone's file.
    *whole, tail = data.split(b"\n")
    done: set[str] = set()
    kept: list[bytes] = []  # the lines of requests done
    failed = 0
    for i, raw in enumerate(whole):
        if not raw.strip():
            continue
        record = _parse_result(raw)
        if record is None:
            raise MpllamaError(
                f"{path}: line {i + 1} is not a result record; the file was not written "
                "by mpllama or was edited. Repair or move it away (or name another "
                "job.output), then run again"
            )
        if record.get("finish_reason") == "error":
            failed += 1
        else:
            done.add(request_key(record["id"]))
            kept.append(raw)
    if tail:
        log.warning(
            "%s: dropping a torn last line (%d bytes) left by an interrupted run; "
            "that request runs again",
            path,
            len(tail),
        )
    if failed:
        log.info("%s: %d request(s) that failed run again", path, failed)
        _rewrite(path, b"".join(line + b"\n" for line in kept))
    elif tail:  # the rest stays where it is
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
            f.flush()
            os.fsync(f.fileno())
    return done


def _rewrite(path: Path, data: bytes) -> None:
    """``path`` holding ``data`` instead, whole or not at all (a new file, synced, then
    renamed over it)."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _parse_result(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)):
        return None
    return record


def append_records(f: IO[bytes], records: Iterable[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if data:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
