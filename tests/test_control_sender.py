"""The engine's control calls to a gang's lead (mpllama/control_sender.py): numbered from
0 per lead, made in that order from the sender's own thread, and dropped once closed."""

from __future__ import annotations

import threading

from helpers import wait_for

from mpllama.control_sender import ControlSender


class FakeLead:
    """Records each ``<method>.remote(payload, number)`` and the thread that made it; a
    call may be held until ``go`` is set."""

    def __init__(self, go: threading.Event | None = None) -> None:
        self.calls: list[tuple[str, object, int, str]] = []
        self.go = go

    def __getattr__(self, method: str):
        lead = self

        class Method:
            @staticmethod
            def remote(payload: object, number: int) -> None:
                if lead.go is not None:
                    lead.go.wait(5)
                lead.calls.append((method, payload, number, threading.current_thread().name))

        return Method


def test_calls_are_numbered_per_lead_and_made_in_order_off_the_callers_thread() -> None:
    sender, first, second = ControlSender(), FakeLead(), FakeLead()
    try:
        sender.send(first, "submit", ["a"])
        sender.send(first, "abort", ["a"])
        sender.new_lead()  # a rebuilt gang: its lead counts from 0
        sender.send(second, "submit", ["b"])
        assert wait_for(lambda: len(first.calls) == 2 and len(second.calls) == 1, 5)
        assert [c[:3] for c in first.calls] == [("submit", ["a"], 0), ("abort", ["a"], 1)]
        assert [c[:3] for c in second.calls] == [("submit", ["b"], 0)]
        caller = threading.current_thread().name
        assert {c[3] for c in first.calls + second.calls} == {"mpllama-engine-control"} != {caller}
    finally:
        sender.close()


def test_closing_drops_what_is_still_queued_and_ends_the_thread() -> None:
    go = threading.Event()
    sender, lead = ControlSender(), FakeLead(go)
    sender.send(lead, "submit", ["taken"])  # the thread takes it and waits on go
    assert wait_for(lambda: sender._outbox.empty(), 5)
    sender.send(lead, "submit", ["dropped"])
    sender.close()
    go.set()
    sender._thread.join(5)
    assert not sender._thread.is_alive()
    assert [c[1] for c in lead.calls] == [["taken"]]


def test_a_failing_call_is_logged_and_the_next_one_still_made(caplog) -> None:
    class Dead:
        def __getattr__(self, method: str):
            raise RuntimeError("the actor died")

    sender, lead = ControlSender(), FakeLead()
    try:
        sender.send(Dead(), "abort", ["x"])
        sender.send(lead, "submit", ["y"])
        assert wait_for(lambda: len(lead.calls) == 1, 5)
        assert lead.calls[0][:3] == ("submit", ["y"], 1)
        assert "the abort call to the lead failed: the actor died" in caplog.text
    finally:
        sender.close()
