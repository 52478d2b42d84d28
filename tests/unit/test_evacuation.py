"""Placement, selection and switchover groups: pure, table-driven; and an evacuation with a group, on
stand-ins for libvirt."""

from __future__ import annotations

import time

import pytest

from orchestrator.core import domxml
from orchestrator.core.group_report import GroupMember, GroupReport
from orchestrator.core.hypervisor import DomainInfo
from orchestrator.core.policy import DrainMode, EvacuationGroup, GroupBy
from orchestrator.core.report import Outcome, Report
from orchestrator.flows.evacuation import Candidate, Target, is_transient, place, select
from orchestrator.flows.evacuation_groups import Unit, assign_labels, group_placements, next_unit
from orchestrator.flows.evacuation_plan import Placement, Plan, Unplaced


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


# --- switchover groups: which VMs move together, and when a group starts ---------------------------


def placed(domain: str, destination: str = "x", order: int = 1, running: bool = True) -> Placement:
    return Placement(domain, destination, 64, order, "fits", running)


def plan_of(*placements: Placement, unplaced: tuple[str, ...] = ()) -> Plan:
    return Plan(tuple(placements), tuple(Unplaced(d, 64, "needs 64 MiB") for d in unplaced))


@pytest.mark.parametrize(
    ("names", "own", "groups", "labels", "noted"),
    [
        (["a", "b"], {}, [], {}, []),
        (["a", "b"], {"a": "job1"}, [], {"a": "job1"}, []),
        # the policy's groups by name, the first matching one wins
        (
            ["j1-a", "j1-b", "x"],
            {},
            [EvacuationGroup("job1", ("j1-*",)), EvacuationGroup("all", ("*",))],
            {"j1-a": "job1", "j1-b": "job1", "x": "all"},
            ["j1-a", "j1-b"],
        ),
        # a VM's own label comes before the policy's groups
        (["j1-a"], {"j1-a": "mine"}, [EvacuationGroup("job1", ("j1-*",))], {"j1-a": "mine"}, ["j1-a"]),
        # the same name in both is one group, and no conflict
        (
            ["j1-a", "b"],
            {"b": "job1"},
            [EvacuationGroup("job1", ("j1-*",))],
            {"j1-a": "job1", "b": "job1"},
            [],
        ),
    ],
)
def test_assign_labels(names, own, groups, labels, noted) -> None:
    got, notes = assign_labels(names, own, groups)
    assert got == labels
    assert [note.split(":")[0] for note in notes] == noted


def test_assign_labels_says_which_group_won() -> None:
    _, notes = assign_labels(["vm"], {"vm": "mine"}, [EvacuationGroup("job1", ("v*",))])
    assert notes == ["vm: goes with group mine (its own label), not with job1"]


def test_a_group_is_one_unit_where_its_first_member_is_and_members_keep_their_destinations() -> None:
    plan = plan_of(placed("a", "x", 1), placed("g1", "x", 2), placed("b", "y", 3), placed("g2", "y", 4))
    grouping = group_placements(plan, {"g1": "job1", "g2": "job1"})
    assert [(u.group, [(p.domain, p.destination) for p in u.members]) for u in grouping.units] == [
        (None, [("a", "x")]),
        ("job1", [("g1", "x"), ("g2", "y")]),
        (None, [("b", "y")]),
    ]
    assert [(p.domain, p.group) for p in grouping.plan.placements] == [
        ("a", None),
        ("g1", "job1"),
        ("b", None),
        ("g2", "job1"),
    ]
    assert grouping.plan.unplaced == ()
    assert grouping.notes == ("group job1: g1, g2 move as one switchover group (gated); never retried",)


def test_a_label_only_one_vm_has_is_no_group() -> None:
    grouping = group_placements(plan_of(placed("a"), placed("b", order=2)), {"a": "job1"})
    assert [(u.group, len(u.members)) for u in grouping.units] == [(None, 1), (None, 1)]
    assert grouping.plan.placements[0].group is None
    assert grouping.notes == ("a: the only VM of group job1 here: moves alone",)


def test_a_member_that_fits_nowhere_keeps_its_whole_group_on_the_source() -> None:
    plan = plan_of(placed("g1"), placed("g2", order=2), placed("c", order=3), unplaced=("g3",))
    grouping = group_placements(plan, {"g1": "job1", "g2": "job1", "g3": "job1", "c": "other"})
    assert [[p.domain for p in u.members] for u in grouping.units] == [["c"]]
    assert [p.domain for p in grouping.plan.placements] == ["c"]
    unplaced = {u.domain: u.reason for u in grouping.plan.unplaced}
    assert sorted(unplaced) == ["g1", "g2", "g3"]
    assert unplaced["g1"] == unplaced["g2"] == "its group job1 cannot move whole: g3 fit(s) nowhere"
    assert unplaced["g3"] == "needs 64 MiB"


def test_a_shut_off_vm_moved_by_definition_is_never_grouped() -> None:
    plan = plan_of(placed("g1"), placed("g2", order=2), placed("off", order=3, running=False))
    grouping = group_placements(plan, {"g1": "job1", "g2": "job1", "off": "job1"})
    assert [(u.group, [p.domain for p in u.members]) for u in grouping.units] == [
        ("job1", ["g1", "g2"]),
        (None, ["off"]),
    ]


def unit(*destinations: str, group: str | None = None) -> Unit:
    return Unit(tuple(placed(f"vm{i}", d) for i, d in enumerate(destinations)), group)


A, B = unit("x"), unit("y")
G2, G3 = unit("x", "x", group="g2"), unit("x", "y", "y", group="g3")


@pytest.mark.parametrize(
    ("queue", "running", "incoming", "concurrency", "per_destination", "expected"),
    [
        ([A, B], 0, {}, 2, 2, A),
        ([A, B], 2, {}, 2, 2, None),  # no slot
        ([A, B], 1, {"x": 1}, 2, 1, B),  # a VM alone waits for its destination; later ones pass it
        # a group needs a slot per member ...
        ([G2, A], 0, {}, 2, 2, G2),
        ([G2, A], 1, {}, 3, 2, G2),
        ([G2, A], 1, {}, 2, 2, None),  # ... and nothing passes it while it waits
        # ... and ignores --per-destination
        ([G2], 0, {"x": 5}, 2, 1, G2),
        ([G3], 0, {"y": 2}, 3, 1, G3),
        # larger than --concurrency: it starts alone
        ([G3, A], 0, {}, 2, 2, G3),
        ([G3, A], 1, {}, 2, 2, None),
        ([G3, A], 1, {}, 1, 2, None),
        # a VM alone before a waiting group still starts
        ([A, G3], 0, {}, 2, 2, A),
        ([unit("x"), G2], 1, {"x": 1}, 3, 1, G2),
        ([], 0, {}, 2, 2, None),
    ],
)
def test_next_unit(queue, running, incoming, concurrency, per_destination, expected) -> None:
    assert next_unit(queue, running, incoming, concurrency, per_destination) is expected


# --- an evacuation with a switchover group, on stand-ins for libvirt ----------------------------------


class _Host:
    """A stand-in libvirt host: its running VMs (name -> group label or None) and free memory."""

    def __init__(self, uri: str, vms: dict[str, str | None]) -> None:
        self.uri, self.vms = uri, vms

    def identity(self) -> frozenset[tuple[str, int]]:
        return frozenset({(self.uri, 1)})

    def domains(self) -> list[DomainInfo]:
        return [DomainInfo(n, n, "running", True, True, 64 * 1024) for n in sorted(self.vms)]

    def node_memory_mib(self) -> int:
        return 1000

    def find_domain(self, name: str) -> str | None:
        return name if name in self.vms else None

    def xml(self, dom: str, **_: object) -> str:
        label = self.vms[dom]
        metadata = f"<metadata><orch:group xmlns:orch='{domxml.GROUP_NS}'>{label}</orch:group></metadata>"
        return f"<domain><name>{dom}</name>{metadata if label else ''}</domain>"

    def close(self) -> None:
        pass


def _evacuation(
    monkeypatch: pytest.MonkeyPatch, vms: dict[str, str | None], policy_text: str = "", **request
):
    from orchestrator.core.policy_toml import parse_policy
    from orchestrator.flows import evacuation as evac

    hosts = {"src": _Host("src", vms), "x": _Host("x", {}), "y": _Host("y", {})}
    monkeypatch.setattr(evac.Evacuation, "open_host", staticmethod(lambda uri: hosts[uri]))
    ran: dict[str, list[object]] = {"single": [], "group": []}

    class FakeMigration:
        def __init__(self, req, source, dest, **kwargs) -> None:
            self.request, self.kwargs = req, kwargs

        def run(self) -> Report:
            ran["single"].append(self)
            r = self.request
            return Report(f"m-{r.domain}", r.domain, "src", r.destination_uri, "p", outcome=Outcome.SUCCEEDED)

    class FakeGroup:
        def __init__(self, name, requests, open_host, options, **kwargs) -> None:
            self.name, self.requests, self.options, self.kwargs = name, requests, options, kwargs
            self.interrupted: list[str] = []

        def interrupt(self, signal_name: str) -> None:
            self.interrupted.append(signal_name)

        def run(self) -> GroupReport:
            ran["group"].append(self)
            report = GroupReport(
                "g-1", self.name, "p", outcome=Outcome.SUCCEEDED, dry_run=self.kwargs["dry_run"]
            )
            for i, r in enumerate(self.requests):
                outcome = Outcome.PLANNED if r.dry_run else Outcome.SUCCEEDED
                member = Report(f"gm-{i}", r.domain, "src", r.destination_uri, "p", outcome=outcome)
                report.members.append(GroupMember(member))
            return report

    monkeypatch.setattr(evac, "Migration", FakeMigration)
    monkeypatch.setattr(evac, "GroupMigration", FakeGroup)
    policy = parse_policy(policy_text, "p.toml")
    run = evac.Evacuation(evac.EvacuationRequest("src", ("x", "y"), policy, **request))
    return run, ran


def test_an_evacuation_moves_a_labelled_group_as_one_and_each_member_is_a_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vms = {"g1": "job1", "g2": "job1", "solo": None, "lone": "job2"}
    run, ran = _evacuation(monkeypatch, vms, group_by=GroupBy.METADATA, drain=DrainMode.START)
    report = run.run()
    (group,) = ran["group"]
    assert group.name == "job1" and sorted(r.domain for r in group.requests) == ["g1", "g2"]
    assert {r.destination_uri for r in group.requests} == {"x", "y"}, "members may go to different hosts"
    assert all(r.switchover.drain is DrainMode.GATED for r in group.requests), "a group drains gated"
    assert (group.options.hold_timeout_s, group.options.release_timeout_s) == (300.0, 30.0)
    assert group.kwargs["parent"] == run.id and group.kwargs["dry_run"] is False
    assert sorted(m.request.domain for m in ran["single"]) == ["lone", "solo"]
    assert all(m.request.switchover.drain is DrainMode.START for m in ran["single"])
    results = {r.domain: r for r in report.results}
    assert {d: (r.outcome, r.group, r.attempts) for d, r in results.items()} == {
        "g1": ("succeeded", "job1", 1),
        "g2": ("succeeded", "job1", 1),
        "solo": ("succeeded", None, 1),
        "lone": ("succeeded", None, 1),
    }
    assert {results["g1"].migration_id, results["g2"].migration_id} == {"gm-0", "gm-1"}
    assert report.groups == [
        {"group": "job1", "group_id": "g-1", "error": None, "outcome": "succeeded", "stall_ms": None,
         "members": [p.domain for p in report.plan if p.group == "job1"]},
    ]  # fmt: skip
    assert "lone: the only VM of group job2 here: moves alone" in report.notes
    assert report.to_json()["groups"] == report.groups


def test_group_by_none_ignores_labels_and_the_policys_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    text = '[evacuate]\ngroup_by = "metadata"\n[[evacuate.groups]]\nname = "p"\ninclude = ["s*"]\n'
    run, ran = _evacuation(monkeypatch, {"g1": "job1", "g2": "job1", "s1": None, "s2": None}, text)
    run.run()
    assert sorted(g.name for g in ran["group"]) == ["job1", "p"], "the policy's group_by and groups"
    run, ran = _evacuation(
        monkeypatch, {"g1": "job1", "g2": "job1", "s1": None, "s2": None}, text, group_by=GroupBy.NONE
    )
    report = run.run()
    assert ran["group"] == [] and len(ran["single"]) == 4
    assert all(r.group is None for r in report.results)


def test_the_policys_groups_apply_without_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    text = '[[evacuate.groups]]\nname = "p"\ninclude = ["s*"]\n'
    run, ran = _evacuation(monkeypatch, {"g1": "job1", "g2": "job1", "s1": None, "s2": None}, text)
    run.run()
    assert [sorted(r.domain for r in g.requests) for g in ran["group"]] == [["s1", "s2"]]


def test_a_dry_run_runs_the_groups_dry_run(monkeypatch: pytest.MonkeyPatch) -> None:
    run, ran = _evacuation(monkeypatch, {"g1": "job1", "g2": "job1"}, group_by=GroupBy.METADATA, dry_run=True)
    report = run.run()
    (group,) = ran["group"]
    assert group.kwargs["dry_run"] is True and all(r.dry_run for r in group.requests)
    assert [(r.outcome, r.group, r.attempts) for r in report.results] == [("planned", "job1", 0)] * 2
    assert report.exit_code == 0


def test_a_second_stop_interrupts_a_running_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a running migration: the first stop starts nothing new, the second interrupts the group."""
    import threading

    from orchestrator.flows import evacuation as evac

    run, _ = _evacuation(
        monkeypatch, {"g1": "job1", "g2": "job1", "later": None}, group_by=GroupBy.METADATA, concurrency=2
    )
    running, release = [], threading.Event()
    original = evac.GroupMigration.run

    def held_run(self):
        running.append(self)
        assert release.wait(10)
        return original(self)

    monkeypatch.setattr(evac.GroupMigration, "run", held_run)
    worker = threading.Thread(target=run.run)
    worker.start()
    deadline = time.monotonic() + 10
    while not running and time.monotonic() < deadline:
        time.sleep(0.01)
    (group,) = running
    run.stop()
    assert group.interrupted == []
    run.stop()
    assert group.interrupted == ["second interrupt"]
    release.set()
    worker.join(10)
    assert not worker.is_alive()
    assert run.report.interrupted and run.report.message == "interrupted: 1 VM(s) not started"
    assert sorted(r.domain for r in run.report.results) == ["g1", "g2"]
