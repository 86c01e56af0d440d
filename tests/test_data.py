"""Ray Data: a real pipeline on the local Ray, Parquet in and Parquet out through
mpllama.data.Completer; every row comes back, completions equal LLM.generate, and a
bad row carries its error instead of failing the dataset."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mpllama import LLM, SamplingParams
from mpllama.config import load_run_config
from mpllama.errors import ConfigError

PROMPTS = [f"Row {i} says " + "hello " * (i % 3) for i in range(10)]
BAD = {3: "", 7: "word " * 200}  # empty; too long for max_seq_len=64


@pytest.fixture(scope="module")
def parquet_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "in"
    folder.mkdir()
    prompts = [BAD.get(i, p) for i, p in enumerate(PROMPTS)]
    table = pa.table({"id": list(range(len(prompts))), "prompt": prompts})
    pq.write_table(table, folder / "prompts.parquet")
    return folder


def test_parquet_job_through_ray_data(
    tiny_ckpt: Path, parquet_in: Path, tmp_path: Path, ray_runtime
) -> None:
    from mpllama.data import run_dataset

    yaml = tmp_path / "job.yaml"
    yaml.write_text(
        f"model: {{checkpoint_dir: {tiny_ckpt}}}\n"
        "parallel: {model_parallel_size: 1, replicas: 2, cpus_per_rank: 0.5}\n"
        "runtime: {max_seq_len: 64, max_batch_size: 4}\n"
        "sampling: {temperature: 0, max_tokens: 5, ignore_eos: true}\n"
        f"job: {{input: {parquet_in}, output: {tmp_path / 'out'}}}\n"
    )
    config = load_run_config(yaml)
    stats = run_dataset(config)
    assert stats["rows"] == len(PROMPTS) and stats["errors"] == len(BAD)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(len(PROMPTS)))  # every row, once
    by_id = {r["id"]: r for r in rows}
    good = [i for i in range(len(PROMPTS)) if i not in BAD]
    with LLM(tiny_ckpt, model_parallel_size=1, cpus_per_rank=0.5, max_seq_len=64) as llm:
        want = llm.generate([PROMPTS[i] for i in good], config.sampling)
    for i, out in zip(good, want, strict=True):
        row = by_id[i]
        assert row["generated_text"] == out.text
        assert row["completion_tokens"] == 5 and row["finish_reason"] == "length"
        assert row["prompt_tokens"] == len(out.prompt_token_ids)
        assert row["error"] is None
        assert row["prompt"] == PROMPTS[i]  # the input columns ride along
    assert "empty" in by_id[3]["error"] and by_id[3]["finish_reason"] == "error"
    assert "max_seq_len" in by_id[7]["error"] and by_id[7]["generated_text"] == ""
    assert stats["completion_tokens"] == 5 * len(good)
    # Run again into the same folder: Ray Data would add files beside the first run's,
    # every row twice; refused before any work.
    with pytest.raises(ConfigError, match=r"already holds \d+ Parquet file"):
        run_dataset(config)


def test_a_local_runtime_for_a_parquet_job_holds_its_ranks_and_ray_datas_tasks(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """Two 1-CPU ranks and Ray Data's read task: sized for a 2-core machine alone, the
    ranks took both CPUs and the read task waited for good."""
    from mpllama.data import cpus_needed

    yaml = tmp_path / "job.yaml"
    yaml.write_text(
        f"model: {{checkpoint_dir: {tiny_ckpt}}}\n"
        "parallel: {replicas: 2, cpus_per_rank: 1}\n"
        "job: {input: in.parquet, output: out}\n"
    )
    # tiny_ckpt: 2 shards; each gang's Completer actor takes 0.01
    assert cpus_needed(load_run_config(yaml)) == pytest.approx(2 * (2 * 1 + 0.01) + 1)


def test_completer_on_a_batch_with_dialogs(tiny_ckpt: Path, ray_runtime) -> None:
    """The map_batches class itself, on a numpy-style batch: prompts, chat dialogs and a
    dialog with a reserved tag, each row answered."""
    import numpy as np

    from mpllama.data import Completer

    completer = Completer(
        tiny_ckpt,
        model_parallel_size=1,
        cpus_per_rank=0.5,
        max_seq_len=64,
        max_tokens=3,
        temperature=0.0,
    )
    try:
        batch = {
            "prompt": np.array(["Hi there", None, None], dtype=object),
            "messages": np.array(
                [
                    None,
                    [{"role": "user", "content": "Hello"}],
                    [{"role": "user", "content": "[INST] sneaky"}],
                ],
                dtype=object,
            ),
        }
        out = completer(batch)
        assert list(out["finish_reason"]) == ["length", "length", "error"]
        assert "reserved" in out["error"][2] and out["error"][0] is None
        chat = completer.llm.chat(
            [{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=3)
        )
        assert out["generated_text"][1] == chat[0].text
    finally:
        completer.llm.close()
