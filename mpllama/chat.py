"""The terminal side of ``mpllama chat``: a multi-turn conversation in the model's own
chat format (Llama 2's [INST] template, or Llama 3's header tokens, as the tokenizer
says), each answer streamed as it is made and ended at the model's stop tokens (Llama 3:
<|eot_id|>), as in Meta's chat example. CLI code (it prints and reads the terminal); the
model work is ``AsyncLLM``'s.

Ctrl-C stops the answer being written (its request is aborted, the gang serves on) and
keeps what was shown as the assistant's turn; at the prompt it does nothing but remind.
``/reset`` forgets the conversation, ``/exit`` or Ctrl-D leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from .errors import PromptError

PROMPT = ">>> "
STOPPED = "[stopped]"  # after an answer cut short by Ctrl-C
CUT = "[length limit]"  # after an answer that reached max_tokens or the context's end
HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"


@contextlib.contextmanager
def sigint_for_the_main_thread_only() -> Iterator[None]:
    """Threads started inside (numpy's OpenBLAS pool, Ray's, the engine's pump thread,
    and the threads they start) block SIGINT, so the kernel hands Ctrl-C to the main
    thread. Python runs signal handlers only there, and while it waits in input()
    (readline's select() on stdin) a SIGINT taken by another thread would go unseen
    until the next key press. Enter it before the imports that start threads."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (a random model writes them)
    become "?", line breaks and tabs stay."""
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


class Chat:
    """One conversation with ``llm`` (an AsyncLLM), on an event loop of its own."""

    def __init__(self, llm: Any, system: str | None = None, out: TextIO = sys.stdout) -> None:
        self.llm = llm
        self.params = llm.config.sampling
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict[str, str]] = []
        self.out = out
        self.loop = asyncio.new_event_loop()

    def run(self) -> None:
        """Read messages until /exit or end of input."""
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        self.say(f"mpllama chat: {HELP}.")
        try:
            while True:
                try:
                    line = input(PROMPT).strip()
                except EOFError:
                    self.say("")
                    return
                except KeyboardInterrupt:
                    self.say(f"\n({HELP})")
                    continue
                if line == "/exit":
                    return
                if line == "/reset":
                    self.history.clear()
                    self.say("(conversation cleared)")
                elif line.startswith("/"):
                    self.say(f"unknown command {line.split()[0]}; {HELP}")
                elif line:
                    self.turn(line)
        finally:
            self.loop.close()

    def turn(self, message: str) -> None:
        """Answer ``message`` given the conversation so far, streaming the answer."""
        user = {"role": "user", "content": message}
        pieces: list[str] = []
        try:
            ids = self.llm.tokenizer.encode_dialog([*self.system, *self.history, user])
        except PromptError as exc:  # e.g. a tag reserved for the chat template
            self.say(f"error: {exc}")
            return
        try:
            reason = self._answer(ids, pieces)
        except PromptError as exc:  # the conversation no longer fits the context
            self.say(f"error: {exc}; /reset clears the conversation")
            return
        marker = {"stopped": STOPPED, "length": CUT}.get(reason or "", "")
        self.say(f" {marker}" if marker else "")
        self.history += [user, {"role": "assistant", "content": "".join(pieces)}]

    def _answer(self, ids: list[int], pieces: list[str]) -> str | None:
        """Stream one answer into ``pieces``; its finish reason, or "stopped" (Ctrl-C)."""
        task = self.loop.create_task(self._stream(ids, pieces))
        try:
            # Ctrl-C cancels the answer's task (which aborts its request), not the chat.
            self.loop.add_signal_handler(signal.SIGINT, task.cancel)
            handler = True
        except (NotImplementedError, RuntimeError):  # no signal handlers here (Windows)
            handler = False
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            return "stopped"
        except KeyboardInterrupt:  # where no handler could be set: stop the same way
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                self.loop.run_until_complete(task)
            return "stopped"
        finally:
            if handler:
                self.loop.remove_signal_handler(signal.SIGINT)

    async def _stream(self, ids: list[int], pieces: list[str]) -> str | None:
        reason = None
        async for out in self.llm.generate(ids, self.params):
            if out.delta_text:
                pieces.append(out.delta_text)
                self.out.write(printable(out.delta_text))
                self.out.flush()
            reason = out.finish_reason
        return reason

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
