"""The phase machine as a member of a switchover group (`MigrationMachine(grouped=True)`): held at its
gate, it tells the group when QEMU would converge, drains and releases at the group's word, and holds
every drained device until the group's undrain (their peers are the other members' workloads)."""

from __future__ import annotations

import pytest

from orchestrator.core.actions import AbortJob, Notice, RunHooks, SetDowntime, TellGroup
from orchestrator.core.convergence import Schedule
from orchestrator.core.hooks import Trigger
from orchestrator.core.hypervisor import JobStats, SystemClock
from orchestrator.core.phases import Gate, MigrationMachine, Phase
from orchestrator.core.policy import DrainMode, MigrationSettings, Switchover
from orchestrator.core.report import Outcome
from orchestrator.core.vfio import Role, VfioEvent

READY = JobStats(iteration=3, expected_downtime_ms=120)
NOT_READY = JobStats(iteration=4, expected_downtime_ms=900)


def event(role: Role, device_id: str, state: str, t: float = 0.0) -> VfioEvent:
    return VfioEvent(str(role), role, "vm1", device_id, f"/machine/peripheral/{device_id}", state, t, t)


def member(*, stall_timeout_s: float = 0.0) -> MigrationMachine:
    switchover = Switchover(drain=DrainMode.GATED, stall_timeout_s=stall_timeout_s)
    m = MigrationMachine(
        DrainMode.GATED,
        Schedule.of(switchover, MigrationSettings()),
        SystemClock(),
        drain_hooks=1,
        undrain_hooks=1,
        grouped=True,
    )
    m.learn_devices(["nic0", "nic1"])
    for phase in (Phase.SUBSCRIBED, Phase.BEFORE_HOOKS, Phase.JOB_RUNNING):
        m.advance(phase)
    m.job_started()
    return m


def told(actions: list[object]) -> list[Notice]:
    return [a.notice for a in actions if isinstance(a, TellGroup)]


def test_a_member_needs_the_gated_mode() -> None:
    schedule = Schedule.of(Switchover(drain=DrainMode.PREPARE), MigrationSettings())
    with pytest.raises(ValueError, match="gated"):
        MigrationMachine(
            DrainMode.PREPARE, schedule, SystemClock(), drain_hooks=1, undrain_hooks=1, grouped=True
        )


def test_held_at_the_gate_it_tells_readiness_changes_and_never_drains_by_itself() -> None:
    m = member()
    assert told(m.on_tick(READY)) == [Notice.READY]
    assert m.on_tick(READY) == [], "said once per change"
    assert told(m.on_tick(NOT_READY)) == [Notice.UNREADY]
    assert told(m.on_tick(READY)) == [Notice.READY]
    assert m.gate is Gate.CLOSED and not m.drains_running()


def test_it_drains_at_the_groups_word_says_drained_and_raises_its_limit_only_on_release() -> None:
    m = member()
    m.on_tick(READY)
    drains = [a for a in m.group_drain() if isinstance(a, RunHooks)]
    assert {a.device_id for a in drains} == {"nic0", "nic1"} and m.gate is Gate.DRAINING
    assert m.on_hook_done(Trigger.DRAIN, "nic0", None, True) == []
    assert told(m.on_hook_done(Trigger.DRAIN, "nic1", None, True)) == [Notice.DRAINED]
    assert m.gate is Gate.DRAINING, "still held: the group releases every member at once"
    (raise_limit,) = m.group_release()
    assert isinstance(raise_limit, SetDowntime) and raise_limit.ms == m.downtime_limit
    assert m.gate is Gate.OPEN and m.group_release() == []


def test_a_device_running_again_stays_drained_until_the_groups_undrain() -> None:
    m = member()
    m.on_tick(READY)
    m.group_drain()
    m.on_hook_done(Trigger.DRAIN, "nic0", None, True)
    m.on_hook_done(Trigger.DRAIN, "nic1", None, True)
    m.group_release()
    for device in ("nic0", "nic1"):
        m.on_vfio(event(Role.SOURCE, device, "pre-copy-p2p-prepare", 10.0))
    assert m.on_vfio(event(Role.DESTINATION, "nic0", "running", 11.0)) == []
    assert told(m.on_job_end(None)) == [Notice.JOB_ENDED]
    assert told(m.on_vfio(event(Role.DESTINATION, "nic1", "running", 11.5))) == [Notice.SETTLED]
    assert m.busy(), "held drained: the member's settling waits for the group"
    undrains = m.group_undrain()
    assert {a.device_id for a in undrains if isinstance(a, RunHooks)} == {"nic0", "nic1"}
    assert m.group_undrain() == [], "the group's undrain is carried out once"
    for device in ("nic0", "nic1"):
        m.on_hook_done(Trigger.UNDRAIN, device, None, True)
    assert not m.busy()
    assert m.devices()["nic1"].running_at == 11.5


def test_the_groups_undrain_during_a_drain_waits_for_it() -> None:
    m = member()
    m.on_tick(READY)
    m.group_drain()
    m.on_hook_done(Trigger.DRAIN, "nic0", None, True)
    m.request_abort("the group aborts", Outcome.ROLLED_BACK)
    m.on_job_end("cancelled")
    (undrain0,) = [a for a in m.group_undrain() if isinstance(a, RunHooks)]
    assert undrain0.device_id == "nic0", "nic1's drain still runs: its undrain waits for it"
    (undrain1,) = [a for a in m.on_hook_done(Trigger.DRAIN, "nic1", None, True) if isinstance(a, RunHooks)]
    assert undrain1.trigger is Trigger.UNDRAIN and undrain1.device_id == "nic1"


def test_an_abort_is_told_and_no_drain_follows_it() -> None:
    m = member()
    actions = m.request_abort("a before hook failed", Outcome.ABORTED)
    assert any(isinstance(a, AbortJob) for a in actions) and told(actions) == [Notice.ABORTING]
    assert m.group_drain() == [] and m.group_release() == []


def test_a_member_that_passes_the_gate_early_says_so_once_and_drains_on_its_events() -> None:
    m = member()
    actions = m.on_vfio(event(Role.SOURCE, "nic0", "pre-copy-p2p-prepare"))
    assert told(actions) == [Notice.PASSED_EARLY]
    assert [a.device_id for a in actions if isinstance(a, RunHooks)] == ["nic0"]
    later = m.on_vfio(event(Role.SOURCE, "nic1", "pre-copy-p2p-prepare"))
    assert told(later) == [] and [a.device_id for a in later if isinstance(a, RunHooks)] == ["nic1"]
    assert told(m.group_drain()) == [Notice.DRAINED]


def test_a_job_failing_before_the_drain_settles_the_member_with_nothing_drained() -> None:
    m = member()
    assert told(m.on_job_end("connection reset")) == [Notice.JOB_ENDED, Notice.SETTLED]
    assert m.group_drain() == [] and not m.busy()


class SteppingClock:
    """A clock that moves one second per reading of the monotonic time."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now

    def wait(self, condition: object, timeout: float) -> None:
        self.now += timeout


@pytest.mark.parametrize("grouped", [False, True])
def test_a_held_member_is_not_aborted_as_stalled(grouped: bool) -> None:
    switchover = Switchover(drain=DrainMode.GATED, stall_timeout_s=5.0)
    m = MigrationMachine(
        DrainMode.GATED,
        Schedule.of(switchover, MigrationSettings()),
        SteppingClock(),
        drain_hooks=1,
        undrain_hooks=1,
        grouped=grouped,
    )
    for phase in (Phase.SUBSCRIBED, Phase.BEFORE_HOOKS, Phase.JOB_RUNNING):
        m.advance(phase)
    m.job_started()
    # Held ready at the floor: the data left after each pass stops shrinking (1 ms limit, 120 ms left).
    aborted = any(
        isinstance(a, AbortJob)
        for i in range(2, 30)
        for a in m.on_tick(JobStats(iteration=i, expected_downtime_ms=2000))
    )
    assert aborted is not grouped, "alone it is stalled; in a group the hold deadline bounds it"
