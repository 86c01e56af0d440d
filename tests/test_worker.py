"""RankWorker without Ray: a one-rank set-up, the step loop on its own thread fed
through submit/poll/abort/stop, and the rank in every log line."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mpllama import checkpoint
from mpllama.config import SamplingParams
from mpllama.protocol import Event, RankSpec, Request
from mpllama.rank import control_order, dist
from mpllama.rank.worker import RankWorker, configure_rank_logging
from mpllama.tokenizer import Tokenizer


def spec_for(ckpt: Path, world: int = 1) -> RankSpec:
    tok = Tokenizer(ckpt / "tokenizer.model")
    args = checkpoint.resolve_vocab(checkpoint.read_params(ckpt), tok.n_words)
    return RankSpec(
        checkpoint_dir=str(ckpt),
        args=args,
        tokenizer_proto=tok.model_proto,
        world_size=world,
        max_batch_size=2,
        max_seq_len=32,
    )


@contextlib.contextmanager
def looping(worker: RankWorker, name: str = "loop") -> Iterator[threading.Thread]:
    """The worker's step loop on a thread of its own (as Ray's loop group runs it), stopped
    and joined on the way out."""
    loop = threading.Thread(target=worker.run, name=name)
    loop.start()
    try:
        yield loop
    finally:
        worker.stop()
        loop.join(10)


def test_one_rank_worker_runs_its_loop_through_submit_and_poll(
    tiny_ckpts: dict[int, Path], single_rank: None
) -> None:
    worker = RankWorker(0, spec_for(tiny_ckpts[2]))  # 2 shards merged onto one rank
    info = worker.setup("127.0.0.1", 0, "127.0.0.1")
    # The spec's dtype is "auto": bf16 on a CPU with bf16 instructions, else float32.
    auto = str(dist.resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert (info["device"], info["dtype"], info["backend"]) == ("cpu", auto, "gloo")
    with looping(worker) as loop:
        ids = worker.tokenizer.encode("Hello", bos=True, eos=False)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        long = params.replace(max_tokens=25)
        # Two slots, three requests: the third waits for a slot, then runs like the first.
        worker.submit([Request(str(i), ids, params) for i in range(3)] + [Request("x", ids, long)])
        events: list[Event] = []
        finished: set[str] = set()
        while len(finished) < 3:
            for step in worker.poll(5.0).steps:
                events += step
                finished |= {e.id for e in step if e.finish_reason}
        worker.abort(["x"])
        while "x" not in finished:
            for step in worker.poll(5.0).steps:
                events += step
                finished |= {e.id for e in step if e.finish_reason}
        tokens = {i: [t for e in events if e.id == i for t in e.token_ids] for i in "012"}
        assert all(len(t) == 3 for t in tokens.values())
        assert tokens["0"] == tokens["2"]
        (aborted,) = [e for e in events if e.id == "x" and e.finish_reason]
        assert aborted.finish_reason == "abort"
        assert aborted.token_offset < 25
    assert not loop.is_alive()
    assert worker.memory()["peak_rss_mb"] > 0


def test_a_ranks_torch_work_all_runs_on_one_thread(
    tiny_ckpts: dict[int, Path], single_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set-up and the loop are called on different threads (as Ray's concurrency groups
    do), yet loading, placing and every forward run on the rank's own torch thread: a
    second OpenMP team would cost a fifth of the step rate (see worker.py)."""
    from mpllama.rank import model, rank_setup

    seen: list[str] = []

    def on_thread(fn):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(f"{fn.__name__} on {threading.current_thread().name}")
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(
        rank_setup.weights, "load_rank_state", on_thread(rank_setup.weights.load_rank_state)
    )
    monkeypatch.setattr(rank_setup, "materialize", on_thread(rank_setup.materialize))
    monkeypatch.setattr(
        model.Transformer, "setup_caches", on_thread(model.Transformer.setup_caches)
    )
    monkeypatch.setattr(model.Transformer, "forward", on_thread(model.Transformer.forward))
    worker = RankWorker(0, spec_for(tiny_ckpts[1]))
    worker.setup("127.0.0.1", 0, "127.0.0.1")
    with looping(worker, "the caller's loop thread"):
        ids = worker.tokenizer.encode("Hello", bos=True, eos=False)
        worker.submit([Request("a", ids, SamplingParams(temperature=0, max_tokens=2))])
        while not any(e.finish_reason for step in worker.poll(5.0).steps for e in step):
            pass
    assert {call.split(" on ")[0] for call in seen} == {
        "load_rank_state",
        "materialize",
        "setup_caches",
        "forward",
    }
    assert {call.split(" on ")[1] for call in seen} == {"mpllama-rank0"}


def test_poll_carries_the_schedulers_counts(tiny_ckpts: dict[int, Path], single_rank: None) -> None:
    spec = dataclasses.replace(spec_for(tiny_ckpts[1]), max_seq_len=512)
    worker = RankWorker(0, spec)  # two slots
    worker.setup("127.0.0.1", 0, "127.0.0.1")
    with looping(worker):
        ids = worker.tokenizer.encode("Hello", bos=True, eos=False)
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        worker.submit([Request(str(i), ids, long) for i in range(4)])
        polled = worker.poll(5.0)
        while not polled.steps:
            polled = worker.poll(5.0)
        # Hundreds of steps before anything finishes: two requests hold the slots and two
        # wait, whenever the poll came.
        assert (polled.running, polled.waiting) == (2, 2)
        worker.abort([str(i) for i in range(4)])
        deadline = time.monotonic() + 10
        while (polled.running, polled.waiting) != (0, 0) and time.monotonic() < deadline:
            polled = worker.poll(1.0)
        assert (polled.running, polled.waiting) == (0, 0)


def test_numbered_control_calls_are_taken_in_their_callers_order(
    tiny_ckpts: dict[int, Path], single_rank: None
) -> None:
    """Ray runs the rank actor's calls as they arrive (gang.py), so an abort may reach the
    lead before the submit it follows: numbered by the engine, it waits for the submit,
    and the request is aborted, not run to its end. Unnumbered calls are taken at once."""
    worker = RankWorker(0, spec_for(tiny_ckpts[1]))
    worker.setup("127.0.0.1", 0, "127.0.0.1")
    with looping(worker):
        ids = worker.tokenizer.encode("Hello", bos=True, eos=False)
        long = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
        worker.abort(["x"], order=1)  # arrives first
        worker.submit([Request("y", ids, long)], order=2)
        assert worker.poll(0.3).steps == []  # both wait for call 0
        worker.submit([Request("x", ids, long)], order=0)
        finished: dict[str, Event] = {}
        deadline = time.monotonic() + 20
        while len(finished) < 2 and time.monotonic() < deadline:
            for step in worker.poll(1.0).steps:
                finished |= {e.id: e for e in step if e.finish_reason}
        assert finished["x"].finish_reason == "abort"
        assert finished["y"].finish_reason == "length"


def test_a_control_call_that_never_comes_stops_the_gang_only_for_a_while(
    tiny_ckpts: dict[int, Path], single_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A numbered call Ray lost (or cancelled) must not hold the later ones for good: past
    CONTROL_GAP_S they are taken, and the lost one when it comes after all."""
    monkeypatch.setattr(control_order, "CONTROL_GAP_S", 0.5)
    worker = RankWorker(0, spec_for(tiny_ckpts[1]))
    worker.setup("127.0.0.1", 0, "127.0.0.1")
    with looping(worker):
        ids = worker.tokenizer.encode("Hello", bos=True, eos=False)
        short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        worker.submit([Request("y", ids, short)], order=1)  # call 0 never comes
        assert worker.poll(0.2).steps == []  # waits for it a while
        finished: dict[str, Event] = {}
        deadline = time.monotonic() + 20
        while "y" not in finished and time.monotonic() < deadline:
            for step in worker.poll(1.0).steps:
                finished |= {e.id: e for e in step if e.finish_reason}
        assert finished["y"].finish_reason == "length"
        monkeypatch.setattr(control_order, "CONTROL_GAP_S", 60.0)  # no more passing over
        worker.submit([Request("x", ids, short)], order=0)  # late: taken at once
        worker.submit([Request("z", ids, short)], order=2)  # the order goes on
        deadline = time.monotonic() + 20
        while len(finished) < 3 and time.monotonic() < deadline:
            for step in worker.poll(1.0).steps:
                finished |= {e.id: e for e in step if e.finish_reason}
        assert {finished[i].finish_reason for i in "xz"} == {"length"}


def test_run_before_setup_is_an_error(tiny_ckpt: Path) -> None:
    worker = RankWorker(0, spec_for(tiny_ckpt))
    with pytest.raises(RuntimeError, match="before setup"):
        worker.run()


def test_rank_logging_puts_the_rank_in_every_line(capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before_handlers, before_level = list(root.handlers), root.level
    try:
        configure_rank_logging(3)
        configure_rank_logging(3)  # idempotent: one handler, not two
        logging.getLogger("mpllama.test").info("hello from a rank")
        lines = [ln for ln in capfd.readouterr().err.splitlines() if "hello from" in ln]
        assert len(lines) == 1 and lines[0].startswith("[rank 3] ")
    finally:
        root.handlers[:] = before_handlers
        root.setLevel(before_level)


def test_a_poll_holds_stream_continuations_briefly_but_never_a_first_or_last_token(
    tiny_ckpts: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens that only continue a stream wait up to ``LINGER_S`` for the next steps'
    (one Ray call carries several steps); a first token, a finish or an error goes at
    once; and the poll thread is woken only by what is due sooner than what it holds."""
    from mpllama.rank import worker as worker_module

    monkeypatch.setattr(worker_module, "LINGER_S", 0.3)
    worker = RankWorker(0, spec_for(tiny_ckpts[1]))
    wakes = []
    notify = worker._cond.notify_all
    monkeypatch.setattr(worker._cond, "notify_all", lambda: wakes.append(1) or notify())

    def step(offset: int, finish: str | None = None) -> list[Event]:
        return [Event("a", [7], None, "x", offset, offset, finish)]

    def later(steps: list[list[Event]], after_s: float) -> threading.Thread:
        def publish() -> None:
            for events in steps:
                time.sleep(after_s)
                with worker._cond:
                    worker._publish(events)

        thread = threading.Thread(target=publish)
        thread.start()
        return thread

    joiner = later([step(3), step(4), step(5)], 0.02)
    started = time.monotonic()
    polled = worker.poll(1.0)
    joiner.join()
    assert [s[0].token_offset for s in polled.steps] == [3, 4, 5]  # the next steps joined
    assert 0.29 < time.monotonic() - started < 3
    assert len(wakes) == 1  # by the first continuation only: the others were due later
    for first_or_last in (step(0), step(9, "stop")):
        joiner = later([step(5), first_or_last], 0.05)
        started = time.monotonic()
        polled = worker.poll(1.0)
        joiner.join()
        assert len(polled.steps) == 2
        assert time.monotonic() - started < 0.25  # answered as soon as it came


def test_a_poll_holds_the_tokens_of_requests_nobody_streams_longer(
    tiny_ckpts: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request submitted with ``stream`` False (``LLM.generate``): even its first
    tokens wait up to ``FINAL_HOLD_S``, so one Ray reply carries many steps; its finish
    still goes at once, and a streamed request's tokens keep their own, shorter hold."""
    from mpllama.rank import worker as worker_module

    monkeypatch.setattr(worker_module, "LINGER_S", 0.05)
    monkeypatch.setattr(worker_module, "FINAL_HOLD_S", 0.6)
    worker = RankWorker(0, spec_for(tiny_ckpts[1]))
    worker.submit([Request("quiet", [1, 5], SamplingParams(), stream=False)], order=0)

    def publish(*events: Event) -> None:
        with worker._cond:
            worker._publish(list(events))

    publish(Event("quiet", [7], None, "x", 0, 0))  # a first token, not streamed
    started = time.monotonic()
    assert len(worker.poll(1.0).steps) == 1
    assert 0.55 < time.monotonic() - started < 3
    publish(Event("quiet", [7], None, "x", 1, 1))
    publish(Event("loud", [7], None, "x", 4, 4))  # a streamed continuation
    started = time.monotonic()
    assert len(worker.poll(1.0).steps) == 2
    assert 0.04 < time.monotonic() - started < 0.4
    publish(Event("quiet", [7], None, "x", 2, 2, "length"))
    started = time.monotonic()
    assert len(worker.poll(1.0).steps) == 1
    assert time.monotonic() - started < 0.25
    assert "quiet" not in worker._unstreamed  # finished: forgotten
