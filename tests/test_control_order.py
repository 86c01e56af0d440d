"""ControlOrder: the lead's numbered control calls taken in the engine's order, a missing
one passed over after CONTROL_GAP_S and taken late when it comes."""

from __future__ import annotations

import pytest

from mpllama.rank import control_order
from mpllama.rank.control_order import ControlOrder


def test_calls_are_taken_in_their_numbers_order() -> None:
    order: ControlOrder[str] = ControlOrder()
    assert order.arrive(1, "b") == []  # waits for 0
    assert order.arrive(2, "c") == []
    assert order.arrive(0, "a") == ["a", "b", "c"]
    assert order.arrive(3, "d") == ["d"]
    assert order.arrive(None, "now") == ["now"]  # unnumbered: at once
    assert order.overdue() == [] and order.wait(7.0) == 7.0  # nothing waits


def test_a_missing_call_is_passed_over_after_the_gap_and_taken_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(control_order.time, "monotonic", lambda: now[0])
    order: ControlOrder[str] = ControlOrder()
    assert order.arrive(2, "c") == [] and order.arrive(3, "d") == []  # 0 and 1 missing
    assert order.wait(60.0) == control_order.CONTROL_GAP_S  # wake when the gap is up
    now[0] += control_order.CONTROL_GAP_S - 1
    assert order.overdue() == [] and order.wait(60.0) == 1.0
    now[0] += 1
    assert order.overdue() == ["c", "d"]
    assert order.wait(60.0) == 60.0  # nothing waits any more
    assert order.arrive(0, "a") == ["a"]  # late ones are taken at once
    assert order.arrive(5, "f") == []  # the numbering goes on after 3: 4 is due next
    assert order.arrive(4, "e") == ["e", "f"]
