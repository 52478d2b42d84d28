"""Recovery after the orchestrator died, on the scripted libvirt and a real journal.

A killed orchestrator leaves its journal as the driver wrote it up to the kill: each test writes that
journal (a migration row of a dead process, its device actions so far) and puts the VM where libvirt
left it; `Recovery` then finishes. The three facts every time: every device that may be drained is
undrained exactly once, the VM runs on exactly one host, the journal tells the truth. (The lab tests
kill a real `orchestrator migrate` with SIGKILL at each phase; test_migration checks that a drain is
journaled before its hooks start.)
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from unit.scripted import Behaviour, FakeClock, FakeDevice, FakeHost, FakeRunner, Model
from unit.test_migration import DST, SRC, domain_xml, policy_text

from orchestrator.convergence import GATE_FLOOR_MS
from orchestrator.hooks import ProcessToken, Trigger
from orchestrator.hypervisor import RUNNING, MigrateRequest
from orchestrator.journal import ActionStatus, DeviceAction, Journal, still_drained
from orchestrator.locks import MigrationLock, lock_dir
from orchestrator.recovery import Recovery, RecoveryReport
from orchestrator.report import Outcome


def dead_pid() -> int:
    """The PID of a process that has ended (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


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
        actions: list[tuple[str, str, str]] | list[tuple[str, str, str, str]],
        *,
        phase: str = "switching-over",
        policy: str | None = None,
    ) -> str:
        """The journal a killed migration leaves: its row (of a dead process) and its device actions."""
        migration_id = "m-killed"
        self.journal.begin_migration(
            migration_id,
            "migrate",
            "vm1",
            SRC,
            DST,
            "/etc/orchestrator/policies/p.toml",
            self.clock.time(),
            policy_text=policy_text() if policy is None else policy,
        )
        self.journal.record_phase(migration_id, phase, self.clock.time())
        for device, action, status, *detail in actions:
            self.journal.record_device_action(
                migration_id, device, action, status, self.clock.time(), detail[0] if detail else "prepare"
            )
        self.journal.flush()
        with sqlite3.connect(self.path) as conn:
            conn.execute("UPDATE migrations SET pid = ? WHERE id = ?", (dead_pid(), migration_id))
        return migration_id

    def vm_on(self, host: FakeHost) -> None:
        host.add("vm1", domain_xml(["nic0", "nic1"]))

    def recover(self, **options: Any) -> RecoveryReport:
        hosts = {SRC: self.source, DST: self.destination}
        return Recovery(
            self.journal,
            hosts.__getitem__,
            runner=self.runner,
            clock=self.clock,
            locks=lock_dir(self.path),
            **options,
        ).run()

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


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.journal.close()


def test_killed_after_drains_started_the_vm_moved_alone_each_is_undrained_once(world: World) -> None:
    # p2p: the job went on without its client and succeeded.
    migration_id = world.left(
        [("nic0", "drain", "starting"), ("nic0", "drain", "done"), ("nic1", "drain", "starting")]
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
    undrain = world.runner.of(Trigger.UNDRAIN, "nic0")[0]
    assert undrain.values["state"] == "running" and undrain.values["migration_id"] == migration_id
    assert world.recover().recovered == [] and world.undrains("nic0") == 1, "recovered exactly once"


def test_a_drain_only_the_intents_file_holds_is_undrained_and_journaled(world: World) -> None:
    # Killed after the drains' `starting` reached the intents file (orchestrator.intents), before the
    # journal's writer committed them: the journal has no device action at all.
    migration_id = world.left([("nic0", "drain", "starting"), ("nic1", "drain", "starting")])
    with sqlite3.connect(world.path) as conn:
        conn.execute("DELETE FROM device_actions WHERE migration_id = ?", (migration_id,))
    intents_dir = world.path.with_name(world.path.name + ".intents")
    assert (intents_dir / migration_id).exists()
    world.vm_on(world.source)
    (done,) = world.recover().recovered
    assert (done.outcome, done.location, sorted(done.undrained)) == (
        "rolled-back",
        "source",
        ["nic0", "nic1"],
    )
    assert world.undrains("nic0") == 1 and world.undrains("nic1") == 1
    world.journal_true(migration_id, Outcome.ROLLED_BACK)
    steps = [
        (a.seq, a.device_id, a.action, a.status)
        for a in world.journal.get_migration(migration_id).device_actions
    ]
    assert steps[:2] == [
        (2, "nic0", DeviceAction.DRAIN, ActionStatus.STARTING),
        (3, "nic1", DeviceAction.DRAIN, ActionStatus.STARTING),
    ]
    with sqlite3.connect(world.path) as conn:  # in the journal itself now, not only read from the file
        assert conn.execute(
            "SELECT count(*) FROM device_actions WHERE migration_id = ? AND seq < 4", (migration_id,)
        ).fetchone() == (2,)
    assert not (intents_dir / migration_id).exists()


def test_killed_before_any_drain_leaves_nothing_to_undrain(world: World) -> None:
    migration_id = world.left([], phase="job-running")
    world.vm_on(world.source)
    (done,) = world.recover().recovered
    assert (done.outcome, done.undrained) == ("rolled-back", []) and world.runner.runs == []
    world.journal_true(migration_id, Outcome.ROLLED_BACK)


def test_an_undrain_that_started_but_never_ended_runs_again(world: World) -> None:
    migration_id = world.left(
        [("nic0", "drain", "starting"), ("nic0", "drain", "done"), ("nic0", "undrain", "starting")]
    )
    world.vm_on(world.destination)
    (done,) = world.recover().recovered
    assert done.undrained == ["nic0"] and world.undrains("nic0") == 1
    world.journal_true(migration_id, Outcome.SUCCEEDED)


def spawned(*processes: ProcessToken) -> tuple[str, str, str, str]:
    return ("nic0", "undrain", "spawned", "hook processes " + " ".join(map(str, processes)))


def test_an_undrain_under_way_is_waited_for_not_run_again(world: World) -> None:
    """Killed once every undrain hook had started: recover waits for the orphaned hook, runs nothing."""
    hook = subprocess.Popen(["cat"], stdin=subprocess.PIPE, start_new_session=True)  # ends at EOF
    migration_id = world.left(
        [("nic0", "drain", "starting"), ("nic0", "undrain", "starting"), spawned(ProcessToken.of(hook.pid))]
    )
    world.vm_on(world.destination)
    waiting = threading.Event()
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if "is under way" in line:
            waiting.set()

    box: list[RecoveryReport] = []
    recovery = Recovery(
        world.journal,
        {SRC: world.source, DST: world.destination}.__getitem__,
        runner=world.runner,
        clock=world.clock,
        locks=lock_dir(world.path),
        on_line=on_line,
    )
    thread = threading.Thread(target=lambda: box.append(recovery.run()))
    thread.start()
    try:
        assert waiting.wait(30), lines
        assert thread.is_alive(), "recover waits while the undrain runs"
    finally:
        assert hook.stdin is not None
        hook.stdin.close()  # the orphaned undrain hook ends
        thread.join(30)
    assert hook.wait() == 0
    (done,) = box[0].recovered
    assert (done.awaited, done.undrained, done.failed) == (["nic0"], [], [])
    assert world.runner.runs == [], "not run a second time"
    assert int(box[0].exit_code) == 0
    world.journal_true(migration_id, Outcome.SUCCEEDED)
    last = world.journal.get_migration(migration_id).device_actions[-1]
    assert (last.action, last.status) == (DeviceAction.UNDRAIN, ActionStatus.ENDED)
    assert f"process {hook.pid}" in (last.detail or "")
    assert world.recover().recovered == [] and world.runner.runs == []


def test_a_spawned_undrain_whose_hooks_are_gone_runs_again(world: World) -> None:
    """Their result never journaled, and nothing left to wait for: it may not have happened."""
    me = ProcessToken.of(os.getpid())
    gone = [ProcessToken(dead_pid(), me.start), ProcessToken(os.getpid(), (me.start or 0) + 1)]  # reused PID
    world.left([("nic0", "drain", "starting"), ("nic0", "undrain", "starting"), spawned(*gone)])
    world.vm_on(world.destination)
    (done,) = world.recover().recovered
    assert (done.undrained, done.awaited) == (["nic0"], []) and world.undrains("nic0") == 1


def test_an_undrain_under_way_past_its_timeout_is_killed_and_run_again(world: World) -> None:
    hook = subprocess.Popen(["cat"], stdin=subprocess.PIPE, start_new_session=True)
    try:
        world.left([("nic0", "drain", "starting"), spawned(ProcessToken.of(hook.pid))])
        world.vm_on(world.destination)
        world.clock.advance(3600)  # long past any undrain hook's timeout
        (done,) = world.recover().recovered
        assert hook.wait(30) == -signal.SIGKILL, "its group was killed"
        assert (done.undrained, done.awaited) == (["nic0"], []) and world.undrains("nic0") == 1
    finally:
        if hook.poll() is None:
            hook.kill()
            hook.wait()


def test_an_undrain_that_ended_is_not_run_again(world: World) -> None:
    world.left([("nic0", "drain", "starting"), ("nic0", "undrain", "starting"), ("nic0", "undrain", "done")])
    world.vm_on(world.source)
    (done,) = world.recover().recovered
    assert done.undrained == [] and world.runner.runs == []


def test_the_vm_on_neither_host_is_failed_and_needs_an_admin(world: World) -> None:
    migration_id = world.left([("nic0", "drain", "starting")])
    report = world.recover()
    assert report.recovered[0].outcome == "failed" and int(report.exit_code) == 9
    assert world.undrains("nic0") == 1, "undrained all the same: no workload stays drained"
    world.journal_true(migration_id, Outcome.FAILED)


def test_a_failing_undrain_in_recovery_needs_an_admin(world: World) -> None:
    world.left([("nic0", "drain", "starting")])
    world.vm_on(world.destination)
    world.runner.behaviours[(Trigger.UNDRAIN, "nic0")] = Behaviour(error="exited with status 1")
    report = world.recover()
    assert report.recovered[0].failed == ["nic0"] and int(report.exit_code) == 9


def test_the_journaled_policy_is_the_one_run(world: World) -> None:
    journaled = policy_text().replace(
        'argv = ["/bin/true", "{device_id}"]\non_failure = "continue"',
        'argv = ["/bin/echo", "journaled", "{device_id}"]\non_failure = "continue"',
    )
    world.left([("nic0", "drain", "starting")], policy=journaled)
    world.vm_on(world.destination)
    world.recover()
    (undrain,) = world.runner.of(Trigger.UNDRAIN)
    assert undrain.label == "echo"


def test_a_migration_without_its_policy_is_reported_not_guessed(world: World) -> None:
    world.left([("nic0", "drain", "starting")], policy="")
    with sqlite3.connect(world.path) as conn:
        conn.execute("UPDATE migrations SET policy_text = NULL")
    world.vm_on(world.destination)
    report = world.recover()
    assert report.recovered == [] and "did not journal its policy" in report.skipped[0]["error"]
    assert int(report.exit_code) == 9 and world.runner.runs == []


def test_recovery_waits_for_a_migration_holding_the_vm(world: World) -> None:
    world.left([("nic0", "drain", "starting")])
    world.vm_on(world.destination)
    uuid = world.destination.domains["vm1"].uuid()
    with MigrationLock.acquire(lock_dir(world.path), SRC, uuid, "m-other"):
        report = world.recover()
    assert report.recovered == [] and "m-other" in report.skipped[0]["error"]
    assert world.runner.runs == [], "nothing undrained while another run holds the VM"


# --- a libvirt job the dead orchestrator left running -------------------------------------------


def orphan_job(world: World, downtime_ms: int) -> str:
    """A migration whose orchestrator died while its libvirt job goes on: nic0 was drained."""
    world.source.model = Model(dirty_ms=20, devices=[FakeDevice("nic0")])
    guest = world.source.add("vm1", domain_xml(["nic0"]))
    guest.set_max_downtime(downtime_ms)
    world.source.start_migration(guest, MigrateRequest(DST), world.destination, lambda _error: None)
    return world.left([("nic0", "drain", "starting")])


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
