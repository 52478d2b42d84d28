"""Recovery after the orchestrator died, on the scripted libvirt and a real journal.

A killed orchestrator leaves its run log as the migration and its hook supervisor wrote it up to the
kill: each test writes such a run log (its begin names a dead process) and puts the VM where libvirt
left it; `Recovery` then finishes. The three facts every time: every device that may be drained is
undrained exactly once, never while its drain may still run; the VM runs on exactly one host; the
journal tells the truth. `plan` (the decision alone) is tested table-driven first; the tests with real
processes follow (a live supervisor of a dead run, a hook whose supervisor died). The lab tests kill a
real `orchestrator migrate` at each phase.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from unit.scripted import Behaviour, FakeClock, FakeDevice, FakeHost, FakeRunner, Model
from unit.test_migration import DST, SRC, domain_xml, policy_text

from orchestrator.core.convergence import GATE_FLOOR_MS
from orchestrator.core.hooks import Hook, Trigger
from orchestrator.core.hypervisor import RUNNING, MigrateRequest
from orchestrator.core.policy_toml import parse_policy
from orchestrator.core.records import ActionStatus, DeviceAction, still_drained
from orchestrator.core.report import Outcome
from orchestrator.edges import procfs, runlog
from orchestrator.edges.hook_runner import HookRunner
from orchestrator.edges.journal import Journal
from orchestrator.edges.locks import MigrationLock, lock_dir
from orchestrator.edges.supervisor import Supervisor, hook_path
from orchestrator.flows.recovery import DevicePlan, Recovery, RecoveryReport, plan


def dead_pid() -> int:
    """The PID of a process that has ended (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# Records as a migration and its supervisor write them (orchestrator.edges.runlog).
def action(device: str, what: str, status: str) -> dict[str, Any]:
    return {"k": "action", "device_id": device, "action": what, "status": status, "at": 1.0, "detail": None}


def start(run: str, trigger: str, device: str, hook: int = 0, **more: Any) -> dict[str, Any]:
    record = {"k": "hook-start", "run": run, "trigger": trigger, "device_id": device, "hook": hook}
    record |= {"label": "true", "argv": ["/bin/true"], "pid": None, "started": 1.0, "timeout_ms": 250}
    return record | more


def end(run: str, ok: bool = True) -> dict[str, Any]:
    return {
        "k": "hook-end",
        "run": run,
        "exit_code": 0 if ok else 1,
        "error": None if ok else "exited with status 1",
    }


SUPERVISED = {"k": "supervised", "pid": 4242}
POLICY = parse_policy(policy_text(), "p.toml")
TWO_UNDRAINS = parse_policy(
    policy_text() + '[[hooks.undrain]]\nname = "second"\nargv = ["/bin/true"]\n', "p.toml"
)


@pytest.mark.parametrize(
    ("records", "policy", "supervised", "expected"),
    [
        pytest.param([], POLICY, True, [], id="nothing drained"),
        pytest.param(
            [action("nic0", "drain", "starting"), start("1", "drain", "nic0"), end("1")],
            POLICY,
            True,
            [DevicePlan("nic0", run=(0,), why="drained, and not undrained")],
            id="drained: every undrain hook runs",
        ),
        pytest.param(
            [action("nic0", "drain", "starting"), SUPERVISED],
            POLICY,
            True,
            [DevicePlan("nic0", why="its drain never started a hook: nothing to undo")],
            id="the supervisor says no drain hook ever started",
        ),
        pytest.param(
            [action("nic0", "drain", "starting")],
            POLICY,
            False,
            [DevicePlan("nic0", run=(0,), why="drained, and not undrained")],
            id="no word from the supervisor: assumed drained",
        ),
        pytest.param(
            [
                action("nic0", "drain", "starting"),
                start("1", "drain", "nic0"),
                action("nic0", "undrain", "done"),
            ],
            POLICY,
            True,
            [],
            id="undrained, as the orchestrator recorded",
        ),
        pytest.param(
            [
                action("nic0", "drain", "starting"),
                start("1", "drain", "nic0"),
                action("nic0", "undrain", "starting"),
                start("2", "undrain", "nic0"),
                end("2"),
            ],
            POLICY,
            True,
            [DevicePlan("nic0", ended=True, ok=True, why="its undrain ran to its end")],
            id="the undrain ran to its end under the supervisor: never again",
        ),
        pytest.param(
            [
                action("nic0", "drain", "starting"),
                start("1", "drain", "nic0"),
                action("nic0", "undrain", "starting"),
                start("2", "undrain", "nic0"),
                end("2", ok=False),
            ],
            POLICY,
            True,
            [DevicePlan("nic0", ended=True, ok=False, why="its undrain ran to its end")],
            id="... and failed: reported, not run again",
        ),
        pytest.param(
            [
                action("nic0", "drain", "starting"),
                start("1", "drain", "nic0"),
                action("nic0", "undrain", "starting"),
                start("2", "undrain", "nic0", hook=1),
                end("2"),
            ],
            TWO_UNDRAINS,
            True,
            [DevicePlan("nic0", run=(0,), why="drained, and not undrained")],
            id="only the undrain hook that never started runs",
        ),
        pytest.param(
            [
                action("nic1", "drain", "starting"),
                start("1", "drain", "nic1"),
                action("nic0", "drain", "starting"),
                start("2", "undrain", "nic1"),
                end("2"),
                SUPERVISED,
            ],
            POLICY,
            True,
            [
                DevicePlan("nic1", ended=True, ok=True, why="its undrain ran to its end"),
                DevicePlan("nic0", why="its drain never started a hook: nothing to undo"),
            ],
            id="two devices, each its own way",
        ),
    ],
)
def test_plan(
    records: list[dict[str, Any]], policy: Any, supervised: bool, expected: list[DevicePlan]
) -> None:
    assert plan(records, policy, supervised=supervised) == expected


def test_with_an_armed_drain_hook_a_drain_written_down_may_have_happened() -> None:
    armed = parse_policy(
        '[[hooks.drain]]\nargv = ["/bin/true"]\narmed = true\n[[hooks.undrain]]\nargv = ["/bin/true"]\n',
        "p.toml",
    )
    assert plan([action("nic0", "drain", "starting"), SUPERVISED], armed, supervised=True) == [
        DevicePlan("nic0", run=(0,), why="drained, and not undrained")
    ]


# --- recovery on the scripted libvirt -------------------------------------------------------------


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = FakeClock()
        self.source, self.destination = FakeHost(SRC, self.clock), FakeHost(DST, self.clock)
        self.runner = FakeRunner(self.clock)
        self.path = tmp / "journal.sqlite"
        self.journal = Journal.open(self.path)

    def left(
        self,
        records: list[dict[str, Any]],
        *,
        phase: str = "switching-over",
        policy: str | None = None,
        supervisor: int | None = None,
    ) -> str:
        """The run log a killed migration leaves: its begin (of a dead process), then `records`."""
        migration_id = "m-killed"
        begin = {
            "k": "begin",
            "id": migration_id,
            "kind": "migrate",
            "domain": "vm1",
            "source_uri": SRC,
            "destination_uri": DST,
            "policy": "/etc/orchestrator/policies/p.toml",
            "started": 1.0,
            "pid": dead_pid(),
            "host": os.uname().nodename,
            "policy_text": policy_text() if policy is None else policy,
            "supervisor": supervisor if supervisor is not None else dead_pid(),
        }
        log = runlog.RunLog.create(runlog.directory_of(self.path), migration_id)
        # A `supervised` record is the run's own supervisor's.
        records = [{**r, "pid": begin["supervisor"]} if r["k"] == "supervised" else r for r in records]
        for record in [begin, {"k": "phase", "phase": phase, "at": 2.0}, *records]:
            log.write(record, vital=True)
        log.close()
        return migration_id

    def vm_on(self, host: FakeHost) -> None:
        host.add("vm1", domain_xml(["nic0", "nic1"]))

    def recovery(self, **options: Any) -> Recovery:
        hosts = {SRC: self.source, DST: self.destination}
        return Recovery(self.journal, hosts.__getitem__, runner=self.runner, clock=self.clock, **options)

    def recover(self, **options: Any) -> RecoveryReport:
        return self.recovery(**options).run()

    def where(self) -> list[str]:
        return [
            h.uri
            for h in (self.source, self.destination)
            if "vm1" in h.domains and h.domains["vm1"].state() == RUNNING
        ]

    def undrains(self, device: str) -> int:
        return len(self.runner.of(Trigger.UNDRAIN, device))

    def journal_true(self, migration_id: str, outcome: Outcome) -> None:
        record = self.journal.get_migration(migration_id)
        assert record.migration.outcome is outcome and record.migration.recovered is not None
        assert still_drained(record.device_actions) == {}
        assert not runlog.path_of(runlog.directory_of(self.path), migration_id).exists(), "imported"


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv("ORCH_RUNTIME_DIR", str(tmp_path / "run"))
    w = World(tmp_path)
    yield w
    w.journal.close()


def test_killed_after_drains_started_the_vm_moved_alone_each_is_undrained_once(world: World) -> None:
    # p2p: the job went on without its client and succeeded.
    migration_id = world.left(
        [
            action("nic0", "drain", "starting"),
            start("1", "drain", "nic0"),
            end("1"),
            action("nic0", "drain", "done"),
            action("nic1", "drain", "starting"),
            start("2", "drain", "nic1"),
        ]
    )
    world.vm_on(world.destination)
    report = world.recover()
    (done,) = report.recovered
    assert (done.outcome, done.location, sorted(done.undrained)) == (
        "succeeded",
        "destination",
        ["nic0", "nic1"],
    )
    assert world.undrains("nic0") == 1 and world.undrains("nic1") == 1 and int(report.exit_code) == 0
    assert world.where() == [DST]
    world.journal_true(migration_id, Outcome.SUCCEEDED)
    record = world.journal.get_migration(migration_id)
    assert "died in phase switching-over" in (record.migration.error or "")
    assert [a.status for a in record.device_actions[-2:]] == [ActionStatus.STARTING, ActionStatus.DONE]
    undrain = world.runner.of(Trigger.UNDRAIN, "nic0")[0]
    assert undrain.values["state"] == "running" and undrain.values["migration_id"] == migration_id
    assert world.recover().recovered == [] and world.undrains("nic0") == 1, "recovered exactly once"


def test_killed_before_any_drain_leaves_nothing_to_undrain(world: World) -> None:
    migration_id = world.left([], phase="job-running")
    world.vm_on(world.source)
    (done,) = world.recover().recovered
    assert (done.outcome, done.undrained) == ("rolled-back", []) and world.runner.runs == []
    world.journal_true(migration_id, Outcome.ROLLED_BACK)


def test_an_undrain_the_supervisor_saw_to_its_end_is_not_run_again(world: World) -> None:
    migration_id = world.left(
        [
            action("nic0", "drain", "starting"),
            start("1", "drain", "nic0"),
            end("1"),
            action("nic0", "undrain", "starting"),
            start("2", "undrain", "nic0"),
            end("2"),
            SUPERVISED,
        ]
    )
    world.vm_on(world.destination)
    (done,) = world.recover().recovered
    assert (done.awaited, done.undrained, done.failed) == (["nic0"], [], [])
    assert world.runner.runs == [], "not run a second time"
    world.journal_true(migration_id, Outcome.SUCCEEDED)
    last = world.journal.get_migration(migration_id).device_actions[-1]
    assert (last.action, last.status) == (DeviceAction.UNDRAIN, ActionStatus.ENDED)


def test_an_undrain_that_started_but_never_reached_the_supervisor_runs(world: World) -> None:
    migration_id = world.left(
        [
            action("nic0", "drain", "starting"),
            start("1", "drain", "nic0"),
            end("1"),
            action("nic0", "undrain", "starting"),
            SUPERVISED,
        ]
    )
    world.vm_on(world.destination)
    (done,) = world.recover().recovered
    assert done.undrained == ["nic0"] and world.undrains("nic0") == 1
    world.journal_true(migration_id, Outcome.SUCCEEDED)


def test_a_drain_that_never_started_a_hook_is_not_undrained(world: World) -> None:
    migration_id = world.left([action("nic0", "drain", "starting"), SUPERVISED])
    world.vm_on(world.source)
    (done,) = world.recover().recovered
    assert done.undrained == [] and world.runner.runs == [], "never drained: nothing to undo"
    record = world.journal.get_migration(migration_id)
    assert record.migration.outcome is Outcome.ROLLED_BACK


def test_the_vm_on_neither_host_is_failed_and_needs_an_admin(world: World) -> None:
    migration_id = world.left([action("nic0", "drain", "starting")])
    report = world.recover()
    assert report.recovered[0].outcome == "failed" and int(report.exit_code) == 9
    assert world.undrains("nic0") == 1, "undrained all the same: no workload stays drained"
    world.journal_true(migration_id, Outcome.FAILED)


def test_a_failing_undrain_in_recovery_needs_an_admin(world: World) -> None:
    world.left([action("nic0", "drain", "starting")])
    world.vm_on(world.destination)
    world.runner.behaviours[(Trigger.UNDRAIN, "nic0")] = Behaviour(error="exited with status 1")
    report = world.recover()
    assert report.recovered[0].failed == ["nic0"] and int(report.exit_code) == 9


def test_the_journaled_policy_is_the_one_run(world: World) -> None:
    journaled = policy_text().replace(
        'argv = ["/bin/true", "{device_id}"]\non_failure = "continue"',
        'argv = ["/bin/echo", "journaled", "{device_id}"]\non_failure = "continue"',
    )
    world.left([action("nic0", "drain", "starting")], policy=journaled)
    world.vm_on(world.destination)
    world.recover()
    (undrain,) = world.runner.of(Trigger.UNDRAIN)
    assert undrain.label == "echo"


def test_a_migration_without_its_policy_is_reported_not_guessed(world: World) -> None:
    world.left([action("nic0", "drain", "starting")], policy="")
    path = runlog.path_of(runlog.directory_of(world.path), "m-killed")
    records = runlog.read(path)
    records[0]["policy_text"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    world.vm_on(world.destination)
    report = world.recover()
    assert report.recovered == [] and "did not journal its policy" in report.skipped[0]["error"]
    assert int(report.exit_code) == 9 and world.runner.runs == []


def test_recovery_waits_for_a_migration_holding_the_vm(world: World) -> None:
    world.left([action("nic0", "drain", "starting")])
    world.vm_on(world.destination)
    uuid = world.destination.domains["vm1"].uuid()
    with MigrationLock.acquire(lock_dir(), uuid, "m-other", domain="vm1"):
        report = world.recover()
    assert report.recovered == [] and "m-other" in report.skipped[0]["error"]
    assert world.runner.runs == [], "nothing undrained while another run holds the VM"


def test_a_migration_of_an_older_orchestrator_is_recovered_from_its_device_actions(world: World) -> None:
    """No run log: a journal row left 'running' and its device actions; recover's records follow them."""
    world.journal.close()
    with sqlite3.connect(world.path) as conn:
        conn.execute(
            "INSERT INTO migrations (id, kind, domain, source_uri, destination_uri, policy, started, "
            "outcome, pid, host, policy_text, phase) VALUES ('m-old', 'migrate', 'vm1', ?, ?, 'p', 1.0, "
            "'running', ?, ?, ?, 'switching-over')",
            (SRC, DST, dead_pid(), os.uname().nodename, policy_text()),
        )
        conn.execute("INSERT INTO device_actions VALUES ('m-old', 1, 'nic0', 'drain', 'starting', 1.0, NULL)")
    world.journal = Journal.open(world.path)
    world.vm_on(world.source)
    (done,) = world.recover().recovered
    assert done.undrained == ["nic0"] and world.undrains("nic0") == 1
    record = world.journal.get_migration("m-old")
    assert record.migration.outcome is Outcome.ROLLED_BACK and record.migration.recovered is not None
    assert [(a.seq, a.status) for a in record.device_actions] == [
        (1, ActionStatus.STARTING),
        (2, ActionStatus.STARTING),
        (4, ActionStatus.DONE),  # its undrain hook run is 3
    ], "its own records kept, recover's after them"
    assert world.recover().recovered == []


# --- a libvirt job the dead orchestrator left running -------------------------------------------


def orphan_job(world: World, downtime_ms: int) -> str:
    """A migration whose orchestrator died while its libvirt job goes on: nic0 was drained."""
    world.source.model = Model(dirty_ms=20, devices=[FakeDevice("nic0")])
    guest = world.source.add("vm1", domain_xml(["nic0"]))
    guest.set_max_downtime(downtime_ms)
    world.source.start_migration(guest, MigrateRequest(DST), world.destination, lambda _error: None)
    return world.left([action("nic0", "drain", "starting")])


def test_a_job_left_running_is_waited_for(world: World) -> None:
    migration_id = orphan_job(world, downtime_ms=300)
    (done,) = world.recover().recovered
    assert done.outcome == "succeeded" and done.notes == ["waited for the libvirt job that was still running"]
    assert world.where() == [DST] and world.undrains("nic0") == 1
    world.journal_true(migration_id, Outcome.SUCCEEDED)


def test_a_job_left_running_is_aborted_when_asked(world: World) -> None:
    orphan_job(world, downtime_ms=300)
    (done,) = world.recover(job="abort").recovered
    assert done.outcome == "rolled-back" and world.source.migrations[0].cancelled
    assert world.where() == [SRC] and world.undrains("nic0") == 1


def test_a_job_held_at_the_gate_is_aborted_even_when_waiting(world: World) -> None:
    # Nothing would ever release it: the orchestrator that held the gate is gone.
    orphan_job(world, downtime_ms=GATE_FLOOR_MS)
    (done,) = world.recover(job="wait").recovered
    assert done.outcome == "rolled-back" and "held at the gate" in done.notes[0]
    assert world.where() == [SRC] and world.undrains("nic0") == 1


# --- with real processes: a dead run's supervisor, and a hook whose supervisor died -----------------


def test_recovery_waits_for_the_dead_runs_supervisor_before_it_undrains(world: World, tmp_path: Path) -> None:
    """The orchestrator died while a drain hook runs under its supervisor: recover waits for that hook's
    end (the supervisor writes it, then exits), and only then undrains."""
    release = tmp_path / "release"
    supervisor = Supervisor.start({**os.environ, "PATH": hook_path()})
    migration_id = world.left([action("nic0", "drain", "starting")], supervisor=supervisor.pid)
    log = runlog.RunLog.reopen(runlog.path_of(runlog.directory_of(world.path), migration_id))
    runner = HookRunner(supervisor)
    runner.attach(migration_id, log.fd)
    wait = 'while [ ! -e "$1" ]; do sleep 0.01; done'
    runner.start(
        Hook(Trigger.DRAIN, ("/bin/sh", "-c", wait, "sh", str(release)), timeout_ms=60000),
        {},
        "nic0",
        index=0,
    )
    log.close()
    supervisor.close()  # the orchestrator is gone: its supervisor finishes the drain hook, then exits
    world.vm_on(world.destination)
    lines: list[str] = []
    waiting = threading.Event()

    def on_line(line: str) -> None:
        lines.append(line)
        if "still runs its hooks: waiting" in line:
            waiting.set()

    box: list[RecoveryReport] = []
    thread = threading.Thread(target=lambda: box.append(world.recovery(on_line=on_line).run()))
    thread.start()
    try:
        assert waiting.wait(30), lines
        assert world.runner.runs == [], "no undrain while the drain may still run"
    finally:
        release.touch()
        thread.join(60)
    (done,) = box[0].recovered
    assert done.undrained == ["nic0"] and world.undrains("nic0") == 1
    record = world.journal.get_migration(migration_id)
    drain_run = next(r for r in record.hook_runs if r.trigger == "drain")
    undrain = next(a for a in record.device_actions if a.action is DeviceAction.UNDRAIN)
    assert drain_run.exit_code == 0 and drain_run.seq < undrain.seq, (
        "the drain's end is recorded before the undrain"
    )


def test_a_hook_whose_supervisor_died_is_waited_for_to_its_deadline_then_killed(world: World) -> None:
    hook = subprocess.Popen(["sleep", "60"], start_new_session=True)
    found = procfs.proc(hook.pid)
    assert found is not None
    try:
        migration_id = world.left(
            [
                action("nic0", "drain", "starting"),
                start(
                    "1",
                    "drain",
                    "nic0",
                    pid=hook.pid,
                    start=found.start,
                    tag="ORCH_HOOK_RUN=1.1",
                    timeout_ms=300,
                ),
            ]
        )
        world.vm_on(world.source)
        (done,) = world.recover().recovered
        assert hook.wait(30) < 0, "killed, with its group"
        assert done.undrained == ["nic0"] and world.undrains("nic0") == 1
        record = world.journal.get_migration(migration_id)
        (drain_run,) = [r for r in record.hook_runs if r.trigger == "drain"]
        assert "recover killed it at its deadline" in (drain_run.error or "")
    finally:
        if hook.poll() is None:
            hook.kill()
            hook.wait()


def test_recover_runs_its_undrain_hooks_under_its_own_supervisor_and_records_them(world: World) -> None:
    world.runner = HookRunner(Supervisor.start({**os.environ, "PATH": hook_path()}))  # type: ignore[assignment]
    migration_id = world.left([action("nic0", "drain", "starting")])
    world.vm_on(world.source)
    (done,) = world.recover().recovered
    assert done.undrained == ["nic0"]
    record = world.journal.get_migration(migration_id)
    (undrain_run,) = [r for r in record.hook_runs if r.trigger == "undrain"]
    assert undrain_run.ok and undrain_run.argv == ("/bin/true", "nic0"), "recorded by the supervisor"
    assert sys.executable  # the supervisor was the one this test started (closed with the process)


def test_a_dry_run_says_what_it_would_do_and_does_nothing(world: World) -> None:
    migration_id = world.left(
        [
            action("nic0", "drain", "starting"),
            start("1", "drain", "nic0"),
            end("1"),
            action("nic1", "drain", "starting"),
            start("2", "drain", "nic1"),
            end("2"),
            action("nic1", "undrain", "starting"),
            start("3", "undrain", "nic1"),
            end("3"),
            SUPERVISED,
        ]
    )
    world.vm_on(world.destination)
    path = runlog.path_of(runlog.directory_of(world.path), migration_id)
    before = path.read_bytes()
    lines: list[str] = []
    report = world.recovery(on_line=lines.append).run(dry_run=True)
    (would,) = report.recovered
    assert (would.undrained, would.awaited, would.location) == (["nic0"], ["nic1"], "destination")
    assert report.dry_run and report.to_json()["dry_run"] is True
    assert world.runner.runs == [] and path.read_bytes() == before, "nothing run, nothing written"
    assert any("would be recovered: undrain nic0" in line for line in lines), lines
    assert [row.id for row in world.journal.unfinished()] == [migration_id], "still to recover"


def test_waiting_for_a_job_says_so_every_few_seconds_and_names_the_way_out(world: World) -> None:
    world.source.model = Model(dirty_ms=10_000, devices=[FakeDevice("nic0")])  # never converges
    guest = world.source.add("vm1", domain_xml(["nic0"]))
    world.source.start_migration(guest, MigrateRequest(DST), world.destination, lambda _error: None)
    world.left([action("nic0", "drain", "starting")])
    lines: list[str] = []
    report = world.recovery(on_line=lines.append, job_wait_s=12).run()
    assert "still runs after 12 s" in report.skipped[0]["error"]
    assert any("at most 12 s" in line and "recover --job abort" in line for line in lines), lines
    progress = [line for line in lines if "the libvirt job still runs" in line]
    assert len(progress) == 2 and all("--job abort" in line for line in progress), lines


# --- a dead switchover group ------------------------------------------------------------------------

GROUP_HOOKS = (
    '[[hooks.group-drain]]\nargv = ["/bin/true", "{group}"]\n'
    '[[hooks.group-undrain]]\nargv = ["/bin/true", "{group}", "{members}"]\non_failure = "continue"\n'
)


def dead_group(
    world: World, group_records: list[dict[str, Any]], member_records: list[dict[str, Any]]
) -> None:
    """The run logs a killed `migrate-group` leaves: the group's row (kind group) and one member's."""
    directory = runlog.directory_of(world.path)
    pid, supervisor = dead_pid(), dead_pid()
    common = {
        "source_uri": SRC,
        "policy": "/etc/orchestrator/policies/p.toml",
        "pid": pid,
        "host": os.uname().nodename,
        "policy_text": policy_text(drain="gated", hooks=GROUP_HOOKS),
        "supervisor": supervisor,
    }
    rows = [
        (
            "g-killed",
            {"kind": "group", "domain": "job1", "destination_uri": DST, "started": 1.0},
            group_records,
        ),
        (
            "m-member",
            {
                "kind": "group-member",
                "domain": "vm1",
                "destination_uri": DST,
                "started": 1.5,
                "parent": "g-killed",
            },
            member_records,
        ),
    ]
    for migration_id, fields, records in rows:
        log = runlog.RunLog.create(directory, migration_id)
        begin = {"k": "begin", "id": migration_id, **common, **fields}
        for record in [begin, {"k": "phase", "phase": "job-running", "at": 2.0}, *records]:
            log.write(record, vital=True)
        log.close()


def test_a_dead_groups_own_undrain_runs_once_after_its_members_are_recovered(world: World) -> None:
    dead_group(
        world,
        [action("@group", "drain", "starting"), start("1", "group-drain", "@group"), end("1")],
        [
            action("nic0", "drain", "starting"),
            start("2", "drain", "nic0"),
            end("2"),
            action("nic0", "drain", "done"),
        ],
    )
    world.vm_on(world.source)  # held at the gate, never released: it stayed on the source
    report = world.recover()
    by_id = {r.migration_id: r for r in report.recovered}
    assert set(by_id) == {"g-killed", "m-member"} and int(report.exit_code) == 0
    assert by_id["m-member"].undrained == ["nic0"] and world.undrains("nic0") == 1
    (group_undrain,) = world.runner.of(Trigger.GROUP_UNDRAIN, "@group")
    assert group_undrain.values["group"] == "job1" and group_undrain.values["members"] == "vm1"
    assert by_id["g-killed"].outcome == "interrupted" and by_id["g-killed"].undrained == ["@group"]
    group = world.journal.get_migration("g-killed")
    assert group.migration.outcome is Outcome.INTERRUPTED and group.migration.recovered is not None
    assert still_drained(group.device_actions) == {}, "the group's drain is undrained in its journal"
    again = world.recover()
    assert again.recovered == [] and len(world.runner.of(Trigger.GROUP_UNDRAIN, "@group")) == 1, "once"


def test_a_dead_groups_undrain_that_had_started_is_not_run_again(world: World) -> None:
    dead_group(
        world,
        [
            action("@group", "drain", "starting"),
            action("@group", "drain", "done"),
            action("@group", "undrain", "starting"),
        ],
        [],
    )
    world.vm_on(world.destination)
    report = world.recover()
    assert world.runner.of(Trigger.GROUP_UNDRAIN, "@group") == []
    group = next(r for r in report.recovered if r.migration_id == "g-killed")
    assert group.outcome == "succeeded", "its only member moved"
