"""``mpllama chat`` driven through a pseudo-terminal, as a person would use it: a message
gets a streamed answer equal to what ``LLM.chat`` answers for the same conversation, the
next message carries the history, ``/reset`` forgets it, Ctrl-C (the terminal's ^C)
stops an answer without leaving, ``/exit`` leaves.
"""

from __future__ import annotations

import codecs
import os
import re
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mpllama import LLM, SamplingParams
from mpllama.chat import CUT, PROMPT, STOPPED, printable

pty = pytest.importorskip("pty", reason="needs a POSIX pseudo-terminal")

MAX_TOKENS = 200  # long enough (about a second) to be stopped halfway by ^C
SETTINGS = {"cpus_per_rank": 0.5, "max_seq_len": 1024, "max_batch_size": 2, "device": "cpu"}
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
# What the terminal adds: readline's control sequences, and \r before each \n.
_TERMINAL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Terminal:
    """A child process on a pseudo-terminal of its own (its controlling terminal, so ^C
    reaches it as SIGINT, as in a real one)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buffer = ""  # what the terminal showed, not yet consumed by expect()
        self.seen = ""  # everything, for failure messages
        self.status: int | None = None

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read until ``pattern`` shows; consume the text up to its end."""
        regex = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.buffer)
            if match:
                self.buffer = self.buffer[match.end() :]
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {pattern!r} within {timeout}s; screen:\n{self.seen}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # the child closed the terminal
            return False
        if not data:
            return False
        text = _TERMINAL.sub("", self.decoder.decode(data))
        self.buffer += text
        self.seen += text
        return True

    def wait_for_input(self, timeout: float = 10) -> None:
        """Wait until the child sleeps in readline's select() on the terminal, as it
        has long before a person presses a key. CPython's readline takes a signal
        only while in that select(): a ^C sent in the microseconds between the prompt
        being drawn and the select() starting waits for the next key."""
        wchan = Path(f"/proc/{self.pid}/wchan")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if any(w in wchan.read_text() for w in ("poll", "select")):
                    return
            except OSError:  # no /proc here: a person's reaction time will do
                break
            time.sleep(0.01)
        time.sleep(0.5)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None and time.monotonic() < deadline:
            self._read(0.2)  # keep the terminal drained
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        if self.status is None:
            raise AssertionError(f"still running after {timeout}s; screen:\n{self.seen}")
        return self.status

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path, ray_runtime: Any):
    with LLM(tiny_ckpt, **SETTINGS) as llm:
        yield lambda dialog: llm.chat(dialog, GREEDY)[0].text


def sigint_takers(pid: int) -> list[int]:
    """The threads of ``pid`` that do not block SIGINT (Linux's /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        pytest.skip("needs Linux's /proc to read thread signal masks")
    takers = []
    for task in tasks.iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended since the listing takes no signal
        blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        if not blocked & (1 << (signal.SIGINT - 1)):
            takers.append(int(task.name))
    return takers


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def answer(term: Terminal, message: str, marker: str = CUT) -> str:
    """Send ``message``; the answer the chat streamed back, up to its marker."""
    term.send(message + "\r")
    shown = term.expect(
        rf"{re.escape(message)}\n(.*) {re.escape(marker)}\n{re.escape(PROMPT)}", 120
    )
    return shown.group(1)


def test_chat_in_a_terminal(tiny_ckpt: Path, reference, ray_runtime: Any) -> None:
    address = ray_runtime.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "mpllama.cli", "chat", str(tiny_ckpt)]
    argv += ["--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
    argv += ["--set", "sampling.ignore_eos=true", "--set", f"parallel.ray_address={address}"]
    argv += ["--set", "runtime.max_seq_len=1024", "--set", "parallel.cpus_per_rank=0.5"]
    env = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8"}
    term = Terminal(argv, env)
    try:
        term.expect(re.escape(PROMPT), 120)
        # Ctrl-C at the prompt is seen only if the kernel gives SIGINT to the main
        # thread: every other thread must block it (which one gets it is luck).
        assert sigint_takers(term.pid) == [term.pid]

        # Each answer is what LLM.chat gives for the conversation so far.
        first = reference([user("Hello")])
        assert answer(term, "Hello") == printable(first)
        second = reference([user("Hello"), {"role": "assistant", "content": first}, user("Hello")])
        assert second != first  # the history changes the answer
        assert answer(term, "Hello") == printable(second)

        term.send("/reset\r")
        term.expect(rf"\(conversation cleared\)\n{re.escape(PROMPT)}", 10)
        assert answer(term, "Hello") == printable(first)

        # ^C while an answer streams stops it; the chat goes on.
        term.send("Tell me more\r")
        term.expect(r"Tell me more\n.", 60)  # the answer has begun
        term.send("\x03")
        term.expect(rf" {re.escape(STOPPED)}\n{re.escape(PROMPT)}", 10)
        # ^C at the prompt only reminds how to leave.
        term.wait_for_input()
        term.send("\x03")
        term.expect(rf"/exit.*\n{re.escape(PROMPT)}", 10)
        assert answer(term, "Thanks") != ""  # the gang still serves

        term.send("/exit\r")
        assert term.wait(60) == 0
    finally:
        term.close()


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no POSIX signal masks")
def test_threads_started_for_the_chat_leave_ctrl_c_to_the_main_thread() -> None:
    """Ray's and the engine's threads start inside this block: they must not take a
    SIGINT that the main thread, waiting in input(), would then never see."""
    from mpllama.chat import sigint_for_the_main_thread_only

    masks: list[set[signal.Signals]] = []

    def record() -> None:
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    with sigint_for_the_main_thread_only():
        inside = threading.Thread(target=record)
        inside.start()
        inside.join()
    outside = threading.Thread(target=record)
    outside.start()
    outside.join()
    assert signal.SIGINT in masks[0]
    assert signal.SIGINT not in masks[1]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_chat_on_a_llama3_checkpoint(tmp_path: Path, ray_runtime: Any) -> None:
    """A Llama 3 checkpoint (Meta's tiktoken tokenizer): the terminal chat with a system
    prompt answers what LLM.chat answers in the Llama 3 header format, and leaves."""
    from mpllama.offline.fixtures import init_llama3_checkpoint

    ckpt = init_llama3_checkpoint(tmp_path / "llama3", parts=1, seed=5)
    system = {"role": "system", "content": "Be brief."}
    greedy = SamplingParams(temperature=0, max_tokens=12)
    with LLM(ckpt, **SETTINGS) as llm:
        ids = llm.tokenizer.special_ids
        prompt = llm.tokenizer.encode_dialog([system, user("Hello")])
        assert prompt[:2] == [ids["<|begin_of_text|>"], ids["<|start_header_id|>"]]
        expected = llm.chat([[system, user("Hello")]], greedy)[0].text
    address = ray_runtime.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "mpllama.cli", "chat", str(ckpt), "--system", "Be brief."]
    argv += ["--max-tokens", "12", "--temperature", "0"]
    argv += ["--set", f"parallel.ray_address={address}", "--set", "parallel.cpus_per_rank=0.5"]
    argv += ["--set", "runtime.max_seq_len=1024", "--set", "runtime.max_batch_size=2"]
    env = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8"}
    term = Terminal(argv, env)
    try:
        term.expect(re.escape(PROMPT), 120)
        assert answer(term, "Hello") == printable(expected)
        term.send("/exit\r")
        assert term.wait(60) == 0
    finally:
        term.close()
