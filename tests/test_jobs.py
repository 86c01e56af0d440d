"""YAML batch jobs: JSONL in, JSONL out, bad lines reported by line number, per-request
error records, resumable after a torn line or a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpllama.config import RunConfig, load_run_config
from mpllama.errors import ConfigError
from mpllama.job_files import read_done_ids
from mpllama.jobs import run_job

SETTINGS = {
    "max_batch_size": 4,
    "max_seq_len": 64,
    "cpus_per_rank": 0.5,
    "backend": "gloo",
    "device": "cpu",
}
PROMPTS = [f"Return the value number {i} of the" for i in range(10)]


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path):
    """One 2-rank LLM on the shared Ray runtime, reused by every job of this module."""
    import ray

    from mpllama.api import LLM

    if not ray.is_initialized():  # as conftest's ray_runtime, which is function-scoped
        ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    with LLM(tiny_ckpt, **SETTINGS) as model:
        yield model


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def job(tmp_path: Path, rows: list[Any], **sections: dict[str, Any]) -> Path:
    """A job YAML in tmp_path with its input; greedy, 4 tokens unless overridden."""
    write_jsonl(tmp_path / "in.jsonl", rows)
    data: dict[str, Any] = {
        "model": {"checkpoint_dir": "ckpt"},
        "sampling": {"temperature": 0, "max_tokens": 4},
        "job": {"input": "in.jsonl", "output": "out.jsonl"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_llm(config: RunConfig) -> Any:
    raise AssertionError("the job must fail before any model work")


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    from mpllama.jobs import _ProgressBar

    bar = _ProgressBar(10, 4, enabled=True)  # 4 done by an earlier run
    bar.update(3, 120)
    bar.close()
    err = capsys.readouterr().err
    assert "7/10" in err and "<" in err and "tokens/s" in err, err  # counts, ETA, rate
    quiet = _ProgressBar(10, 0, enabled=None)  # stderr is not a terminal here: no bar
    quiet.update(10, 50)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_job_end_to_end(tmp_path: Path, llm: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[Any] = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:5])]
    rows.append({"id": "chat", "messages": [{"role": "user", "content": "Hi there"}]})
    rows.append(
        {
            "id": "lp",
            "prompt": "The logging module",
            "sampling": {"logprobs": True, "max_tokens": 3, "top_logprobs": 2},
        }
    )
    config = load_run_config(job(tmp_path, rows, job={"progress": True}))
    summary = run_job(config, no_llm, llm=llm)
    out = results(tmp_path / "out.jsonl")
    assert sorted(map(str, (r["id"] for r in out))) == sorted(str(r["id"]) for r in rows)
    by_id = {r["id"]: r for r in out}
    for record in out:
        assert set(record) >= {
            "id",
            "text",
            "token_ids",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "timing",
        }
        assert record["completion_tokens"] == len(record["token_ids"]) <= 4
        assert ("logprobs" in record) == (record["id"] == "lp")
    assert len(by_id["lp"]["logprobs"]) == len(by_id["lp"]["token_ids"]) <= 3
    tops = by_id["lp"]["top_logprobs"]  # {"id": log-prob}: JSON's keys are strings
    assert len(tops) == len(by_id["lp"]["token_ids"]) and all(len(t) == 2 for t in tops)
    assert max(tops[0].values()) == pytest.approx(by_id["lp"]["logprobs"][0], abs=1e-5)
    # The same prompt through the API gives the same greedy tokens.
    from mpllama.config import SamplingParams

    direct = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))[0]
    assert by_id[0]["token_ids"] == direct.token_ids
    assert summary.requests == summary.completed == 7 and summary.errors == 0
    assert summary.completion_tokens == sum(r["completion_tokens"] for r in out)
    bar = capsys.readouterr().err.splitlines()[-1]
    assert "requests: 100%" in bar and "7/7" in bar and "tokens/s" in bar, bar
    # Everything is done: a rerun runs nothing and needs no model.
    again = run_job(config, no_llm)
    assert again.already_done == 7 and again.completed == 0
    assert len(results(tmp_path / "out.jsonl")) == 7


def test_resume_after_torn_line(tmp_path: Path, llm: Any) -> None:
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS[:6])]
    config = load_run_config(job(tmp_path, rows))
    done = [
        {"id": "r0", "text": "KEPT", "token_ids": [], "finish_reason": "stop"},
        {"id": "r3", "text": "KEPT", "token_ids": [], "finish_reason": "stop"},
    ]
    out_path = tmp_path / "out.jsonl"
    write_jsonl(out_path, done)
    with open(out_path, "a") as f:
        f.write('{"id": "r4", "text": "tor')  # a run killed mid-write
    summary = run_job(config, llm=llm)
    out = results(out_path)
    ids = [r["id"] for r in out]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # each exactly once
    assert [r["text"] for r in out[:2]] == ["KEPT", "KEPT"]
    assert summary.already_done == 2 and summary.completed == 4


def test_a_rerun_runs_the_requests_that_failed_again(tmp_path: Path, llm: Any) -> None:
    """An error record may say what to change ("raise runtime.max_seq_len"); the rerun
    runs that request again and its record replaces the error, each id once. Before,
    error records counted as done: the rerun ran nothing and kept the error."""
    rows = [{"id": "a", "prompt": PROMPTS[0]}, {"id": "b", "prompt": PROMPTS[1]}]
    config = load_run_config(job(tmp_path, rows))
    out_path = write_jsonl(
        tmp_path / "out.jsonl",
        [
            {"id": "a", "error": "too long: raise runtime.max_seq_len", "finish_reason": "error"},
            {"id": "b", "text": "KEPT", "token_ids": [], "finish_reason": "stop"},
        ],
    )
    summary = run_job(config, llm=llm)
    out = results(out_path)
    assert [r["id"] for r in out] == ["b", "a"] and out[0]["text"] == "KEPT"
    assert out[1]["finish_reason"] == "length" and out[1]["token_ids"]
    assert summary.already_done == 1 and summary.completed == 1
    assert not (tmp_path / "out.jsonl.part").exists()


def test_torn_line_only_at_the_end(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "out.jsonl", ['{"id": 1}', "garbage", '{"id": 2}'])
    with pytest.raises(Exception, match="line 2"):
        read_done_ids(path)
    path = tmp_path / "out2.jsonl"
    path.write_text('{"id": 1}\n{"id": "x", "te')  # killed mid-write: no newline after it
    assert read_done_ids(path) == {"1"}
    assert path.read_text() == '{"id": 1}\n'
    # A whole last line that is no record is someone's file, not a torn write: it was
    # cut off, and a one-line file emptied.
    for lines in (["my notes"], ['{"id": 1}', '{"a": 1}']):
        path = write_jsonl(tmp_path / "notes.jsonl", lines)
        with pytest.raises(Exception, match=f"line {len(lines)} is not a result record"):
            read_done_ids(path)
        assert path.read_text() == "".join(f"{line}\n" for line in lines)


def test_input_lines_are_json_lines_whatever_else_they_hold(tmp_path: Path) -> None:
    """A byte-order mark starts the file, and U+2028, U+2029 and U+0085 (which JSON strings
    hold as they are) stay inside their line: splitlines cut there, and each such
    request failed as two bad lines. CRLF endings still read."""
    from mpllama.config import SamplingParams
    from mpllama.job_files import read_requests

    path = tmp_path / "in.jsonl"
    prompts = ["one\u2028two", "three\u2029four", "five\x85six", "plain"]
    lines = [json.dumps({"id": i, "prompt": p}, ensure_ascii=False) for i, p in enumerate(prompts)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    requests, problems = read_requests(path, SamplingParams())
    assert problems == []
    assert [r.prompt for r in requests] == prompts


def test_a_job_writing_into_its_own_input_is_refused(tmp_path: Path) -> None:
    config = load_run_config(
        job(tmp_path, [{"id": "a", "prompt": "Hi"}], job={"output": "in.jsonl"})
    )
    with pytest.raises(ConfigError, match="job.output is job.input"):
        run_job(config, no_llm)


BAD_ROWS: list[Any] = [
    {"id": "a", "prompt": "Hello"},  # line 1: fine
    '{"id": "b", "prompt": ',  # line 2: malformed JSON
    {"prompt": "no id"},  # line 3: missing id
    {"id": "a", "prompt": "again"},  # line 4: duplicate of line 1
    {"id": "c", "prompt": "x", "sampling": {"temperature": -1}},  # line 5: bad sampling
    {"id": "d", "prompt": "x", "messages": []},  # line 6: both prompt and messages
    {"id": "e", "prompt": "x", "colour": "red"},  # line 7: unknown field
    {"id": "f", "prompt": "The end"},  # line 8: fine
]


def test_bad_lines_stop_the_job_before_model_work(tmp_path: Path) -> None:
    config = load_run_config(job(tmp_path, BAD_ROWS))
    with pytest.raises(ConfigError) as info:
        run_job(config, no_llm)
    message = str(info.value)
    for n in (2, 3, 4, 5, 6, 7):
        assert f"line {n}:" in message
    assert "line 1:" not in message and "line 8:" not in message
    assert "duplicate id 'a' (first on line 1)" in message and "missing id" in message
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_lines_skipped_and_counted(
    tmp_path: Path, llm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_run_config(job(tmp_path, BAD_ROWS, job={"on_bad_line": "skip"}))
    summary = run_job(config, llm=llm)
    assert summary.bad_lines == 6 and summary.completed == 2
    assert sorted(r["id"] for r in results(tmp_path / "out.jsonl")) == ["a", "f"]
    assert "line 2:" in caplog.text and "line 7:" in caplog.text


def test_per_request_errors_do_not_stop_the_rest(tmp_path: Path, llm: Any) -> None:
    rows = [
        {"id": "ok", "prompt": "Hello"},
        {"id": "long", "prompt": "word " * 200},  # far past max_seq_len=64
        {"id": "tag", "messages": [{"role": "user", "content": "[INST] sneaky"}]},
        {"id": "order", "messages": [{"role": "assistant", "content": "hi"}]},
        {"id": "ok2", "messages": [{"role": "user", "content": "Hello"}]},
        # logit_bias as JSON has it (string keys): a token past the vocabulary is an error.
        {"id": "bias", "prompt": "Hello", "sampling": {"logit_bias": {"100": 100}}},
        {"id": "vocab", "prompt": "Hello", "sampling": {"logit_bias": {"99999": 1}}},
    ]
    summary = run_job(load_run_config(job(tmp_path, rows)), llm=llm)
    by_id = {r["id"]: r for r in results(tmp_path / "out.jsonl")}
    assert set(by_id) == {r["id"] for r in rows}
    for bad in ("long", "tag", "order", "vocab"):
        assert by_id[bad]["finish_reason"] == "error" and by_id[bad]["error"]
    assert "max_seq_len" in by_id["long"]["error"] and "[INST]" in by_id["tag"]["error"]
    assert "logit_bias" in by_id["vocab"]["error"]
    assert by_id["ok"]["token_ids"] and by_id["ok2"]["token_ids"]
    assert set(by_id["bias"]["token_ids"]) == {100}
    assert summary.errors == 4 and summary.completed == 7


def test_killed_run_resumes_without_loss_or_duplicates(
    tmp_path: Path, llm: Any, tiny_ckpt: Path
) -> None:
    import ray

    rows = [{"id": i, "prompt": f"Item {i} of the list is"} for i in range(24)]
    sections = {
        "model": {"checkpoint_dir": str(tiny_ckpt)},
        "parallel": {"model_parallel_size": 2, "cpus_per_rank": 0.5, "backend": "gloo"},
        "runtime": {"device": "cpu", "max_batch_size": 2, "max_seq_len": 64},
        "sampling": {"max_tokens": 12},
    }
    path = job(tmp_path, rows, **sections)
    out_path = tmp_path / "out.jsonl"
    # The killed driver joins the shared runtime (no second Ray to start); Ray reaps its
    # ranks when it dies.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "mpllama.cli",
        "run",
        str(path),
        "--set",
        f"parallel.ray_address={ray.get_runtime_context().gcs_address}",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out_path.exists() and out_path.stat().st_size > 0):
            if proc.poll() is not None:
                pytest.fail(f"job exited early: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no result within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    written = len(out_path.read_bytes().splitlines())
    assert 0 < written < len(rows), "the kill should land mid-run"

    summary = run_job(load_run_config(path), llm=llm)
    assert summary.already_done + summary.completed == len(rows)
    resumed = results(out_path)
    assert sorted(r["id"] for r in resumed) == list(range(len(rows)))

    # An undisturbed run of the same job gives the same greedy tokens for every id.
    clean = run_job(load_run_config(path, ["job.output=" + str(tmp_path / "clean.jsonl")]), llm=llm)
    assert clean.completed == len(rows)
    reference = {r["id"]: r["token_ids"] for r in results(tmp_path / "clean.jsonl")}
    assert {r["id"]: r["token_ids"] for r in resumed} == reference


def test_a_rows_sampling_may_set_or_replace_the_jobs_guided(tmp_path: Path) -> None:
    from mpllama.config import SamplingParams
    from mpllama.guided import Guided
    from mpllama.job_files import read_requests

    rows = [
        {"id": "own", "prompt": "x", "sampling": {"guided": {"choice": ["yes", "no"]}}},
        {"id": "job's", "prompt": "x", "sampling": {"max_tokens": 3}},
        {"id": "bad", "prompt": "x", "sampling": {"guided": {"regex": "a", "json": True}}},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    requests, problems = read_requests(path, SamplingParams(guided={"json": True}))
    assert [(r.id, r.params.guided) for r in requests] == [
        ("own", Guided(choice=("yes", "no"))),
        ("job's", Guided(json=True)),
    ]
    assert requests[1].params.max_tokens == 3
    assert len(problems) == 1 and "bad" in problems[0] and "exactly one" in problems[0]
