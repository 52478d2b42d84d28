"""Every path of one migration, on the scripted libvirt (tests/unit/scripted.py): no root, no libvirt.

Each test checks the three facts every path must end with: no device left drained (from the hook
runner's own record), the VM running on exactly one host, and the report/journal telling the truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from unit.scripted import (
    Behaviour,
    FakeClock,
    FakeDevice,
    FakeHost,
    FakeRunner,
    Model,
    assert_invariant,
)

from orchestrator.core.convergence import GATE_FLOOR_MS
from orchestrator.core.errors import BadInput
from orchestrator.core.hooks import Trigger
from orchestrator.core.hypervisor import RUNNING
from orchestrator.core.phases import Phase
from orchestrator.core.policy import DrainMode
from orchestrator.core.policy_toml import parse_policy
from orchestrator.core.records import ActionStatus, DeviceAction, still_drained
from orchestrator.core.report import Outcome, Report
from orchestrator.core.request import Request
from orchestrator.edges.journal import Journal
from orchestrator.edges.locks import MigrationBusy, MigrationLock
from orchestrator.flows import migration as migration_module
from orchestrator.flows.migration import Migration

SRC, DST = "qemu+unix:///system?socket=/src", "qemu+unix:///system?socket=/dst"


def domain_xml(devices: list[str], events: bool = True) -> str:
    args = "".join(
        f"<qemu:arg value='-device'/><qemu:arg value='vfio-pci,id={d},host=0000:5e:00.{i}'/>"
        for i, d in enumerate(devices)
    )
    if events:
        args += "<qemu:arg value='-global'/><qemu:arg value='vfio-pci.migration-events=on'/>"
    return (
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>vm1</name>"
        f"<devices/><qemu:commandline>{args}</qemu:commandline></domain>"
    )


def policy_text(
    drain: str = "prepare", on_failure: str = "abort", extra: str = "", hooks: str = "", drain_hooks: int = 1
) -> str:
    drains = "".join(
        f'[[hooks.drain]]\nname = "drain{i}"\nargv = ["/bin/true", "{{device_id}}"]\n'
        f'timeout_ms = 250\non_failure = "{on_failure}"\n'
        for i in range(drain_hooks)
    )
    return (
        f'[switchover]\ndrain = "{drain}"\n{extra}\n{drains}'
        '[[hooks.undrain]]\nargv = ["/bin/true", "{device_id}"]\non_failure = "continue"\n' + hooks
    )


@dataclass
class World:
    """Two fake hosts, a fake clock, fake hooks and a real journal."""

    clock: FakeClock
    source: FakeHost
    destination: FakeHost
    runner: FakeRunner
    journal: Journal
    migration: Migration | None = None

    def run(
        self,
        policy: str = "",
        model: Model | None = None,
        drain: DrainMode | None = None,
        *,
        place: bool = True,
        **request: Any,
    ) -> Report:
        self.source.model = model or Model()
        devices = [d.device_id for d in self.source.model.devices]
        if place and "vm1" not in self.source.domains:
            self.source.add("vm1", domain_xml(devices))
        req = Request(
            "vm1", SRC, DST, parse_policy(policy or policy_text(), "test.toml"), drain=drain, **request
        )
        self.migration = Migration(
            req, self.source, self.destination, runner=self.runner, clock=self.clock, journal=self.journal
        )
        report = self.migration.run()

        return report

    def where(self) -> list[str]:
        return [
            host.uri
            for host in (self.source, self.destination)
            if host.domains.get("vm1") is not None and host.domains["vm1"].state() == RUNNING
        ]

    def record(self, report: Report) -> Any:
        return self.journal.get_migration(report.migration_id)

    def three_facts(self, report: Report, where: str, drain_hooks: int = 1) -> None:
        """No device left drained, the VM on exactly one host, the journal true."""
        assert_invariant(self.runner, drain_hooks=drain_hooks)
        assert self.where() == [where], self.where()
        record = self.record(report)
        assert record.migration.outcome is report.outcome
        assert still_drained(record.device_actions) == {}
        assert record.migration.phase == Phase.DONE.value
        drained = {r.device_id for r in self.runner.of(Trigger.DRAIN)}
        journaled = {a.device_id for a in record.device_actions if a.action is DeviceAction.DRAIN}
        assert drained == journaled


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = FakeClock()
    with Journal.open(tmp_path / "journal.sqlite") as journal:
        yield World(clock, FakeHost(SRC, clock), FakeHost(DST, clock), FakeRunner(clock), journal)


# --- prepare mode -------------------------------------------------------------------------------


def test_a_devices_last_hook_end_is_journaled_before_the_run_may_settle(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a device's last hook is journaled before the machine learns it: once the machine is
    not busy, the main thread may settle and finish the run log, and a record written after that is
    lost (a fresh-clone run under load showed an undrain `starting` with no end)."""
    seen: list[tuple[str, int]] = []
    record = world.journal.record_device_action

    def recording(migration_id: str, device: str, action: str, status: str, *rest: Any) -> str | None:
        if status in ("done", "failed"):
            assert world.migration is not None
            seen.append((action, world.migration.machine.pending(device)))
        return record(migration_id, device, action, status, *rest)

    monkeypatch.setattr(world.journal, "record_device_action", recording)
    report = world.run()
    assert sorted(seen) == [("drain", 1), ("undrain", 1)], "the hook still counted as running"
    world.three_facts(report, DST)


def test_success_drains_on_prepare_and_undrains_when_the_destination_runs(world: World) -> None:
    report = world.run()
    assert report.outcome is Outcome.SUCCEEDED and report.changed and report.exit_code == 0
    world.three_facts(report, DST)
    (drain,) = world.runner.of(Trigger.DRAIN)
    (undrain,) = world.runner.of(Trigger.UNDRAIN)
    qemu = world.source.migrations[0]
    assert drain.started == qemu.model.devices[0].quiet_at, "drained at the prepare event itself"
    assert drain.values["state"] == "pre-copy-p2p-prepare" and undrain.values["state"] == "running"
    device = report.devices["nic0"]
    assert device.trigger == "prepare" and not device.late
    assert device.lead_ms is not None and device.lead_ms < 0, "a prepare drain races the device"
    record = world.record(report)
    steps = [(a.action, a.status) for a in record.device_actions]
    assert steps == [
        (DeviceAction.DRAIN, ActionStatus.STARTING),
        (DeviceAction.DRAIN, ActionStatus.DONE),
        (DeviceAction.UNDRAIN, ActionStatus.STARTING),
        (DeviceAction.UNDRAIN, ActionStatus.DONE),
    ]
    assert record.migration.policy_sha256 is None  # parsed from text: no file to hash


def test_qemu_10_drains_late_on_the_first_p2p_state(world: World) -> None:
    report = world.run(model=Model(devices=[FakeDevice("nic0", prepare=False)]))
    assert report.outcome is Outcome.SUCCEEDED
    world.three_facts(report, DST)
    assert report.devices["nic0"].late and report.devices["nic0"].trigger == "late"
    (drain,) = world.runner.of(Trigger.DRAIN)
    assert drain.values["state"] == "pre-copy-p2p"


def test_a_failed_transition_rolls_back_and_undrains_on_the_source(world: World) -> None:
    report = world.run(model=Model(fail_transition="running"))
    assert report.outcome is Outcome.ROLLED_BACK and report.exit_code == 4 and not report.changed
    world.three_facts(report, SRC)
    (undrain,) = world.runner.of(Trigger.UNDRAIN)
    assert report.devices["nic0"].undrain_reason.startswith("running on the source")
    assert undrain.values["state"] == "running"


def test_the_destination_dying_at_switchover_rolls_back(world: World) -> None:
    report = world.run(model=Model(destination_dies=True))
    assert report.outcome is Outcome.ROLLED_BACK
    world.three_facts(report, SRC)


def test_a_completion_timeout_aborts_before_any_drain(world: World) -> None:
    policy = policy_text(extra="") + "[migration]\ncompletion_timeout_s = 2\n"
    report = world.run(policy, model=Model(dirty_ms=10_000))
    assert report.outcome is Outcome.ROLLED_BACK and "completion timeout" in (report.error or "")
    world.three_facts(report, SRC)
    assert world.runner.of(Trigger.DRAIN) == []
    assert world.clock.now < 3.0


@pytest.mark.parametrize(
    ("behaviour", "on_failure", "outcome", "where"),
    [
        (Behaviour(error="exited with status 1"), "abort", Outcome.ABORTED, SRC),
        (Behaviour(timed_out=True, duration_s=0.25), "abort", Outcome.ABORTED, SRC),
        (Behaviour(error="exited with status 1"), "continue", Outcome.SUCCEEDED, DST),
    ],
    ids=["fails-abort", "times-out-abort", "fails-continue"],
)
def test_a_failing_drain_hook(
    world: World, behaviour: Behaviour, on_failure: str, outcome: Outcome, where: str
) -> None:
    world.runner.behaviours[(Trigger.DRAIN, None)] = behaviour
    report = world.run(
        policy_text(on_failure=on_failure), model=Model(devices=[FakeDevice("nic0", transition_s=1.0)])
    )
    assert report.outcome is outcome, report.error
    world.three_facts(report, where)
    assert report.devices["nic0"].drain_ok is False
    if outcome is Outcome.ABORTED:
        assert report.exit_code == 5 and "drain hook drain0 for nic0 failed" in (report.error or "")


def test_a_missing_hook_program_is_refused_before_anything_changes(world: World) -> None:
    policy = '[[hooks.drain]]\nargv = ["/no/such/drain-hook"]\n'
    with pytest.raises(BadInput, match="/no/such/drain-hook"):
        world.run(policy)
    assert world.runner.runs == [] and world.source.migrations == []
    assert world.where() == [SRC]


def test_a_running_event_that_never_comes_is_a_forced_undrain(world: World) -> None:
    report = world.run(model=Model(never_resumes={"nic0"}))
    assert report.outcome is Outcome.SUCCEEDED
    world.three_facts(report, DST)
    assert report.devices["nic0"].undrain_reason == "forced at the end of the migration"
    assert any("no 'running' event for nic0" in note for note in report.notes)


def test_two_devices_transition_in_turn_and_are_tracked_apart(world: World) -> None:
    model = Model(devices=[FakeDevice("nic0", transition_s=0.2), FakeDevice("nic1", transition_s=0.2)])
    report = world.run(model=model)
    assert report.outcome is Outcome.SUCCEEDED
    world.three_facts(report, DST)
    drains = {r.device_id: r.started for r in world.runner.of(Trigger.DRAIN)}
    assert drains["nic1"] - drains["nic0"] == pytest.approx(0.2)


def test_two_drain_hooks_per_device_undrain_after_both(world: World) -> None:
    world.runner.behaviours[(Trigger.DRAIN, None)] = Behaviour(duration_s=0.05)
    report = world.run(policy_text(drain_hooks=2))
    assert report.outcome is Outcome.SUCCEEDED
    world.three_facts(report, DST, drain_hooks=2)


def test_an_undrain_waits_for_a_slow_drain(world: World) -> None:
    # The drain outlasts the whole switchover: the destination runs before the drain hook ends.
    world.runner.behaviours[(Trigger.DRAIN, None)] = Behaviour(duration_s=0.2)
    model = Model(devices=[FakeDevice("nic0", transition_s=0.01)], complete_s=0.01)
    report = world.run(model=model)
    assert report.outcome is Outcome.SUCCEEDED
    world.three_facts(report, DST)


def test_a_failing_undrain_needs_an_admin(world: World) -> None:
    world.runner.behaviours[(Trigger.UNDRAIN, None)] = Behaviour(error="exited with status 3")
    report = world.run()
    assert report.outcome is Outcome.SUCCEEDED and report.undrain_failed and report.exit_code == 9
    assert_invariant(world.runner)
    said = "the undrain of nic0 failed: its workloads may still be drained"
    assert report.error == said and world.record(report).migration.error == said, "history says it too"


def test_a_failed_drain_then_a_failed_undrain_is_an_abort_that_says_both(world: World) -> None:
    """rdma-drain without reachable peers: its drain fails (abort), its undrain too."""
    world.runner.behaviours[(Trigger.DRAIN, None)] = Behaviour(error="answered fail: no peer answered")
    world.runner.behaviours[(Trigger.UNDRAIN, None)] = Behaviour(error="answered fail: no peer answered")
    report = world.run(policy_text(drain="gated"), model=Model(dirty_ms=20))
    assert report.outcome is Outcome.ABORTED and report.exit_code == 9 and report.location == "source"
    error = world.record(report).migration.error or ""
    assert error.startswith("drain hook drain0 for nic0 failed") and error.endswith(
        "the undrain of nic0 failed: its workloads may still be drained"
    ), error


# --- interrupts at each phase -------------------------------------------------------------------


def interrupt_when(world: World, predicate: Any) -> None:
    """Interrupt the migration (as SIGTERM's thread would) the first time a hook starts that matches."""
    fired: list[bool] = []

    def on_start(run: Any) -> None:
        if not fired and predicate(run):
            fired.append(True)
            assert world.migration is not None
            world.migration.interrupt("SIGTERM")

    world.runner.on_start = on_start


BEFORE = '[[hooks.before]]\nargv = ["/bin/true"]\n'


@pytest.mark.parametrize(
    ("drain", "phase_trigger", "drained"),
    [
        ("prepare", Trigger.BEFORE, False),
        ("start", Trigger.DRAIN, True),
        ("prepare", Trigger.DRAIN, True),
        ("prepare", Trigger.UNDRAIN, True),
    ],
    ids=["before-hooks", "draining-ahead", "switching-over", "settling"],
)
def test_sigterm_at_each_phase_leaves_nothing_drained(
    world: World, drain: str, phase_trigger: Trigger, drained: bool
) -> None:
    interrupt_when(world, lambda run: run.trigger is phase_trigger)
    report = world.run(
        policy_text(drain=drain, hooks=BEFORE), model=Model(devices=[FakeDevice("nic0", transition_s=1.0)])
    )
    assert_invariant(world.runner)
    assert bool(world.runner.of(Trigger.DRAIN)) is drained
    if phase_trigger is Trigger.UNDRAIN:  # too late to stop it: the VM moved
        assert report.outcome is Outcome.SUCCEEDED
        world.three_facts(report, DST)
    else:
        assert report.outcome is Outcome.INTERRUPTED and report.exit_code == 130
        world.three_facts(report, SRC)


def test_sigterm_in_pre_copy_aborts_the_job_before_any_drain(world: World) -> None:
    world.clock.at(1.2, lambda: world.migration.interrupt("SIGINT") if world.migration else None)
    report = world.run(model=Model(dirty_ms=10_000))
    assert report.outcome is Outcome.INTERRUPTED
    world.three_facts(report, SRC)
    assert world.runner.of(Trigger.DRAIN) == []
    assert world.source.migrations[0].cancelled


def test_a_storm_of_interrupts_is_one_abort(world: World) -> None:
    for at in (1.0, 1.01, 1.02, 1.5):
        world.clock.at(at, lambda: world.migration.interrupt("SIGTERM") if world.migration else None)
    report = world.run(model=Model(dirty_ms=10_000))
    assert report.outcome is Outcome.INTERRUPTED
    assert sum(entry.text.startswith("aborting") for entry in report.timeline) == 1
    assert not any("aborting" in note for note in report.notes), "the error says it; no duplicate note"
    world.three_facts(report, SRC)


# --- unexpected orders, duplicates, events of others --------------------------------------------

SCRIPTS: dict[str, tuple[list[tuple[float, tuple[Any, ...]]], Outcome, str]] = {
    "duplicate prepare drains once": (
        [
            (0.1, ("vfio", "src", "nic0", "pre-copy")),
            (0.2, ("vfio", "src", "nic0", "pre-copy-p2p-prepare")),
            (0.0, ("vfio", "src", "nic0", "pre-copy-p2p-prepare")),
            (0.3, ("vfio", "src", "nic0", "pre-copy-p2p")),
            (0.1, ("end", None)),
            (0.0, ("vfio", "dst", "nic0", "running")),
            (0.0, ("vfio", "dst", "nic0", "running")),
        ],
        Outcome.SUCCEEDED,
        DST,
    ),
    "a late prepare after the undrain never drains again": (
        [
            (0.1, ("vfio", "src", "nic0", "pre-copy-p2p-prepare")),
            (0.3, ("vfio", "src", "nic0", "running")),
            (0.1, ("vfio", "src", "nic0", "pre-copy-p2p-prepare")),
            (0.1, ("end", "operation failed: migration failed")),
        ],
        Outcome.ROLLED_BACK,
        SRC,
    ),
    "destination running before the source's prepare (events on two connections)": (
        [
            (0.1, ("vfio", "dst", "nic0", "resuming")),
            (0.2, ("vfio", "dst", "nic0", "running")),
            (0.0, ("vfio", "src", "nic0", "pre-copy-p2p-prepare")),
            (0.0, ("end", None)),
        ],
        Outcome.SUCCEEDED,
        DST,
    ),
    "a newer QEMU's running-p2p-prepare drains like any prepare": (
        [
            (0.1, ("vfio", "src", "nic0", "running-p2p-prepare")),
            (0.3, ("vfio", "src", "nic0", "running-p2p")),
            (0.0, ("vfio", "src", "nic0", "some-future-state")),
            (0.1, ("end", None)),
            (0.0, ("vfio", "dst", "nic0", "running")),
        ],
        Outcome.SUCCEEDED,
        DST,
    ),
    "interleaved devices": (
        [
            (0.1, ("vfio", "src", "nic1", "pre-copy")),
            (0.0, ("vfio", "src", "nic0", "pre-copy")),
            (0.1, ("vfio", "src", "nic1", "pre-copy-p2p-prepare")),
            (0.0, ("vfio", "src", "nic0", "stop-copy")),
            (0.1, ("vfio", "dst", "nic0", "running")),
            (0.1, ("vfio", "src", "nic1", "pre-copy-p2p")),
            (0.1, ("end", None)),
            (0.0, ("vfio", "dst", "nic1", "running")),
        ],
        Outcome.SUCCEEDED,
        DST,
    ),
    "the job fails before any device left running: nothing to undrain": (
        [(0.3, ("end", "unable to connect to the destination"))],
        Outcome.ROLLED_BACK,
        SRC,
    ),
}


@pytest.mark.parametrize(("script", "outcome", "where"), SCRIPTS.values(), ids=SCRIPTS.keys())
def test_scripted_event_orders(world: World, script: Any, outcome: Outcome, where: str) -> None:
    devices = [FakeDevice("nic0"), FakeDevice("nic1")]
    report = world.run(model=Model(devices=devices, script=script))
    assert report.outcome is outcome, report.error
    world.three_facts(report, where)


def test_events_before_our_job_starts_are_not_ours(world: World) -> None:
    # Another migration's events (a second run of the same VM) arrive while our before hook runs.
    def foreign(run: Any) -> None:
        if run.trigger is Trigger.BEFORE:
            world.source.emit(
                "vm1", "VFIO_MIGRATION", {"device-id": "nic0", "device-state": "pre-copy-p2p-prepare"}
            )

    world.runner.on_start = foreign
    report = world.run(policy_text(hooks=BEFORE), model=Model(dirty_ms=10, devices=[FakeDevice("nic0")]))
    assert report.outcome is Outcome.SUCCEEDED
    (drain,) = world.runner.of(Trigger.DRAIN)
    assert (
        drain.values["state"] == "pre-copy-p2p-prepare" and drain.started > world.source.migrations[0].started
    )
    world.three_facts(report, DST)


# --- gated and start modes ----------------------------------------------------------------------


def test_gated_drains_every_device_before_releasing_the_switchover(world: World) -> None:
    model = Model(devices=[FakeDevice("nic0"), FakeDevice("nic1")], dirty_ms=20)
    report = world.run(policy_text(drain="gated"), model=model)
    assert report.outcome is Outcome.SUCCEEDED and report.gate == "opened"
    world.three_facts(report, DST)
    dom_log = world.source.migrations[0].dom.downtime_log
    assert dom_log[0][1] == GATE_FLOOR_MS, "the job starts with the downtime limit at its floor"
    released_at = next(t for t, ms in dom_log if ms == 300)
    for run in world.runner.of(Trigger.DRAIN):
        assert run.ended is not None and run.ended <= released_at
        assert run.values["state"] == "gate"
    for device in model.devices:
        assert device.quiet_at is not None and device.quiet_at > released_at
        record = report.devices[device.device_id]
        assert record.trigger == "gate" and record.lead_ms is not None and record.lead_ms > 0


def test_gated_on_qemu_10_still_drains_ahead(world: World) -> None:
    model = Model(devices=[FakeDevice("nic0", prepare=False)])
    report = world.run(policy_text(drain="gated"), model=model)
    assert report.outcome is Outcome.SUCCEEDED and report.gate == "opened"
    assert report.devices["nic0"].trigger == "gate" and not report.devices["nic0"].late
    world.three_facts(report, DST)


def test_gated_idle_guest_passes_the_gate_early_and_drains_on_prepare(world: World) -> None:
    report = world.run(policy_text(drain="gated"), model=Model(dirty_ms=0))
    assert report.outcome is Outcome.SUCCEEDED and report.gate == "passed early"
    assert report.devices["nic0"].trigger == "prepare (gate passed early)"
    world.three_facts(report, DST)


def test_gated_failing_drain_aborts_before_any_device_goes_quiet(world: World) -> None:
    world.runner.behaviours[(Trigger.DRAIN, "nic1")] = Behaviour(error="exited with status 1")
    model = Model(devices=[FakeDevice("nic0"), FakeDevice("nic1")], dirty_ms=20)
    report = world.run(policy_text(drain="gated"), model=model)
    assert report.outcome is Outcome.ABORTED, report.error
    assert all(device.quiet_at is None for device in model.devices), "nothing went quiet"
    assert [ms for _t, ms in world.source.migrations[0].dom.downtime_log] == [GATE_FLOOR_MS], "never released"
    world.three_facts(report, SRC)


def test_gated_drain_timing_out_with_continue_still_opens(world: World) -> None:
    world.runner.behaviours[(Trigger.DRAIN, None)] = Behaviour(timed_out=True, duration_s=0.25)
    report = world.run(policy_text(drain="gated", on_failure="continue"), model=Model(dirty_ms=20))
    assert report.outcome is Outcome.SUCCEEDED and report.gate == "opened"
    world.three_facts(report, DST)


def test_start_mode_drains_before_the_job_and_undrains_when_the_device_runs(world: World) -> None:
    report = world.run(policy_text(drain="start"))
    assert report.outcome is Outcome.SUCCEEDED
    world.three_facts(report, DST)
    (drain,) = world.runner.of(Trigger.DRAIN)
    assert drain.ended is not None and drain.ended <= world.source.migrations[0].started
    assert report.devices["nic0"].drained_ms is not None and report.devices["nic0"].drained_ms > 0


def test_start_mode_failing_drain_never_starts_the_job(world: World) -> None:
    world.runner.behaviours[(Trigger.DRAIN, None)] = Behaviour(error="exited with status 2")
    report = world.run(policy_text(drain="start"))
    assert report.outcome is Outcome.ABORTED and world.source.migrations == []
    world.three_facts(report, SRC)


def test_start_mode_job_failing_at_once_undrains_without_waiting(world: World) -> None:
    report = world.run(policy_text(drain="start"), model=Model(script=[(0.2, ("end", "unable to connect"))]))
    assert report.outcome is Outcome.ROLLED_BACK
    world.three_facts(report, SRC)
    assert world.clock.now < 2.0, "no settle wait for an event that cannot come"


def test_the_cli_drain_option_overrides_the_policy(world: World) -> None:
    report = world.run(policy_text(drain="prepare"), model=Model(dirty_ms=20), drain=DrainMode.GATED)
    assert report.drain_mode == "gated" and report.gate == "opened"
    world.three_facts(report, DST)


# --- the convergence schedule -------------------------------------------------------------------


def test_downtime_steps_apply_at_their_times_and_passes(world: World) -> None:
    steps = (
        "[[switchover.steps]]\ndowntime_ms = 50\n"
        "[[switchover.steps]]\nafter_s = 2\ndowntime_ms = 100\n"
        "[[switchover.steps]]\nafter_iterations = 8\ndowntime_ms = 400\n"
    )
    report = world.run(policy_text(extra=steps), model=Model(dirty_ms=300, pass_s=0.5))
    assert report.outcome is Outcome.SUCCEEDED
    log = world.source.migrations[0].dom.downtime_log
    started = world.source.migrations[0].started
    assert [ms for _t, ms in log] == [50, 100, 400]
    assert log[1][0] - started == pytest.approx(2.0, abs=0.11)
    assert log[2][0] - started == pytest.approx(3.5, abs=0.11), "8 passes of 0.5 s, counting from 1"
    assert any("downtime limit 400 ms (step 3/3 (after 8 passes))" in e.text for e in report.timeline)
    world.three_facts(report, DST)


def test_max_downtime_caps_every_step(world: World) -> None:
    from dataclasses import replace

    policy = parse_policy(policy_text(extra="[[switchover.steps]]\ndowntime_ms = 500\n"), "t.toml")
    settings = replace(policy.migration, max_downtime_ms=100)
    world.source.model = Model(dirty_ms=50)
    world.source.add("vm1", domain_xml(["nic0"]))
    world.migration = Migration(
        Request("vm1", SRC, DST, policy, settings=settings),
        world.source,
        world.destination,
        runner=world.runner,
        clock=world.clock,
        journal=world.journal,
    )
    report = world.migration.run()
    assert report.outcome is Outcome.SUCCEEDED
    assert [ms for _t, ms in world.source.migrations[0].dom.downtime_log] == [100]


def test_a_stalled_migration_is_aborted(world: World) -> None:
    policy = policy_text(extra="stall_timeout_s = 3\n")
    # The fake's remaining data reaches 0 after the first pass and never gets lower: a stall.
    report = world.run(policy, model=Model(dirty_ms=10_000))
    assert report.outcome is Outcome.ROLLED_BACK and "stalled" in (report.error or "")
    world.three_facts(report, SRC)


# --- where the VM runs decides the outcome ------------------------------------------------------


def test_a_failed_job_with_the_vm_gone_from_both_hosts_is_failed_not_rolled_back(world: World) -> None:
    def vanish() -> None:
        world.source.domains.pop("vm1", None)

    model = Model(script=[(0.5, ("end", "Unable to read from monitor: Connection reset by peer"))])
    world.clock.at(0.4, vanish)
    report = world.run(model=model)
    assert report.outcome is Outcome.FAILED and report.exit_code == 9
    assert "neither host" in (report.error or "")


def test_already_on_the_destination_is_unchanged(world: World) -> None:
    world.destination.add("vm1", domain_xml(["nic0"]))
    report = world.run(place=False)
    assert report.outcome is Outcome.UNCHANGED and not report.changed and report.exit_code == 0
    assert world.runner.runs == []


def test_dry_run_plans_and_changes_nothing(world: World) -> None:
    report = world.run(policy_text(drain="gated"), dry_run=True)
    assert report.outcome is Outcome.PLANNED and world.source.migrations == [] and world.runner.runs == []
    assert any(line.startswith("drain gated:") for line in report.plan)
    assert any(line.startswith("downtime limit: 1 ms (the gate's floor) until") for line in report.plan)
    assert world.journal.list_migrations() == [], "a dry run writes nothing, the journal included"


def test_an_active_libvirt_job_is_refused(world: World) -> None:
    world.source.model = Model(dirty_ms=10_000)
    guest = world.source.add("vm1", domain_xml(["nic0"]))
    from orchestrator.core.hypervisor import MigrateRequest

    world.source.start_migration(guest, MigrateRequest(DST), world.destination, lambda _e: None)
    with pytest.raises(BadInput, match="already has a libvirt job"):
        world.run()


def test_settle_is_bounded(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration_module, "SETTLE_S", 2.0)
    report = world.run(model=Model(never_resumes={"nic0"}))
    assert report.devices["nic0"].undrain_reason == "forced at the end of the migration"
    assert world.clock.now < 10


# --- armed hooks --------------------------------------------------------------------------------

ARMED_POLICY = """
[switchover]
drain = "{drain}"
[[hooks.drain]]
argv = ["/bin/true", "serve"]
armed = true
timeout_ms = 250
on_failure = "abort"
[[hooks.undrain]]
argv = ["/bin/true", "serve"]
armed = true
on_failure = "continue"
"""


@pytest.mark.parametrize("drain", ["prepare", "gated"])
def test_armed_hooks_are_started_with_the_migration_and_woken_per_device(world: World, drain: str) -> None:
    model = Model(devices=[FakeDevice("nic0"), FakeDevice("nic1")], dirty_ms=20)
    report = world.run(ARMED_POLICY.format(drain=drain), model=model)
    assert report.outcome is Outcome.SUCCEEDED
    world.three_facts(report, DST)
    drain_hook, undrain_hook = world.runner.armed
    assert drain_hook.closed and undrain_hook.closed, "stdin closed when the migration ends"
    assert sorted(line.split()[1] for line in drain_hook.lines) == ["nic0", "nic1"]
    assert all(line.startswith("undrain ") for line in undrain_hook.lines)
    arming = [h for h in report.hooks if h.device_id is None]
    assert len(arming) == 2 and all(h.ok for h in arming)


def test_an_armed_hook_that_cannot_arm_aborts_before_the_job(world: World) -> None:
    world.runner.arming = Behaviour(error="armed hook did not arm: exited with status 1")
    report = world.run(ARMED_POLICY.format(drain="prepare"))
    assert report.outcome is Outcome.ABORTED and world.source.migrations == []
    assert "did not arm" in (report.error or "")
    world.three_facts(report, SRC)


def test_the_destination_is_followed_by_object_once_the_incoming_domain_exists(world: World) -> None:
    kinds: list[str] = []
    subscribe = world.destination.subscribe_monitor_events

    def spy(callback: Any, *, events: Any = None, domain: Any = None, dom: Any = None) -> Any:
        kinds.append("by object" if dom is not None else "by name")
        return subscribe(callback, events=events, domain=domain, dom=dom)

    world.destination.subscribe_monitor_events = spy  # type: ignore[method-assign]
    report = world.run()
    assert report.outcome is Outcome.SUCCEEDED
    assert kinds == ["by name", "by object"]
    assert len(world.destination.subscribers) == 0, "both cancelled at the end"
    arrivals = [e.text for e in report.timeline if e.host == "destination" and e.kind == "event"]
    assert arrivals.count("nic0 -> running") == 1 and arrivals.count("RESUME") == 1
    world.three_facts(report, DST)


def test_an_event_delivered_through_both_destination_subscriptions_counts_once() -> None:
    from orchestrator.flows.subscriptions import _Arrivals

    delivered: list[tuple[str, int, int]] = []
    arrivals = _Arrivals(lambda _dom, name, s, us, _data: delivered.append((name, s, us)))
    running = {"device-id": "nic0", "device-state": "running"}
    for _subscription in ("by name", "by object"):
        arrivals("vm1", "VFIO_MIGRATION", 10, 5, running)
    arrivals("vm1", "VFIO_MIGRATION", 10, 5, {**running, "device-state": "running-p2p"})  # same instant
    arrivals("vm1", "RESUME", 10, 5, None)
    assert delivered == [("VFIO_MIGRATION", 10, 5), ("VFIO_MIGRATION", 10, 5), ("RESUME", 10, 5)]


@pytest.mark.parametrize(
    ("source", "destination", "p2p", "why"),
    [
        ("qemu:///system", "qemu+ssh://localhost/system", True, "source host itself"),
        ("qemu+ssh://a/system", "qemu+ssh://127.0.0.1/system", True, "source host itself"),
        ("qemu+ssh://a/system", "qemu+tcp://[::1]/system", True, "source host itself"),
        ("qemu:///system", "qemu+ssh://ctl1/system", True, "this machine"),
        ("qemu:///system", "qemu+ssh://ctl1.example.net/system", False, "this machine"),
        ("qemu:///system", "qemu+ssh://localhost/system", False, "this machine"),
        ("qemu+ssh://a/system", "qemu+ssh://localhost/system", False, None),  # direct: localhost is here
        ("qemu+ssh://a/system", "qemu+ssh://ctl1/system", True, None),  # the source is elsewhere
        ("qemu:///system", "qemu+ssh://b/system", True, None),
        ("qemu:///system", "qemu+unix:///system?socket=/run/b/libvirt-sock", True, None),
    ],
)
def test_a_destination_naming_the_source_machine_is_caught_in_pre_flight(
    source: str, destination: str, p2p: bool, why: str | None
) -> None:
    from orchestrator.core.request import same_machine

    found = same_machine(source, destination, p2p=p2p, names=("ctl1", "ctl1.example.net"))
    assert (found is None) if why is None else (found is not None and why in found)


def test_a_run_refused_by_the_lock_of_another_is_journaled_refused(world: World, tmp_path: Path) -> None:
    """Another run holds the VM's lock (in its before hooks: no libvirt job yet): this one is refused,
    exit 2, naming it, and `history` shows the refusal, not nothing."""
    world.source.model = Model()
    world.source.add("vm1", domain_xml(["nic0"]))
    locks = tmp_path / "locks"
    locks.mkdir()
    uuid = world.source.domains["vm1"].uuid()
    request = Request("vm1", SRC, DST, parse_policy(policy_text(), "test.toml"))
    with MigrationLock.acquire(locks, uuid, "m-first", domain="vm1", source=SRC):
        migration = Migration(
            request,
            world.source,
            world.destination,
            runner=world.runner,
            clock=world.clock,
            journal=world.journal,
            lock_dir=locks,
        )
        with pytest.raises(MigrationBusy) as busy:
            migration.run()

    assert int(busy.value.code) == 2 and "m-first" in busy.value.line() and "vm1 (UUID" in busy.value.line()
    record = world.journal.get_migration(migration.report.migration_id)
    assert record.migration.outcome is Outcome.REFUSED and record.migration.exit_code == 2
    assert record.migration.error == busy.value.line() and record.device_actions == ()
    assert world.runner.runs == [] and world.source.migrations == [] and world.where() == [SRC]


def test_events_that_need_no_action_are_all_recorded_in_their_order_after_the_next_drain_starts(
    world: World,
) -> None:
    # Three devices in turn: each device's P2P state is followed at once by the next one's prepare
    # event. The P2P state is recorded after that drain started (it must not delay it), and in the end
    # the journal and the timeline hold every event, in the order QEMU sent them.
    sent: list[tuple[str, str]] = []
    for host in (world.source, world.destination):

        def emit(domain: str, name: str, data: Any = None, _emit: Any = host.emit) -> None:
            if name == "VFIO_MIGRATION":
                sent.append((data["device-id"], data["device-state"]))
            _emit(domain, name, data)

        host.emit = emit  # type: ignore[method-assign]
    report = world.run(model=Model(devices=[FakeDevice("nic0"), FakeDevice("nic1"), FakeDevice("nic2")]))
    assert report.outcome is Outcome.SUCCEEDED
    world.three_facts(report, DST)
    record = world.record(report)
    journaled = [(e.device_id, e.state) for e in record.events if e.kind == "vfio"]
    assert journaled == sent and len(sent) >= 15, "every event journaled, in the order sent"
    timeline = [e.text for e in report.timeline if e.kind == "event" and " -> " in e.text]
    assert timeline == [f"{device} -> {state}" for device, state in sent]
    seq = {(e.device_id, e.state): e.seq for e in record.events if e.kind == "vfio"}
    (started,) = [
        a
        for a in record.device_actions
        if (a.device_id, a.action, a.status) == ("nic1", DeviceAction.DRAIN, ActionStatus.STARTING)
    ]
    assert started.seq < seq[("nic0", "pre-copy-p2p")] < seq[("nic1", "pre-copy-p2p-prepare")]


# --- the report states only what happened ----------------------------------------------------------


def test_a_policy_without_drain_hooks_reports_no_drain(world: World) -> None:
    report = world.run(policy_text(drain_hooks=0))
    device = report.devices["nic0"]
    assert device.trigger == "observed only" and world.runner.of(Trigger.DRAIN) == []
    assert (device.drain_started, device.drain_finished, device.drain_ok, device.lead_ms) == (None,) * 4
    assert device.to_json()["drained_ms"] is None


def test_a_failed_drain_reports_no_lead_and_no_drained_time(world: World) -> None:
    world.runner.behaviours[(Trigger.DRAIN, None)] = Behaviour(error="exited with status 3")
    report = world.run(policy_text(on_failure="continue"))
    device = report.devices["nic0"]
    assert device.drain_ok is False and device.drain_finished is not None
    assert device.lead_ms is None and device.drained_ms is None


@pytest.mark.parametrize(
    ("drain", "bounds"),
    [
        # Gated: the gate's release precedes every transition; then each device's P2P state the next's.
        ("gated", [("at least", "the gate's release"), ("at least", "the previous device's P2P state")]),
        # On the prepare event alone: nothing known before the first device's transition.
        (
            "prepare",
            [
                ("at most", "its first P2P state, once the transition had ended"),
                ("at least", "the previous device's P2P state"),
            ],
        ),
    ],
)
def test_on_qemu_10_the_quiet_time_is_the_earliest_known_bound_and_says_so(
    world: World, drain: str, bounds: list[tuple[str, str]]
) -> None:
    devices = [FakeDevice("nic0", prepare=False), FakeDevice("nic1", prepare=False)]
    report = world.run(policy_text(drain=drain), model=Model(devices=devices))
    assert report.outcome is Outcome.SUCCEEDED
    seen = [(report.devices[d].quiet_bound, report.devices[d].quiet_source) for d in ("nic0", "nic1")]
    assert seen == bounds
    first_p2p = [e.at for e in report.timeline if e.text == "nic0 -> pre-copy-p2p"]
    assert report.devices["nic1"].quiet_at == first_p2p[0], "nic1's transition began after nic0's ended"


def test_an_early_pass_of_the_gate_is_said_of_every_device(world: World) -> None:
    devices = [FakeDevice("nic0"), FakeDevice("nic1")]
    report = world.run(policy_text(drain="gated"), model=Model(devices=devices, dirty_ms=0))
    assert report.gate == "passed early"
    assert {d.trigger for d in report.devices.values()} == {"prepare (gate passed early)"}


def test_the_gate_drains_a_device_known_only_from_its_events(world: World) -> None:
    """The domain XML lists no VFIO device (added another way): its pre-copy event makes it known,
    and the gate drains it before releasing QEMU, not on its prepare event."""
    world.source.add("vm1", domain_xml([]))  # -global migration-events=on, no device listed
    report = world.run(policy_text(drain="gated"), place=False)
    assert report.outcome is Outcome.SUCCEEDED and report.gate == "opened"
    assert report.devices["nic0"].trigger == "gate"
    assert any("draining 1 device(s)" in e.text for e in report.timeline)
    world.three_facts(report, DST)


def test_a_device_left_undrained_by_an_abort_is_said_once(world: World) -> None:
    """nic0's drain fails (abort) while QEMU goes on switching over: nic1's prepare, then its P2P state,
    come while the job is being aborted; that nic1 was not drained is said once, not per event."""
    world.runner.behaviours[(Trigger.DRAIN, "nic0")] = Behaviour(
        error="exited with status 3", duration_s=0.01
    )
    script = [
        (0.1, ("vfio", "src", "nic0", "pre-copy")),
        (0.0, ("vfio", "src", "nic1", "pre-copy")),
        (0.2, ("vfio", "src", "nic0", "pre-copy-p2p-prepare")),
        (0.3, ("vfio", "src", "nic0", "pre-copy-p2p")),
        (0.0, ("vfio", "src", "nic1", "pre-copy-p2p-prepare")),
        (0.3, ("vfio", "src", "nic1", "pre-copy-p2p")),
        (0.1, ("end", "operation aborted: canceled by client")),
        (0.0, ("vfio", "src", "nic0", "running")),
        (0.0, ("vfio", "src", "nic1", "running")),
    ]
    devices = [FakeDevice("nic0"), FakeDevice("nic1")]
    report = world.run(model=Model(devices=devices, script=script, ignores_cancel=True))
    assert report.outcome is Outcome.ABORTED
    said = [n for n in report.notes if n.startswith("nic1 not drained")]
    assert len(said) == 1, report.notes
    world.three_facts(report, SRC)


def test_qemus_first_design_a_prepare_event_of_its_own_drains_on_it(world: World) -> None:
    data = {"device-id": "nic0", "qom-path": "/machine/peripheral/nic0"}
    script = [
        (0.1, ("vfio", "src", "nic0", "pre-copy")),
        (0.2, ("qemu", "src", "VFIO_MIGRATION_PREPARE", {**data, "device-state": "pre-copy-p2p"})),
        (0.3, ("vfio", "src", "nic0", "pre-copy-p2p")),
        (0.1, ("end", None)),
        (0.0, ("vfio", "dst", "nic0", "running")),
    ]
    report = world.run(model=Model(script=script))
    assert report.outcome is Outcome.SUCCEEDED
    device = report.devices["nic0"]
    assert (device.trigger, device.late, device.quiet_bound) == ("prepare", False, "exact")
    (drain,) = world.runner.of(Trigger.DRAIN)
    assert drain.values["state"] == "pre-copy-p2p-prepare"
    world.three_facts(report, DST)
