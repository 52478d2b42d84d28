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


# --- connections ----------------------------------------------------------------------------------


class _Conn:
    """A stand-in libvirt connection that counts the migration calls running on it at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.running = 0
        self.most = 0
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_each_running_migration_has_a_source_connection_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirtd serves few calls at once per connection and a migration call holds one for its whole
    job: running migrations that shared the evacuation's source connection would hold back every other
    call on it (the gate's release, statistics, aborts). So each gets its own, closed after."""
    import threading

    from orchestrator.core.policy_toml import parse_policy
    from orchestrator.flows import evacuation as evac

    opened: list[_Conn] = []
    shared, destination = _Conn("shared"), _Conn("destination")
    all_in = threading.Barrier(4, timeout=30)  # all four running at once, as they would share one

    def open_host(uri: str) -> _Conn:
        conn = _Conn(f"{uri}#{len(opened)}")
        opened.append(conn)
        return conn

    class FakeMigration:
        def __init__(self, request: object, source: _Conn, dest: _Conn, **_: object) -> None:
            self.request, self.source = request, source

        def run(self) -> Report:
            self.source.running += 1
            self.source.most = max(self.source.most, self.source.running)
            all_in.wait()
            self.source.running -= 1
            assert not self.source.closed
            return Report("id", "vm", "a", "b", "default", outcome=Outcome.SUCCEEDED)

    monkeypatch.setattr(evac.Evacuation, "open_host", staticmethod(open_host))
    monkeypatch.setattr(evac, "Migration", FakeMigration)
    policy = parse_policy("", "p.toml")
    run = evac.Evacuation(evac.EvacuationRequest("qemu:///src", ("qemu:///dst",), policy, concurrency=4))
    results = [evac.Result(f"vm{i}", "qemu:///dst", "failed", False) for i in range(4)]
    threads = [
        threading.Thread(
            target=run._migrate_with_retries,
            args=(evac.Placement(f"vm{i}", "qemu:///dst", 64, i, "fits"), shared, destination, results[i]),
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.outcome for r in results] == ["succeeded"] * 4
    assert shared.most == 0 and len(opened) == 4
    assert all(c.most == 1 and c.closed for c in opened)
