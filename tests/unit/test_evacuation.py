"""Placement and selection: pure, table-driven."""

from __future__ import annotations

import pytest

from orchestrator.core.report import Outcome, Report
from orchestrator.flows.evacuation import Candidate, Target, is_transient, place, select


@pytest.mark.parametrize(
    ("vms", "targets", "reserve", "expected", "unplaced"),
    [
        # biggest first, each to the most free: spreads
        ([("a", 4), ("b", 3), ("c", 2)], [("x", 10), ("y", 9)], 0, {"a": "x", "b": "y", "c": "x"}, []),
        # equal free memory: the first destination given wins the tie
        ([("a", 1)], [("x", 5), ("y", 5)], 0, {"a": "x"}, []),
        # the one that fits nowhere is reported, the others placed
        ([("big", 20), ("s", 1)], [("x", 10), ("y", 8)], 0, {"s": "x"}, ["big"]),
        # the reserve counts against every destination
        ([("a", 3)], [("x", 4)], 2, {}, ["a"]),
        # exactly fits
        ([("a", 4)], [("x", 4)], 0, {"a": "x"}, []),
        # no destination at all
        ([("a", 1)], [], 0, {}, ["a"]),
        # fills one host then uses the other
        ([("a", 5), ("b", 5), ("c", 5)], [("x", 10), ("y", 5)], 0, {"a": "x", "b": "x", "c": "y"}, []),
    ],
)
def test_place(vms, targets, reserve, expected, unplaced) -> None:
    plan = place([Candidate(n, m) for n, m in vms], [Target(u, f) for u, f in targets], reserve)
    assert {p.domain: p.destination for p in plan.placements} == expected
    assert [u.domain for u in plan.unplaced] == unplaced
    assert [p.order for p in plan.placements] == list(range(1, len(expected) + 1))
    for u in plan.unplaced:
        assert "needs" in u.reason


def test_place_orders_running_before_definitions_and_definitions_need_no_memory() -> None:
    plan = place([Candidate("off", 100, running=False), Candidate("on", 1)], [Target("x", 2)])
    assert [(p.domain, p.running) for p in plan.placements] == [("on", True), ("off", False)]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ((), (), ["db1", "db2", "web1"]),
        (("db*",), (), ["db1", "db2"]),
        (("db*",), ("db2",), ["db1"]),
        ((), ("*1",), ["db2"]),
        (("nothing*",), (), []),
        (("DB*",), (), []),  # case-sensitive, like libvirt names
    ],
)
def test_select(include, exclude, expected) -> None:
    assert select(["db1", "db2", "web1"], include, exclude) == expected


@pytest.mark.parametrize(
    ("outcome", "error", "undrain_failed", "transient"),
    [
        (Outcome.ROLLED_BACK, "migration failed: Connection reset by peer", False, True),
        (Outcome.ROLLED_BACK, "Timed out during operation: cannot acquire state change lock", False, True),
        (Outcome.ROLLED_BACK, "Connection reset by peer", True, False),  # something still needs an admin
        (Outcome.ROLLED_BACK, "unsupported configuration: x", False, False),
        (Outcome.ABORTED, "Connection reset", False, False),  # a hook said stop: not retried
        (Outcome.SUCCEEDED, None, False, False),
    ],
)
def test_is_transient(outcome, error, undrain_failed, transient) -> None:
    report = Report("id", "vm", "a", "b", "p", outcome=outcome, error=error, undrain_failed=undrain_failed)
    assert is_transient(report) is transient
