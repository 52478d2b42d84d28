"""Table-driven tests of the phase machine (orchestrator/core/phases.py) and the convergence schedule.

The decisions of one migration from its events: drain at the first signal that a device goes quiet,
undrain when it runs again, each exactly once per migration; the outcome from the facts; the phase table.
"""

from __future__ import annotations

import pytest

from orchestrator.core.convergence import GATE_FLOOR_MS, Schedule, StallDetector, would_converge
from orchestrator.core.hooks import Trigger
from orchestrator.core.hypervisor import JobStats, SystemClock
from orchestrator.core.phases import (
    NEXT_PHASES,
    JobState,
    Location,
    MigrationMachine,
    Phase,
    RunHooks,
    decide_outcome,
)
from orchestrator.core.policy import DowntimeStep, DrainMode, MigrationSettings, Switchover
from orchestrator.core.report import Outcome
from orchestrator.core.vfio import Role, VfioEvent

_ROLES = {"src": Role.SOURCE, "dst": Role.DESTINATION}


def event(role: Role, device_id: str, state: str, t: float = 0.0) -> VfioEvent:
    return VfioEvent(str(role), role, "vm1", device_id, f"/machine/peripheral/{device_id}", state, t, t)


# Each step: "<src|dst> <device id> <state> [drain|late-drain|undrain] [unexpected]".
# The sequences are those of QEMU's hw/vfio/migration.c, as LAB.md lists them.
SEQUENCES: dict[str, list[str]] = {
    "QEMU 11.0, precopy + P2P: drain on prepare, undrain when the destination runs": [
        "src nic0 pre-copy",
        "dst nic0 resuming",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "dst nic0 running-p2p",
        "dst nic0 running undrain",
        "src nic0 stop",
    ],
    "QEMU 10.x, no prepare: late drain on pre-copy-p2p": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p late-drain",
        "src nic0 stop-copy",
        "dst nic0 resuming",
        "dst nic0 running-p2p",
        "dst nic0 running undrain",
        "src nic0 stop",
    ],
    "no precopy: late drain on running-p2p": [
        "src nic0 running-p2p late-drain",
        "src nic0 stop-copy",
        "src nic0 stop",
        "dst nic0 resuming",
        "dst nic0 running-p2p",
        "dst nic0 running undrain",
    ],
    "precopy, no P2P: late drain on stop-copy": [
        "src nic0 pre-copy",
        "src nic0 stop-copy late-drain",
        "src nic0 stop",
        "dst nic0 resuming",
        "dst nic0 running undrain",
    ],
    "neither precopy nor P2P: late drain on stop-copy": [
        "src nic0 stop-copy late-drain",
        "dst nic0 resuming",
        "dst nic0 running undrain",
        "src nic0 stop",
    ],
    "migration fails after the drain: undrain when the source runs again": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "src nic0 running undrain",
    ],
    "failed transition: prepare falls back to running": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 running undrain",
    ],
    "failed transition: prepare goes to another state, already drained": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 stop-copy",
        "src nic0 running undrain",
    ],
    "cancelled in pre-copy before any drain: nothing to undrain": [
        "src nic0 pre-copy",
        "dst nic0 resuming",
        "src nic0 running",
        "dst nic0 stop",
    ],
    "duplicate prepare: a single drain": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p-prepare",
        "src nic0 pre-copy-p2p",
        "dst nic0 running-p2p unexpected",
        "dst nic0 running undrain",
    ],
    "undrain exactly once, even with running repeated on both ends": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "dst nic0 resuming",
        "dst nic0 running undrain",
        "dst nic0 running unexpected",
        "src nic0 running",
        "src nic0 running",
    ],
    "source events delivered after the destination runs do not drain again": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "dst nic0 resuming",
        "dst nic0 running undrain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "src nic0 stop",
    ],
    "a late prepare after the undrain never drains again (one drain per migration)": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 running undrain",
        "src nic0 pre-copy",
        "dst nic0 resuming",
        "src nic0 pre-copy-p2p-prepare",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "dst nic0 running",
    ],
    "a quiet state after the undrain never drains late again": [
        "src nic0 stop-copy late-drain",
        "src nic0 running undrain",
        "src nic0 stop-copy",
        "dst nic0 resuming",
        "dst nic0 running",
    ],
    "a newer QEMU's prepare for running-p2p drains like pre-copy-p2p-prepare": [
        "src nic0 running-p2p-prepare drain",
        "src nic0 running-p2p",
        "src nic0 stop-copy",
        "dst nic0 resuming",
        "dst nic0 running undrain",
    ],
    "a state this model does not know is noted and changes nothing": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-superfast unexpected",
        "src nic0 pre-copy-p2p late-drain",
        "dst nic0 resuming",
        "dst nic0 running undrain",
    ],
    "two devices are tracked independently": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic1 running-p2p late-drain",
        "src nic0 pre-copy-p2p",
        "src nic1 stop-copy",
        "src nic0 stop-copy",
        "dst nic1 resuming",
        "dst nic0 resuming",
        "dst nic1 running undrain",
        "dst nic0 running-p2p",
        "dst nic0 running undrain",
    ],
    "a device the policy does not cover gets no decision and no note": [
        "src gpu0 pre-copy-p2p-prepare",
        "src gpu0 resuming",
        "src nic0 pre-copy-p2p-prepare unexpected drain",
        "dst gpu0 running",
        "dst nic0 running undrain unexpected",
    ],
    "transitions outside the table are noted, decisions still made": [
        "dst nic0 running unexpected",
        "src nic0 resuming unexpected",
        "src nic0 stop-copy unexpected late-drain",
        "src nic0 pre-copy unexpected",
        "src nic0 running undrain",
    ],
}


def machine(mode: DrainMode = DrainMode.PREPARE, **switchover: object) -> MigrationMachine:
    schedule = Schedule.of(Switchover(drain=mode, **switchover), MigrationSettings())  # type: ignore[arg-type]
    m = MigrationMachine(
        mode, schedule, SystemClock(), drain_hooks=1, undrain_hooks=1, covers=lambda d: d != "gpu0"
    )
    for phase in (Phase.SUBSCRIBED, Phase.BEFORE_HOOKS, Phase.JOB_RUNNING):
        m.advance(phase)
    m.job_started()
    return m


@pytest.mark.parametrize("steps", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_sequence(steps: list[str]) -> None:
    m = machine()
    for number, step in enumerate(steps, 1):
        role, device_id, state, *marks = step.split()
        unexpected = "unexpected" in marks
        expected = next((mark for mark in marks if mark != "unexpected"), None)
        notes_before = len(m.tracker.notes)
        actions = m.on_vfio(event(_ROLES[role], device_id, state))
        hooks = [a for a in actions if isinstance(a, RunHooks)]
        described = None
        if hooks:
            (hook,) = hooks
            late = m.devices()[device_id].late
            described = "late-drain" if hook.trigger is Trigger.DRAIN and late else str(hook.trigger)
            assert hook.device_id == device_id and hook.reason
            m.on_hook_done(hook.trigger, device_id, None, abort_on_failure=True)  # hooks end at once
        assert described == expected, f"step {number}: {step}"
        assert (len(m.tracker.notes) > notes_before) == unexpected, (
            f"step {number}: {step}: {m.tracker.notes}"
        )
    assert not m.busy(), "every drain of a complete sequence is paired with an undrain"
    assert "gpu0" not in m.devices()


def test_an_undrain_decided_while_the_drain_runs_waits_for_it() -> None:
    m = machine()
    (_drain,) = m.on_vfio(event(Role.SOURCE, "nic0", "pre-copy-p2p-prepare"))
    assert m.on_vfio(event(Role.DESTINATION, "nic0", "running")) == []
    (undrain,) = m.on_hook_done(Trigger.DRAIN, "nic0", None, abort_on_failure=True)
    assert isinstance(undrain, RunHooks) and undrain.trigger is Trigger.UNDRAIN


def test_a_failed_drain_with_abort_aborts_the_job_once() -> None:
    m = machine()
    m.on_vfio(event(Role.SOURCE, "nic0", "pre-copy-p2p-prepare"))
    m.on_vfio(event(Role.SOURCE, "nic1", "pre-copy-p2p-prepare"))
    actions = m.on_hook_done(
        Trigger.DRAIN, "nic0", "drain hook x for nic0 failed: exited with status 1", True
    )
    assert [type(a).__name__ for a in actions] == ["Note", "AbortJob"]
    assert m.on_hook_done(Trigger.DRAIN, "nic1", "failed too", True) == []
    assert m.abort_reason == "drain hook x for nic0 failed: exited with status 1"


def test_no_new_drain_once_an_abort_is_decided() -> None:
    m = machine()
    m.request_abort("SIGTERM received", Outcome.INTERRUPTED)
    actions = m.on_vfio(event(Role.SOURCE, "nic0", "pre-copy-p2p-prepare"))
    assert [type(a).__name__ for a in actions] == ["Note"] and not m.busy()


def test_events_off_follows_devices_but_never_drains() -> None:
    m = machine()
    m.disable_hooks()
    assert m.on_vfio(event(Role.SOURCE, "nic0", "pre-copy-p2p-prepare")) == []
    assert m.devices()["nic0"].quiet_at == 0.0 and not m.busy()


# --- phases and outcomes ------------------------------------------------------------------------


def test_every_phase_reaches_done_through_settling() -> None:
    for phase, nexts in NEXT_PHASES.items():
        if phase not in (Phase.DONE, Phase.SETTLING, Phase.AFTER_HOOKS):
            assert Phase.SETTLING in nexts, phase
    assert NEXT_PHASES[Phase.SETTLING] == {Phase.AFTER_HOOKS}
    assert NEXT_PHASES[Phase.AFTER_HOOKS] == {Phase.DONE}


def test_an_illegal_phase_change_is_refused() -> None:
    m = machine()
    with pytest.raises(RuntimeError, match="job-running -> draining"):
        m.advance(Phase.DRAINING)


ABORT = ("drain hook failed", Outcome.ABORTED)
SIGTERM = ("SIGTERM received", Outcome.INTERRUPTED)


@pytest.mark.parametrize(
    ("job", "error", "abort", "location", "outcome"),
    [
        (JobState.SUCCEEDED, None, None, Location.DESTINATION, Outcome.SUCCEEDED),
        (
            JobState.SUCCEEDED,
            None,
            SIGTERM,
            Location.DESTINATION,
            Outcome.SUCCEEDED,
        ),  # the abort came too late
        (JobState.FAILED, "failed", None, Location.SOURCE, Outcome.ROLLED_BACK),
        (JobState.FAILED, "cancelled", ABORT, Location.SOURCE, Outcome.ABORTED),
        (JobState.FAILED, "cancelled", SIGTERM, Location.SOURCE, Outcome.INTERRUPTED),
        (JobState.FAILED, "confirm failed", None, Location.DESTINATION, Outcome.SUCCEEDED),
        (JobState.FAILED, "source daemon died", None, Location.NEITHER, Outcome.FAILED),
        (JobState.FAILED, "x", None, Location.BOTH, Outcome.FAILED),
        (JobState.SUCCEEDED, None, None, Location.SOURCE, Outcome.FAILED),
        (JobState.NOT_STARTED, None, ABORT, None, Outcome.ABORTED),
        (JobState.NOT_STARTED, None, SIGTERM, None, Outcome.INTERRUPTED),
    ],
)
def test_decide_outcome(
    job: JobState,
    error: str | None,
    abort: tuple[str, Outcome] | None,
    location: Location | None,
    outcome: Outcome,
) -> None:
    decided, why = decide_outcome(job, error, abort, location)
    assert decided is outcome
    if job is JobState.SUCCEEDED and location is Location.DESTINATION:
        # A success says nothing went wrong, unless an abort was asked for and came too late.
        assert (why is None) is (abort is None)
        assert abort is None or (why is not None and "came too late" in why and abort[0] in why)


# --- the convergence schedule -------------------------------------------------------------------


def test_schedule_defaults_to_one_step() -> None:
    assert Schedule.of(Switchover(), MigrationSettings()).steps == (DowntimeStep(300),)
    assert Schedule.of(Switchover(), MigrationSettings(max_downtime_ms=120)).steps == (DowntimeStep(120),)


def test_max_downtime_clips_the_steps() -> None:
    steps = (DowntimeStep(50), DowntimeStep(200, after_s=5), DowntimeStep(800, after_iterations=9))
    schedule = Schedule.of(Switchover(steps=steps), MigrationSettings(max_downtime_ms=200))
    assert [s.downtime_ms for s in schedule.steps] == [50, 200]


@pytest.mark.parametrize(
    ("elapsed", "iteration", "index"),
    [(0, 0, 0), (4.9, 3, 0), (5, 0, 1), (6, 8, 1), (1, 9, 2), (100, 100, 2)],
)
def test_step_at(elapsed: float, iteration: int, index: int) -> None:
    steps = (DowntimeStep(50), DowntimeStep(200, after_s=5), DowntimeStep(800, after_iterations=9))
    assert Schedule.of(Switchover(steps=steps), MigrationSettings()).step_at(elapsed, iteration) == index


@pytest.mark.parametrize(
    ("iteration", "expected", "limit", "converges"),
    [
        (1, 1, 300, False),
        (2, 1, 300, False),  # QEMU still echoes the limit
        (3, 250, 300, True),
        (3, 301, 300, False),
        (5, None, 300, False),
        (3, 1, GATE_FLOOR_MS, True),
    ],
)
def test_would_converge(iteration: int, expected: int | None, limit: int, converges: bool) -> None:
    assert would_converge(JobStats(iteration=iteration, expected_downtime_ms=expected), limit) is converges


def test_stall_detector_needs_a_clearly_lower_low_after_each_pass() -> None:
    stall = StallDetector(timeout_s=3)

    def after_pass(passes: int, expected: int) -> JobStats:
        return JobStats(iteration=passes, expected_downtime_ms=expected)

    readings = [
        (0, after_pass(1, 300)),
        (1, after_pass(3, 100)),
        (2, after_pass(4, 80)),
        (3.5, after_pass(5, 95)),
    ]
    assert [stall.stalled(t, s) for t, s in readings] == [False, False, False, False]
    assert stall.lowest == 80 and stall.since == 2
    assert stall.stalled(4.9, after_pass(6, 75)) is False, "75 is not 10% under 80"
    assert stall.stalled(5.1, after_pass(7, 78)) is True
    fresh = StallDetector(timeout_s=3)
    assert fresh.stalled(0, after_pass(1, 300)) is False and fresh.stalled(3.5, after_pass(1, 300)) is True


def test_gate_opens_when_qemu_would_converge_and_releases_after_the_drains() -> None:
    m = machine(DrainMode.GATED)
    m.learn_devices(["nic0", "nic1"])
    assert m.initial_downtime() == GATE_FLOOR_MS
    assert m.on_tick(JobStats(iteration=2, expected_downtime_ms=1)) == [], "QEMU's echo of the limit"
    actions = m.on_tick(JobStats(iteration=3, expected_downtime_ms=120))
    drains = [a for a in actions if isinstance(a, RunHooks)]
    assert (
        {a.device_id for a in drains} == {"nic0", "nic1"}
        and m.gate is not None
        and m.gate.value == "draining"
    )
    assert m.on_hook_done(Trigger.DRAIN, "nic0", None, True) == []
    (release,) = m.on_hook_done(Trigger.DRAIN, "nic1", None, True)
    assert type(release).__name__ == "SetDowntime" and release.ms == 300  # type: ignore[union-attr]
    assert m.gate.value == "opened"
