"""Ray Data: completions over datasets too big for one driver (Parquet or JSONL files on
shared or object storage).

``Completer`` is a callable class for ``Dataset.map_batches``; each of its actors owns one
model-parallel gang in a placement group of its own, so ``concurrency=N`` runs N gangs.
A row holds a prompt (or a chat dialog) and comes back with the completion columns
added. A row that cannot run gets an ``error`` and never fails the dataset::

    ds = ray.data.read_parquet("s3://bucket/prompts/")
    ds = ds.map_batches(
        Completer,
        concurrency=4,
        batch_size=64,
        num_cpus=0.1,  # the actor only drives; its ranks take their own CPUs
        fn_constructor_kwargs={"checkpoint_dir": "/models/llama-2-7b", "max_tokens": 128},
    )
    ds.write_parquet("s3://bucket/completions/")

``run_dataset`` does exactly that for a YAML job whose input is Parquet
(``mpllama run configs/jobs/parquet.yaml``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from . import checkpoint, ray_session
from .config import RunConfig, SamplingParams, load_run_config, ray_address_from_env
from .errors import ConfigError
from .protocol import derive_seed

log = logging.getLogger(__name__)

# What a completed row gains.
OUTPUT_COLUMNS = ("generated_text", "prompt_tokens", "completion_tokens", "finish_reason", "error")


class Completer:
    """Turns batches of rows into the same rows plus completion columns.

    ``Completer(checkpoint_dir=None, config=None, prompt_column="prompt",
    messages_column="messages", id_column="id", **settings)``: ``config`` is a YAML job
    file (its model, parallel, runtime and sampling sections); ``settings`` are any LLM
    setting or SamplingParams field (those override the YAML's sampling section).
    Seeds come from the ``id`` column when there is one, else the prompt text, so a rerun
    samples alike.
    """

    def __init__(
        self,
        checkpoint_dir: str | None = None,
        config: str | RunConfig | None = None,
        prompt_column: str = "prompt",
        messages_column: str = "messages",
        id_column: str = "id",
        **settings: Any,
    ) -> None:
        from .api import LLM

        run = load_run_config(config) if isinstance(config, (str, Path)) else config
        run = run or RunConfig()
        sampling_fields = {f.name for f in dataclasses.fields(SamplingParams)}
        overrides = {k: v for k, v in settings.items() if k in sampling_fields}
        self.params = run.sampling.replace(**overrides)
        rest = {k: v for k, v in settings.items() if k not in sampling_fields}
        # Each Completer is one gang: replicas come from the dataset's concurrency.
        rest["replicas"] = 1
        self.llm = LLM(checkpoint_dir, config=run, **rest)
        self.prompt_column = prompt_column
        self.messages_column = messages_column
        self.id_column = id_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = _rows(batch)
        ids: list[list[int] | str] = []
        for row in rows:
            try:
                ids.append(self._encode(row))
            except (TypeError, ValueError) as exc:
                ids.append(str(exc))
        params = [self._params(row) for row in rows]
        runnable = [i for i, x in enumerate(ids) if not isinstance(x, str)]
        outputs = self.llm.generate(
            prompt_token_ids=[ids[i] for i in runnable],
            sampling_params=[params[i] for i in runnable],
            errors="return",
        )
        done = dict(zip(runnable, outputs, strict=True))
        columns: dict[str, list[Any]] = {c: [] for c in OUTPUT_COLUMNS}
        for i, row_ids in enumerate(ids):
            out = done.get(i)
            failed = out is None or out.finish_reason == "error"
            error = row_ids if isinstance(row_ids, str) else (out.error if out else None)
            columns["generated_text"].append("" if failed else out.text)
            columns["prompt_tokens"].append(0 if isinstance(row_ids, str) else len(row_ids))
            columns["completion_tokens"].append(0 if failed else len(out.token_ids))
            columns["finish_reason"].append("error" if failed else out.finish_reason)
            columns["error"].append(error if failed else None)
        return {**batch, **columns}

    def _encode(self, row: dict[str, Any]) -> list[int]:
        messages = row.get(self.messages_column)
        if messages is not None:
            return self.llm.tokenizer.encode_dialog(_dialog(messages))
        prompt = row.get(self.prompt_column)
        if prompt is None:
            raise ValueError(f"the row has neither {self.prompt_column!r} nor a dialog")
        return self.llm.prompts.encode(prompt)

    def _params(self, row: dict[str, Any]) -> SamplingParams:
        if self.params.seed is not None:
            return self.params
        key = row.get(self.id_column)
        key = key if key is not None else row.get(self.prompt_column)
        return self.params.replace(seed=derive_seed(self.llm.config.runtime.seed, str(key)))

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A numpy/pandas-style batch (column -> array) as a list of plain rows."""
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{name: _plain(batch[name][i]) for name in names} for i in range(n)]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (what Parquet lists become) as Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _dialog(messages: Any) -> list[Any]:
    if isinstance(messages, str):
        import json

        messages = json.loads(messages)
    return [dict(m) if isinstance(m, dict) else m for m in messages]


# What a Completer actor itself reserves: it only waits on its gang, whose ranks hold theirs.
COMPLETER_CPUS = 0.01


def cpus_needed(config: RunConfig) -> float:
    """CPUs a local runtime needs for a Parquet job: every gang's ranks and Completer
    actor, and a whole one besides for Ray Data's own read and write tasks. Sized for the
    machine alone, two 1-CPU ranks took both CPUs of a 2-core machine and the read task
    waited for good (the shipped configs/jobs/parquet.yaml hung there)."""
    world = config.parallel.model_parallel_size or len(
        checkpoint.find_shards(config.model.checkpoint_dir)
    )
    gang = world * (config.parallel.cpus_per_rank or 1) + COMPLETER_CPUS
    return int(config.parallel.replicas) * gang + 1


def run_dataset(config: RunConfig) -> dict[str, Any]:
    """A YAML job over a Parquet dataset: read ``job.input``, complete every row on
    ``parallel.replicas`` gangs, write Parquet files to ``job.output`` (a folder)."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401 - registers pa.compute
    import ray

    job = config.job
    if not job.input or not job.output:
        raise ConfigError("a Parquet job needs job.input and job.output (a folder)")
    replicas = config.parallel.replicas
    if replicas == "auto":
        raise ConfigError(
            "replicas: auto is not supported for Parquet jobs: Ray Data needs the number "
            "of gangs up front; give parallel.replicas a number"
        )
    out = Path(job.output)
    earlier = sorted(out.glob("*.parquet")) if out.is_dir() else []
    if earlier:  # Ray Data adds files beside them: every row would be there twice
        raise ConfigError(
            f"job.output {out} already holds {len(earlier)} Parquet file(s) of an earlier "
            "run; move them away or name another folder"
        )
    started = time.perf_counter()
    # As LLM does: the configured cluster, $RAY_ADDRESS, or a local Ray of our own, started
    # on a thread that outlives it (ray_session.py).
    address = config.parallel.ray_address or ray_address_from_env()
    hold = ray_session.acquire(address, ray_session.local_cpus(cpus_needed(config)))
    try:
        # Several blocks per gang, so every gang gets work even from a single file.
        ds = ray.data.read_parquet(job.input).repartition(int(replicas) * 4)
        ds = ds.map_batches(
            Completer,
            concurrency=int(replicas),
            batch_size=max(1, config.runtime.max_batch_size * 4),
            num_cpus=COMPLETER_CPUS,
            fn_constructor_kwargs={"config": config},
        )
        Path(job.output).mkdir(parents=True, exist_ok=True)
        ds.write_parquet(job.output)
        rows = errors = tokens = 0
        written = ray.data.read_parquet(job.output).select_columns(["error", "completion_tokens"])
        for batch in written.iter_batches(batch_format="pyarrow"):
            rows += batch.num_rows
            errors += batch.num_rows - batch["error"].null_count
            tokens += int(pa.compute.sum(batch["completion_tokens"]).as_py() or 0)
    finally:
        hold.release()
    return {
        "rows": rows,
        "errors": errors,
        "completion_tokens": tokens,
        "wall_s": round(time.perf_counter() - started, 2),
        "output": job.output,
    }
