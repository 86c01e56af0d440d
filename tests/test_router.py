"""Replicas: several gangs behind one LLM. Results equal one replica's (greedy and
seeded alike), the work spreads over the gangs, a failed gang's requests move to the
others while it is rebuilt (the others never stop), a batch job survives a rank killed
mid-job, and a gang that cannot be placed says what is missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from mpllama import LLM, SamplingParams
from mpllama.config import load_run_config
from mpllama.errors import PlacementError, WorkerError
from mpllama.jobs import run_job

GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=True, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, ignore_eos=True)
PROMPTS = [f"Prompt {i}: " + "word " * (i % 4) for i in range(12)]
SMALL = {"model_parallel_size": 1, "cpus_per_rank": 0.5, "max_seq_len": 128, "max_batch_size": 4}
LONG = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)


@pytest.fixture(scope="module")
def one(tiny_ckpt: Path, ray_runtime):
    with LLM(tiny_ckpt, **SMALL) as llm:
        yield llm


@pytest.fixture(scope="module")
def two(tiny_ckpt: Path, ray_runtime):
    with LLM(tiny_ckpt, replicas=2, restart_backoff_s=0.2, **SMALL) as llm:
        yield llm


def test_two_replicas_give_what_one_gives_and_share_the_work(one: LLM, two: LLM) -> None:
    assert two.replicas == 2
    for params in (GREEDY, SAMPLED):
        want = one.generate(PROMPTS, params)
        got = two.generate(PROMPTS, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.index for o in got] == list(range(len(PROMPTS)))
        assert {o.replica for o in got} == {0, 1}
    # Different gangs: different processes, placement groups of their own.
    pids = [{i["pid"] for i in e.rank_info} for e in two.router.engines]
    assert not pids[0] & pids[1]
    assert two.router.engines[0].gang.pg.id != two.router.engines[1].gang.pg.id


def test_requests_go_to_the_gang_with_the_least_outstanding_work(two: LLM) -> None:
    """A long request keeps gang A busy: the short ones that follow all go to gang B."""
    long_one = two.stream(PROMPTS[0], LONG)
    first = next(long_one)  # running now, on some gang
    busy = first.replica
    short = two.generate(PROMPTS[1:5], SamplingParams(temperature=0, max_tokens=2))
    assert {o.replica for o in short} == {1 - busy}
    long_one.close()


def test_a_failed_gang_hands_its_requests_to_the_other_which_never_stops(
    one: LLM, two: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    want = [o.token_ids for o in one.generate(PROMPTS, LONG)]
    victim, other = two.router.engines
    other_pids = [i["pid"] for i in other.rank_info]
    pid = victim.rank_info[0]["pid"]
    finals: dict[int, list[int]] = {}
    with caplog.at_level("WARNING", logger="mpllama"):
        for out in two.stream(PROMPTS, LONG):
            if out.replica == victim.replica and len(out.token_ids) == 10:
                os.kill(pid, signal.SIGKILL)  # mid-generation, with requests on it
            if out.finished:
                finals[out.index] = out.token_ids
    got = [finals[i] for i in range(len(PROMPTS))]
    assert got == want
    assert "replica 0 failed" in caplog.text or "replica 1 failed" in caplog.text
    assert "move to replica(s)" in caplog.text
    assert [i["pid"] for i in other.rank_info] == other_pids  # the other gang never stopped
    # The failed gang is rebuilt in the background, with no request waiting for it.
    deadline = time.monotonic() + 30
    while not victim.healthy and time.monotonic() < deadline:
        time.sleep(0.2)
    assert victim.healthy and victim.restarts >= 1
    assert pid not in {i["pid"] for i in victim.rank_info}
    assert victim.failures and "died" in victim.failures[-1]


def test_job_with_two_replicas_survives_a_rank_killed_mid_job(
    tiny_ckpt: Path, tmp_path: Path, one: LLM, ray_runtime
) -> None:
    prompts = [f"Job prompt {i}" for i in range(40)]
    job_in = tmp_path / "in.jsonl"
    job_in.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = {i: o.token_ids for i, o in enumerate(one.generate(prompts, params))}
    yaml = tmp_path / "job.yaml"
    yaml.write_text(
        f"model: {{checkpoint_dir: {tiny_ckpt}}}\n"
        "parallel: {model_parallel_size: 1, replicas: 2, cpus_per_rank: 0.5, "
        "restart_backoff_s: 0.2}\n"
        "runtime: {max_seq_len: 128, max_batch_size: 4}\n"
        "sampling: {temperature: 0, max_tokens: 40, ignore_eos: true}\n"
        f"job: {{input: {job_in}, output: {tmp_path / 'out.jsonl'}}}\n"
    )
    config = load_run_config(yaml)
    with LLM(config=config) as llm:
        victim, other = llm.router.engines
        other_pids = [i["pid"] for i in other.rank_info]
        out = tmp_path / "out.jsonl"

        def kill_when_started() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if out.exists() and len(out.read_text().splitlines()) >= 3:
                    os.kill(victim.rank_info[0]["pid"], signal.SIGKILL)
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_when_started)
        killer.start()
        summary = run_job(config, llm=llm)
        killer.join()
        assert [i["pid"] for i in other.rank_info] == other_pids
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert sorted(ids) == list(range(40))  # every id exactly once
    assert all(r["token_ids"] == want[r["id"]] for r in records)
    assert summary.completed == 40 and summary.errors == 0
    assert len(summary.replicas[0]["failures"]) == 1  # the summary reports the failure
    assert summary.replicas[0]["requests"] + summary.replicas[1]["requests"] == 40
    text = summary.describe()
    assert "replica 0" in text and "1 failure(s)" in text and "died" in text


def test_every_gang_down_fails_with_the_ranks_and_nodes(
    tiny_ckpt: Path, tmp_path: Path, ray_runtime
) -> None:
    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))
    llm = LLM(ckpt, replicas=2, max_restarts=1, restart_backoff_s=0.1, **SMALL)
    try:
        shard = ckpt / "consolidated.01.pth"
        data = shard.read_bytes()[:1000]
        tmp = shard.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, shard)  # every rebuild now fails while loading
        for engine in llm.router.engines:
            os.kill(engine.rank_info[0]["pid"], signal.SIGKILL)
        with pytest.raises(WorkerError) as info:
            llm.generate(PROMPTS[:4], GREEDY)
        message = str(info.value)
        assert "rank 0" in message and "replica" in message and "node" in message
        assert "CheckpointError" in message
    finally:
        llm.close()


def test_a_gang_that_cannot_be_placed_names_what_is_missing(tiny_ckpt: Path, ray_runtime) -> None:
    settings = {**SMALL, "cpus_per_rank": 5.0, "placement_timeout_s": 2.0}
    started = time.monotonic()
    with pytest.raises(PlacementError) as info:
        LLM(tiny_ckpt, replicas=2, **settings)  # the test runtime has 8 CPUs: one fits
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert "of 2:" in message and "'CPU': 5.0" in message and "replicas: auto" in message
    # replicas: auto starts as many as fit, here one.
    with LLM(tiny_ckpt, replicas="auto", **settings) as llm:
        assert llm.replicas == 1
        assert len(llm.generate(PROMPTS[:2], GREEDY)) == 2
