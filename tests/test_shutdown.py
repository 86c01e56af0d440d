"""Stopping cleanly, whatever the signal reaches: real processes, real signals.

``mpllama serve`` stopped by SIGTERM to its whole process group (as a supervisor that
kills a process group does) or by Ctrl-C typed in its terminal exits 0 within 30 s, a
stream in flight running on for up to serve.drain_timeout_s while new requests are
refused;
``mpllama run`` stopped by SIGTERM to its group mid-run exits 143 in time and a rerun
resumes it; an ``LLM`` whose Ray processes are SIGKILLed raises a clear RuntimeLostError
within seconds instead of hanging until Ray kills the process. Each time, no process the
command started (Ray's GCS, raylet, workers, the ranks) and no /dev/shm file of
mpllama's is left behind.

Each scenario runs in a child process with a local Ray runtime of its own (started in a
session of its own, so its group and session are the child's alone).
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from helpers import wait_for

pytestmark = pytest.mark.own_ray

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
STOP_S = 30  # the most a stop may take, signal to exit
DRAIN_S = 2  # serve.drain_timeout_s in these tests
START_S = 150  # the most a child may take to come up on a busy 2-core machine


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local runtime
    env.pop("MPLLAMA_API_KEY", None)
    return {**env, "PYTHONUNBUFFERED": "1"}


class Watched:
    """A child process in a session of its own, its output, and every process it ever
    started (sampled until it exits: Ray's workers come and go)."""

    def __init__(self, args: list[str], cwd: Path, terminal: bool = False) -> None:
        self.output: list[str] = []
        self.seen: dict[int, psutil.Process] = {}
        self.shm_before = set(SHM.glob("mpllama-*"))
        self.master: int | None = None
        if terminal:
            # The child's controlling terminal is a pseudo-terminal whose master we hold:
            # it takes the terminal in its new session, then becomes `mpllama`.
            self.master, slave = pty.openpty()
            take_tty = (
                "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
            )
            args = [sys.executable, "-c", take_tty, *args[1:]]
            streams: dict[str, Any] = {"stdin": slave, "stdout": slave, "stderr": slave}
        else:
            streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=child_env(), start_new_session=True, **streams
        )
        if terminal:
            os.close(slave)
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._sample, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        if self.master is None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line.decode(errors="replace"))
            return
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end is gone
                return
            if not data:
                return
            self.output.append(data.decode(errors="replace"))

    def _sample(self) -> None:
        root = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            try:
                for p in root.children(recursive=True):
                    self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.1)

    @property
    def text(self) -> str:
        return "".join(self.output)

    def wait_for_output(self, needle: str, timeout: float = START_S) -> None:
        ok = wait_for(lambda: needle in self.text or self.proc.poll() is not None, timeout, 0.2)
        assert ok and needle in self.text, self.text[-4000:]

    def stop(self, send: Callable[[], None]) -> tuple[int, float]:
        """Send the stop; return the exit code and the seconds it took."""
        started = time.monotonic()
        send()
        try:
            code = self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_S}s after the stop:\n{self.text[-4000:]}")
        return code, time.monotonic() - started

    def left_behind(self) -> tuple[list[str], list[Path]]:
        """Processes of its group, session or tree still running, and its shm files."""
        alive = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["name"]):
            try:
                if self.proc.pid in (os.getsid(p.pid), os.getpgid(p.pid)):
                    if p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{p.pid} {p.info['name']} (its session)")
            except (OSError, psutil.Error):
                pass
        pids = {self.proc.pid, *self.seen}
        shm = [
            path
            for path in set(SHM.glob("mpllama-*")) - self.shm_before
            if int(path.name.split("-")[1]) in pids
        ]
        return alive, shm

    def assert_nothing_left(self) -> None:
        # Ray's workers notice their raylet is gone within a second or two.
        assert wait_for(lambda: self.left_behind() == ([], []), 10, 0.25), self.left_behind()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in self.seen.values():  # a failed test must not leave Ray behind either
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.master is not None:
            os.close(self.master)


def serve_args(ckpt: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mpllama.cli",
        "serve",
        str(REPO / "configs/serve/demo.yaml"),
        f"--set=model.checkpoint_dir={ckpt}",
        f"--set=serve.port={port}",
        "--set=parallel.model_parallel_size=2",  # two ranks: shm collectives
        "--set=parallel.cpus_per_rank=0.5",
        "--set=runtime.max_seq_len=2048",  # room for a stream that outlasts the drain
        f"--set=serve.drain_timeout_s={DRAIN_S}",
    ]


def completion(port: int, max_tokens: int = 4, stream: bool = False) -> Any:
    """The HTTP reply of one completion (a context manager; read it to the end)."""
    import urllib.request

    body = {"model": "tiny2", "prompt": "Hello", "max_tokens": max_tokens, "stream": stream}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({**body, "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(request, timeout=60)


class Stream(threading.Thread):
    """A long streamed completion, read on a thread: when each event came, and when and
    how the stream ended."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.times, self.ended, self.error = port, [], 0.0, None
        self.start()

    def run(self) -> None:
        try:
            with completion(self.port, max_tokens=2000, stream=True) as reply:
                for line in reply:
                    if line.startswith(b"data:"):
                        self.times.append(time.monotonic())
        except Exception as exc:  # a stream cut off when the drain ends
            self.error = exc
        self.ended = time.monotonic()


def refused(port: int) -> str:
    """What a new request gets while the server drains (never an answer)."""
    import urllib.error

    try:
        with completion(port) as reply:
            return f"answered {reply.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except OSError as exc:
        return f"refused: {exc}"


@pytest.mark.parametrize("how", ["sigterm-to-group", "ctrl-c-in-terminal"])
def test_serve_stops_cleanly(how: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    """The known bug: SIGTERM to the group reached Ray's GCS and raylet too, and the
    server hung 60 s deleting its application through them until Ray killed it."""
    port = free_port()
    terminal = how == "ctrl-c-in-terminal"
    child = Watched(serve_args(tiny_ckpt, port), tmp_path, terminal=terminal)
    try:
        child.wait_for_output("ready at")
        with completion(port) as reply:
            assert b'"text"' in reply.read()
        if terminal:
            code, seconds = child.stop(lambda: os.write(child.master, b"\x03"))
        else:
            # A stream in flight when the signal comes runs on while the server drains,
            # for up to serve.drain_timeout_s; a new request is refused meanwhile.
            stream = Stream(port)
            assert wait_for(lambda: len(stream.times) >= 3, 60, 0.01), stream.error
            signalled = time.monotonic()
            refusal: list[str] = []
            prober = threading.Timer(0.5, lambda: refusal.append(refused(port)))
            prober.start()
            code, seconds = child.stop(lambda: os.killpg(child.proc.pid, signal.SIGTERM))
            stream.join(10)
            prober.join(10)
            assert stream.ended and stream.ended - signalled < DRAIN_S + 2, stream.error
            assert stream.times[-1] > signalled + 0.5, "the stream was cut off at once"
            assert refusal and not refusal[0].startswith("answered"), refusal
        child.assert_nothing_left()
    finally:
        child.close()
    output = child.text
    assert code == 0, output[-4000:]
    assert "mpllama serve: shutting down" in output and "mpllama serve: stopped" in output
    assert "Failed to connect to GCS" not in output, output[-4000:]
    # The signal reached the server alone: its Ray did not die first (ray_session.py gives
    # Ray's processes a session of their own).
    assert "Ray runtime died" not in output, output[-4000:]
    print(f"{how}: stopped in {seconds:.1f}s")


def test_run_stopped_by_sigterm_to_its_group_resumes(
    tiny_ckpt: Path, tmp_path: Path, ray_runtime: Any
) -> None:
    from mpllama.config import load_run_config
    from mpllama.jobs import run_job

    rows = [{"id": i, "prompt": f"Item {i} of the list is"} for i in range(48)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {
        "model": {"checkpoint_dir": str(tiny_ckpt)},
        "parallel": {"model_parallel_size": 2, "cpus_per_rank": 0.5, "backend": "gloo"},
        "runtime": {"device": "cpu", "max_batch_size": 2, "max_seq_len": 64},
        "sampling": {"temperature": 0, "max_tokens": 16, "ignore_eos": True},
        "job": {"input": "in.jsonl", "output": "out.jsonl", "progress": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    out = tmp_path / "out.jsonl"
    child = Watched([sys.executable, "-m", "mpllama.cli", "run", str(path)], tmp_path)
    try:
        ok = wait_for(lambda: out.exists() and out.stat().st_size > 0, START_S, 0.01)
        assert ok, child.text[-4000:]
        code, seconds = child.stop(lambda: os.killpg(child.proc.pid, signal.SIGTERM))
        child.assert_nothing_left()
    finally:
        child.close()
    assert code == 128 + signal.SIGTERM, child.text[-4000:]
    assert "stopped by SIGTERM" in child.text and "run the job again" in child.text
    written = len(out.read_text().splitlines())
    assert 0 < written < len(rows), "the stop should land mid-run"

    summary = run_job(load_run_config(path))  # on the session's runtime
    assert summary.already_done == written and summary.completed == len(rows) - written
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == list(range(len(rows)))
    print(f"run: stopped in {seconds:.1f}s after {written} of {len(rows)} results")


LLM_CHILD = r"""
import sys
import time

import psutil

from mpllama import LLM, SamplingParams
from mpllama.errors import RuntimeLostError

SETTINGS = dict(cpus_per_rank=0.5, max_seq_len=64, max_batch_size=2, device="cpu")
LONG = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)

llm = LLM(sys.argv[1], **SETTINGS)
vital = [p for p in psutil.Process().children(recursive=True)
         if p.name() in ("gcs_server", "raylet")]
print("VITAL", *sorted(p.name() for p in vital), flush=True)
outputs = llm.stream([f"Prompt {i}" for i in range(40)], LONG)
next(outputs)
for p in vital:
    p.kill()
killed = time.monotonic()
try:
    for _ in outputs:
        pass
    print("NO ERROR", flush=True)
except RuntimeLostError as exc:
    print(f"RAISED {time.monotonic() - killed:.1f}s {exc}", flush=True)
try:
    llm.generate("Hello", LONG)
    print("NO ERROR AGAIN", flush=True)
except RuntimeLostError as exc:
    print(f"RAISED AGAIN {type(exc).__name__}", flush=True)
started = time.monotonic()
llm.close()
print(f"CLOSED {time.monotonic() - started:.1f}s", flush=True)
with LLM(sys.argv[1], **SETTINGS) as again:  # a fresh runtime
    print("AGAIN", len(again.generate("Hello", LONG)[0].token_ids), flush=True)
"""


def test_llm_whose_ray_is_killed_raises_at_once(tiny_ckpt: Path, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(LLM_CHILD)
    child = Watched([sys.executable, str(script), str(tiny_ckpt)], tmp_path)
    try:
        code = child.proc.wait(timeout=START_S)
        child.assert_nothing_left()
    finally:
        child.close()
    output = child.text
    assert code == 0, output[-4000:]
    assert "VITAL gcs_server raylet" in output, output[-4000:]
    raised = re.search(r"RAISED ([0-9.]+)s (.*)", output)
    assert raised, output[-4000:]
    assert float(raised.group(1)) < 5, output[-4000:]
    assert "Ray runtime" in raised.group(2) and "SIGKILL" in raised.group(2)
    assert "RAISED AGAIN RuntimeLostError" in output
    closed = re.search(r"CLOSED ([0-9.]+)s", output)
    assert closed and float(closed.group(1)) < 30, output[-4000:]
    assert "AGAIN 48" in output, output[-4000:]
    assert "Failed to connect to GCS" not in output, output[-4000:]
    print(f"llm: raised in {raised.group(1)}s, closed in {closed.group(1)}s")
