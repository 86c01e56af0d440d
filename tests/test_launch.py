"""launch/: the cluster-launcher YAML passes Ray's own validation (offline), submit.py
builds the right `mpllama run` call, and `ray job submit` runs the tiny job on a real
local head node."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def test_cluster_yaml_passes_ray_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "launch" / "cluster.yaml").read_text())
    config = prepare_config(raw)  # the local provider's defaults ship with Ray: no network
    validate_config(config)
    assert config["provider"]["type"] == "local"
    assert any("mpllama[cluster]" in cmd for cmd in config["setup_commands"])
    assert config["available_node_types"]["local.cluster.node"]["max_workers"] == len(
        raw["provider"]["worker_ips"]
    )


def test_submit_script_joins_the_cluster() -> None:
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import submit
    finally:
        sys.path.remove(str(ROOT / "launch"))
    argv = submit.build_argv(["configs/jobs/demo.yaml", "--set", "runtime.seed=3"])
    assert argv == [
        "run",
        "configs/jobs/demo.yaml",
        "--set",
        "parallel.ray_address=auto",
        "--set",
        "runtime.seed=3",
    ]
    mine = ["x.yaml", "--set", "parallel.ray_address=10.0.0.1:6379"]
    assert submit.build_argv(mine) == ["run", *mine]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "submit.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "mpllama run" in proc.stdout


def stop_head(temp_dir: str) -> None:
    """End the processes of this head only: `ray stop` would kill every Ray runtime on
    the machine, the test session's own included."""
    import psutil

    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in ours:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.own_ray
def test_ray_job_submit_runs_the_job(tmp_path: Path, tiny_ckpt: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    rows = [{"id": i, "prompt": f"Prompt number {i}"} for i in range(6)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(
        yaml.safe_dump(
            {
                "model": {"checkpoint_dir": str(tiny_ckpt)},
                "parallel": {"model_parallel_size": 2, "cpus_per_rank": 0.5, "backend": "gloo"},
                "runtime": {"device": "cpu", "max_batch_size": 4, "max_seq_len": 64},
                "sampling": {"temperature": 0, "max_tokens": 4},
                "job": {"input": "in.jsonl", "output": "results.jsonl"},
            }
        )
    )
    # A short temp dir (Ray's socket paths must stay under ~107 bytes) of the head's own,
    # so the test process's shared runtime never sees this head (no RAY_ADDRESS here).
    temp_dir = tempfile.mkdtemp(prefix="mpl", dir="/tmp")
    dash = free_port()
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        f"--port={free_port()}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=4",
        "--num-gpus=0",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        start = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        client = None
        deadline = time.monotonic() + 60
        while client is None:  # the job server comes up a moment after `ray start` returns
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        entry = f"{shlex.quote(str(VENV_BIN / 'mpllama'))} run {shlex.quote(str(job_yaml))}"
        job_id = client.submit_job(entrypoint=entry)
        deadline = time.monotonic() + 180
        while (status := client.get_job_status(job_id)) not in {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.STOPPED,
        }:
            assert time.monotonic() < deadline, "job did not finish in 180 s"
            time.sleep(1)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert "results:" in logs and "6 request(s)" in logs
        out = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in out) == list(range(6))
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
