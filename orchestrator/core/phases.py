"""One migration as an explicit phase machine: what to do next, decided without any I/O.

`MigrationMachine` takes every input a migration gets (VFIO events, hook results, job statistics, the
job's end, interrupts) and answers with `Action`s for the driver (`orchestrator.flows.migration`) to carry
out: run a device's drain or undrain hooks, abort the job, change QEMU's downtime limit. It owns the
invariant:

    every device that was drained is undrained exactly once, never before its drain hooks ended,
    and never drained twice in one migration.

Ordering for crash safety (the driver's half of the invariant): a device action is journaled as
"starting" before its hooks start, and "done"/"failed" after they end, so that whenever the
orchestrator dies, `recover` can tell from the journal which devices may be drained.

Phases and their undo (Proxmox-style):
  subscribed    <-> unsubscribed at settling
  before hooks  <-> after-failure hooks
  draining      <-> undrain (drain=start: every covered device, before the job)
  job running   <-> abort the job (hook failure, timeout, stall, interrupt)
  drains        <-> undrains (events, the job's end, else forced at the end of settling)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator.core.actions import (
    AbortJob,
    Action,
    JobState,
    Location,
    Note,
    Notice,
    RunHooks,
    SetDowntime,
    TellGroup,
    decide_outcome,
)
from orchestrator.core.convergence import GATE_FLOOR_MS, Schedule, StallDetector, would_converge
from orchestrator.core.hooks import Trigger
from orchestrator.core.hypervisor import Clock, JobStats
from orchestrator.core.policy import DrainMode
from orchestrator.core.report import DeviceRecord, Outcome
from orchestrator.core.vfio import DeviceState, MigrationTracker, Role, Signal, VfioEvent


class Phase(StrEnum):
    """Where one migration is."""

    PREFLIGHT = "pre-flight"  # checking the request against both hosts; nothing changed yet
    SUBSCRIBED = "subscribed"  # following QEMU's events on both hosts
    BEFORE_HOOKS = "before-hooks"
    DRAINING = "draining"  # drain=start: draining every covered device before the job
    JOB_RUNNING = "job-running"  # the libvirt job copies memory (pre-copy)
    SWITCHING_OVER = "switching-over"  # the devices started to quiesce: vCPUs are paused
    SETTLING = "settling"  # the job is over: waiting for devices to run again, undraining the rest
    AFTER_HOOKS = "after-hooks"
    DONE = "done"


# The one table of phase changes; SETTLING is the way out of every phase that may have changed the world.
NEXT_PHASES: Mapping[Phase, frozenset[Phase]] = {
    Phase.PREFLIGHT: frozenset({Phase.SUBSCRIBED, Phase.SETTLING, Phase.DONE}),
    Phase.SUBSCRIBED: frozenset({Phase.BEFORE_HOOKS, Phase.SETTLING}),
    Phase.BEFORE_HOOKS: frozenset({Phase.DRAINING, Phase.JOB_RUNNING, Phase.SETTLING}),
    Phase.DRAINING: frozenset({Phase.JOB_RUNNING, Phase.SETTLING}),
    Phase.JOB_RUNNING: frozenset({Phase.SWITCHING_OVER, Phase.SETTLING}),
    Phase.SWITCHING_OVER: frozenset({Phase.SETTLING}),
    Phase.SETTLING: frozenset({Phase.AFTER_HOOKS}),
    Phase.AFTER_HOOKS: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}
# Phases in which VFIO events belong to our own job (issue: a second run must not act on another's events).
_FOLLOWING = frozenset({Phase.JOB_RUNNING, Phase.SWITCHING_OVER, Phase.SETTLING})


class DrainStatus(StrEnum):
    """A device's drain, from the workloads' point of view."""

    IDLE = "idle"
    DRAINING = "draining"  # drain hooks running
    DRAINED = "drained"
    UNDRAINING = "undraining"  # undrain hooks running
    UNDRAINED = "undrained"


class Gate(StrEnum):
    """drain=gated: the switchover QEMU may not make until every covered device is drained."""

    CLOSED = "closed"  # downtime limit at the floor: QEMU keeps iterating
    DRAINING = "draining"  # QEMU would converge: the devices are being drained
    OPEN = "opened"  # every device drained, the limit raised: QEMU may switch over
    PASSED_EARLY = "passed early"  # QEMU switched over before the gate opened (the prepare event drained)


@dataclass
class _Device:
    """The machine's bookkeeping for one covered device."""

    record: DeviceRecord
    status: DrainStatus = DrainStatus.IDLE
    pending: int = 0  # hooks of the current drain or undrain still running
    qom_path: str = ""
    # An undrain decided while the drain hooks still ran: (reason, the event or None), done when they end.
    undrain_wanted: tuple[str, VfioEvent | None] | None = field(default=None)
    skipped: bool = False  # not drained because the migration was being aborted (said once)
    # A group member's device that runs again (or never will), held drained for the group's undrain.
    held: tuple[str, VfioEvent | None] | None = field(default=None)


class MigrationMachine:
    """The decisions of one migration; not thread-safe (the driver holds its lock around every call).

    `drain_hooks` and `undrain_hooks` are how many hooks one device's drain and undrain start; each
    reports back through `on_hook_done`. With `hooks_enabled` False (events off and the policy says
    proceed) devices are followed but never drained.

    `grouped`: a member of a switchover group (`orchestrator.core.group`), gated. Its gate does not
    open by itself: it tells the group when QEMU would converge (`TellGroup` READY), drains at the
    group's word (`group_drain`), says when drained and raises the limit at the group's word
    (`group_release`); a device that runs again is held drained until the group's undrain
    (`group_undrain`), because its peers are the other members' workloads.
    """

    def __init__(
        self,
        mode: DrainMode,
        schedule: Schedule,
        clock: Clock,
        *,
        drain_hooks: int,
        undrain_hooks: int,
        covers: Callable[[str], bool] | None = None,
        hooks_enabled: bool = True,
        grouped: bool = False,
    ) -> None:
        self.mode = mode
        self.schedule = schedule
        self.clock = clock
        self.tracker = MigrationTracker(covers) if covers else MigrationTracker()
        self.phase = Phase.PREFLIGHT
        self.job = JobState.NOT_STARTED
        self.job_error: str | None = None
        self.gate: Gate | None = Gate.CLOSED if mode is DrainMode.GATED else None
        self.undrain_failed = False
        self._drain_hooks = drain_hooks
        self._undrain_hooks = undrain_hooks
        self._hooks_enabled = hooks_enabled
        self._devices: dict[str, _Device] = {}
        self._abort: tuple[str, Outcome] | None = None
        self._job_started: float | None = None
        self._released_at: float | None = None  # when the gate let QEMU switch over (epoch seconds)
        self._last_quiesced: float | None = None  # QEMU time of the last source device to go quiet
        self._step = 0
        self._stall = StallDetector(schedule.stall_timeout_s) if schedule.stall_timeout_s else None
        self.grouped = grouped
        if grouped and self.gate is None:
            raise ValueError("a switchover group's members drain in gated mode")
        self._ready = False  # grouped: QEMU would converge now (told to the group)
        self._drained_told = False
        self._settled_told = False
        self._group_undrained = False
        self._group_drain_due = False  # the group drained as this member's job was about to start

    # --- phases -----------------------------------------------------------------------------------
    def advance(self, phase: Phase) -> None:
        """Move to `phase`: the one place phases change; refuses a change not in NEXT_PHASES."""
        if phase not in NEXT_PHASES[self.phase]:
            raise RuntimeError(f"illegal phase change {self.phase} -> {phase}")
        self.phase = phase

    @property
    def following(self) -> bool:
        """Whether VFIO events are our own job's now (before the job starts they are someone else's)."""
        return self.phase in _FOLLOWING

    # --- facts ------------------------------------------------------------------------------------
    @property
    def abort_reason(self) -> str | None:
        """The first abort decided, None if none."""
        return self._abort[0] if self._abort else None

    def learn_devices(self, device_ids: Iterable[str]) -> None:
        """Devices known before any event (from the domain XML), so that start and gated modes drain them."""
        for device_id in device_ids:
            if self.tracker.covers(device_id):
                self._device(device_id)

    def devices(self) -> dict[str, DeviceRecord]:
        """Every covered device's record."""
        return {device_id: device.record for device_id, device in self._devices.items()}

    @property
    def downtime_limit(self) -> int:
        """The schedule's downtime limit now (what the gate's release sets)."""
        return self._downtime()

    def initial_downtime(self) -> int:
        """The downtime limit the job starts with: the floor when gated, else the first step's."""
        return GATE_FLOOR_MS if self.gate is not None else self.schedule.steps[0].downtime_ms

    def drains_running(self) -> bool:
        """Whether any drain hook still runs."""
        return any(d.status is DrainStatus.DRAINING for d in self._devices.values())

    def busy(self) -> bool:
        """Whether a device is still drained or a hook still runs: settling waits while this holds."""
        return any(
            d.status is not DrainStatus.IDLE and d.status is not DrainStatus.UNDRAINED
            for d in self._devices.values()
        )

    def hooks_running(self) -> bool:
        """Whether any drain or undrain hook still runs."""
        return any(d.pending for d in self._devices.values())

    def pending(self, device_id: str) -> int:
        """How many hooks of the device's current drain or undrain still run."""
        return self._devices[device_id].pending

    def disable_hooks(self) -> None:
        """Events are off and the policy says proceed: follow the devices, never drain them."""
        self._hooks_enabled = False

    # --- inputs -----------------------------------------------------------------------------------
    def drain_ahead(self) -> list[Action]:
        """drain=start: drain every covered device now, before the job."""
        actions: list[Action] = []
        for device in self._devices.values():
            if device.status is DrainStatus.IDLE:
                actions += self._drain(device, "start", None)
        return actions

    def job_started(self) -> list[Action]:
        """The libvirt job was started (a group's drain asked for just before: now)."""
        self.job = JobState.RUNNING
        self._job_started = self.clock.monotonic()
        if self._group_drain_due:
            self._group_drain_due = False
            return self.group_drain()
        return []

    def on_vfio(self, event: VfioEvent) -> list[Action]:
        """A VFIO_MIGRATION event of our job (the driver feeds only while `following`)."""
        signal = self.tracker.feed(event)
        if self.tracker.covers(event.device_id):
            # Known from its events too (a device the domain XML does not list): the gate drains it.
            device = self._device(event.device_id)
            device.qom_path = event.qom_path or device.qom_path
        if signal is None:
            return []
        device = self._device(event.device_id)
        if signal.signal is Signal.RUNNING:
            where = "destination" if event.role is Role.DESTINATION else "source (the migration failed)"
            return self._resumed(device, f"running on the {where}", event)
        if self.phase is Phase.JOB_RUNNING:
            self.advance(Phase.SWITCHING_OVER)
        if device.record.quiet_at is None:
            self._quiet(device.record, event, signal.signal)
        if signal.signal is Signal.QUIESCED:
            self._last_quiesced = event.qemu_time
        early = self.gate in (Gate.CLOSED, Gate.DRAINING, Gate.PASSED_EARLY)
        told: list[Action] = []
        if early:
            if self.grouped and self.gate is not Gate.PASSED_EARLY:
                told.append(TellGroup(Notice.PASSED_EARLY, event.device_id))
            self.gate = Gate.PASSED_EARLY  # QEMU switched over before every drain had finished
        if device.status is not DrainStatus.IDLE:
            return told  # drained ahead (gate, start) or already draining: this is the confirmation
        if not self._hooks_enabled or self._group_undrained:
            return told
        if self._abort is not None:
            if device.skipped:  # its prepare, then its P2P state: said once
                return told
            device.skipped = True
            return [
                *told,
                Note(f"{event.device_id} not drained: the migration is being aborted ({self._abort[0]})"),
            ]
        trigger = ("late" if signal.late else "prepare") + (" (gate passed early)" if early else "")
        return told + self._drain(device, trigger, event, late=signal.late)

    def on_hook_done(
        self, trigger: Trigger, device_id: str, failure: str | None, abort_on_failure: bool
    ) -> list[Action]:
        """One drain or undrain hook of a device ended; `failure` says why it failed (None: it did not)."""
        device = self._devices[device_id]
        device.pending -= 1
        actions: list[Action] = []
        now = self.clock.time()
        if trigger is Trigger.DRAIN:
            if failure is not None:
                device.record.drain_ok = False
                if abort_on_failure:
                    actions += self.request_abort(failure, Outcome.ABORTED)
            if device.pending == 0:
                device.status = DrainStatus.DRAINED
                device.record.drain_finished = now
                if device.record.drain_ok is None:
                    device.record.drain_ok = True
                if device.undrain_wanted is not None:
                    reason, event = device.undrain_wanted
                    device.undrain_wanted = None
                    actions += self._undrain(device, reason, event)
                actions += self._release_gate()
        else:
            if failure is not None:
                self.undrain_failed = True
            if device.pending == 0:
                device.status = DrainStatus.UNDRAINED
                device.record.undrain_finished = now
        return actions

    def on_tick(self, stats: JobStats | None) -> list[Action]:
        """A reading of the job's statistics (None when it has none): the schedule, the gate, timeouts."""
        if self.job is not JobState.RUNNING or self._job_started is None:
            return []
        if self._abort is not None:
            # Again at every reading while the job runs: an abort sent as the job started can miss it.
            return [AbortJob(self._abort[0])]
        elapsed = self.clock.monotonic() - self._job_started
        timeout = self.schedule.completion_timeout_s
        if timeout and elapsed > timeout:
            return self.request_abort(f"completion timeout of {timeout:g} s exceeded", Outcome.ROLLED_BACK)
        if stats is None or self.phase is not Phase.JOB_RUNNING:
            return []
        # A held group member stops shrinking by design: the group's hold deadline bounds it instead.
        held = self.grouped and self.gate is Gate.CLOSED
        if self._stall is not None and not held and self._stall.stalled(elapsed, stats):
            return self.request_abort(
                f"stalled: the data left after each pass has not shrunk for {self._stall.timeout_s:g} s",
                Outcome.ROLLED_BACK,
            )
        actions: list[Action] = []
        index = self.schedule.step_at(elapsed, stats.iteration)
        if index > self._step:
            self._step = index
            downtime = self.schedule.steps[index].downtime_ms
            what = f"downtime limit {downtime} ms ({self.schedule.describe(index)})"
            if self.gate in (None, Gate.OPEN, Gate.PASSED_EARLY):
                actions.append(SetDowntime(downtime, what))
            else:
                actions.append(Note(f"schedule: {what} once the gate opens"))
        if self.gate is Gate.CLOSED and self._abort is None:
            converges = would_converge(stats, self._downtime())
            if self.grouped:
                if converges != self._ready:
                    self._ready = converges
                    detail = f"expected downtime {stats.expected_downtime_ms} ms, limit {self._downtime()} ms"
                    actions.append(TellGroup(Notice.READY if converges else Notice.UNREADY, detail))
            elif converges:
                actions += self._open_gate(stats)
        return actions

    def on_job_end(self, error: str | None) -> list[Action]:
        """The libvirt job ended (error None: it succeeded)."""
        self.job = JobState.SUCCEEDED if error is None else JobState.FAILED
        self.job_error = error
        actions: list[Action] = [TellGroup(Notice.JOB_ENDED, error or "")] if self.grouped else []
        if error is not None:
            for device in self._devices.values():
                tracked = self.tracker.devices.get(device.record.device_id)
                if tracked is None or tracked.source_state == DeviceState.RUNNING:
                    # It never left running, so no 'running' event will come to say it runs again.
                    actions += self._resumed(device, "the job failed before the device left running", None)
        return actions + self._check_settled()

    def request_abort(self, reason: str, outcome: Outcome) -> list[Action]:
        """Abort the migration (a hook failed, a timeout, an interrupt); the first reason wins."""
        if self._abort is not None:
            return []
        self._abort = (reason, outcome)
        actions: list[Action] = [Note(f"aborting: {reason}", timeline_only=True)]
        if self.job is JobState.RUNNING:
            actions.append(AbortJob(reason))
        if self.grouped:
            actions.append(TellGroup(Notice.ABORTING, reason))
        return actions

    def force_undrain(self) -> list[Action]:
        """Settling is over: undrain every device still drained (no 'running' event came for it)."""
        actions: list[Action] = []
        reason = "forced at the end of the migration"
        if self.grouped and not self._group_undrained:
            for device in self._devices.values():
                if device.status in (DrainStatus.DRAINED, DrainStatus.DRAINING) and device.held is None:
                    name = device.record.device_id
                    actions.append(Note(f"no 'running' event for {name} after the job ended: settled anyway"))
                    device.held = (reason, None)
            return actions + self._check_settled()
        for device in self._devices.values():
            if device.status is DrainStatus.DRAINED:
                name = device.record.device_id
                actions.append(
                    Note(f"no 'running' event for {name} after the job ended: undraining it anyway")
                )
                actions += self._undrain(device, reason, None)
            elif device.status is DrainStatus.DRAINING and device.undrain_wanted is None:
                device.undrain_wanted = (reason, None)
        return actions

    # --- a switchover group's word (grouped only) --------------------------------------------------
    def group_drain(self) -> list[Action]:
        """The group drains: drain every covered device now (the gate stays at the floor until
        `group_release`); says DRAINED once they are. Nothing when the job no longer runs, the member
        is aborting or the group already undrained."""
        if not self.grouped or self._group_undrained or self._abort is not None:
            return []
        if self.gate is Gate.PASSED_EARLY:  # its devices drain on their own events
            return self._tell_drained()
        if self.gate is Gate.CLOSED and self.job is JobState.NOT_STARTED:
            self._group_drain_due = True  # another member passed early as this one's job was starting
            return []
        if self.gate is not Gate.CLOSED or self.job is not JobState.RUNNING:
            return []
        return self._open_gate(None)

    def group_release(self) -> list[Action]:
        """The group releases: every member's devices are drained; raise this member's limit."""
        if not self.grouped or self.gate is not Gate.DRAINING or self.drains_running() or self._abort:
            return []
        self.gate = Gate.OPEN
        self._released_at = self.clock.time()
        downtime = self._downtime()
        return [SetDowntime(downtime, f"gate open: the group is drained; downtime limit {downtime} ms")]

    def group_undrain(self) -> list[Action]:
        """The group undrains: undrain every device still drained (one whose drain still runs, once it
        ends); nothing is drained by this member afterwards."""
        if not self.grouped or self._group_undrained:
            return []
        self._group_undrained = True
        actions: list[Action] = []
        for device in self._devices.values():
            reason, event = device.held or ("the group's undrain", None)
            if device.status is DrainStatus.DRAINED:
                actions += self._undrain(device, reason, event)
            elif device.status is DrainStatus.DRAINING:
                device.undrain_wanted = (reason, event)
        return actions

    def _tell_drained(self) -> list[Action]:
        if self._drained_told:
            return []
        self._drained_told = True
        return [TellGroup(Notice.DRAINED)]

    def _check_settled(self) -> list[Action]:
        """Grouped: SETTLED once the job ended and every drained device runs again (held)."""
        if not self.grouped or self._settled_told or self.job not in (JobState.SUCCEEDED, JobState.FAILED):
            return []
        for device in self._devices.values():
            if device.status in (DrainStatus.DRAINING, DrainStatus.DRAINED) and device.held is None:
                return []
        self._settled_told = True
        return [TellGroup(Notice.SETTLED)]

    def conclude(self, location: Location | None) -> tuple[Outcome, str | None]:
        """The migration's outcome (see `decide_outcome`)."""
        return decide_outcome(self.job, self.job_error, self._abort, location)

    # --- internals ------------------------------------------------------------------------------
    def _quiet(self, record: DeviceRecord, event: VfioEvent, signal: Signal) -> None:
        """When the device went quiet, as well as this run knows it (see DeviceRecord)."""
        if signal is Signal.QUIESCING:
            record.quiet_at, record.quiet_bound, record.quiet_source = (
                event.qemu_time,
                "exact",
                "its prepare event",
            )
            return
        # No prepare (QEMU < 11.0): its first P2P state comes once the transition has ENDED. Anything known
        # to precede the transition bounds its start from below.
        before = [
            (at, why)
            for at, why in (
                (self._last_quiesced, "the previous device's P2P state"),
                (self._released_at, "the gate's release"),
            )
            if at is not None and at <= event.qemu_time
        ]
        if before:
            record.quiet_at, record.quiet_source = max(before)
            record.quiet_bound = "at least"
        else:
            record.quiet_at, record.quiet_bound = event.qemu_time, "at most"
            record.quiet_source = "its first P2P state, once the transition had ended"

    def _device(self, device_id: str) -> _Device:
        device = self._devices.get(device_id)
        if device is None:
            device = self._devices[device_id] = _Device(DeviceRecord(device_id, self.mode.value))
        return device

    def _downtime(self) -> int:
        return self.schedule.steps[self._step].downtime_ms

    def _drain(
        self, device: _Device, trigger: str, event: VfioEvent | None, *, late: bool = False
    ) -> list[Action]:
        record = device.record
        if not self._drain_hooks:  # nothing to run: the device is followed, nothing is drained
            record.trigger, device.status = "observed only", DrainStatus.DRAINED
            return []
        record.trigger, record.late = trigger, late
        record.drain_started = self.clock.time()
        device.status, device.pending = DrainStatus.DRAINING, self._drain_hooks
        state = event.state if event else trigger
        when = event.qemu_time if event else None
        return [RunHooks(Trigger.DRAIN, record.device_id, str(state), device.qom_path, when, trigger)]

    def _resumed(self, device: _Device, reason: str, event: VfioEvent | None) -> list[Action]:
        if event is not None and device.record.running_at is None:
            device.record.running_at = event.qemu_time
        if self.grouped and not self._group_undrained:
            if device.status in (DrainStatus.DRAINING, DrainStatus.DRAINED) and device.held is None:
                device.held = (reason, event)  # its peers are the group's: undrained with the group
            return self._check_settled()
        if device.status is DrainStatus.DRAINING:
            device.undrain_wanted = (reason, event)  # never restore a workload while its drain still runs
            return []
        if device.status is DrainStatus.DRAINED:
            return self._undrain(device, reason, event)
        return []

    def _undrain(self, device: _Device, reason: str, event: VfioEvent | None) -> list[Action]:
        record = device.record
        record.undrain_reason = reason
        record.undrain_started = self.clock.time()
        device.status, device.pending = DrainStatus.UNDRAINING, self._undrain_hooks
        if not self._undrain_hooks:
            device.status, record.undrain_finished = DrainStatus.UNDRAINED, record.undrain_started
            return []
        state = event.state if event else DeviceState.RUNNING
        when = event.qemu_time if event else None
        return [RunHooks(Trigger.UNDRAIN, record.device_id, str(state), device.qom_path, when, reason)]

    def _open_gate(self, stats: JobStats | None) -> list[Action]:
        self.gate = Gate.DRAINING
        devices = [d for d in self._devices.values() if d.status is DrainStatus.IDLE]
        why = (
            "every member of the group would"
            if stats is None
            else f"QEMU would switch over within {self._downtime()} ms (expected downtime "
            f"{stats.expected_downtime_ms} ms after {stats.iteration} passes)"
        )
        actions: list[Action] = [Note(f"gate: {why}: draining {len(devices)} device(s) before releasing it")]
        if self._hooks_enabled:
            for device in devices:
                actions += self._drain(device, "gate", None)
        return actions + self._release_gate()

    def _release_gate(self) -> list[Action]:
        """Open the gate once no drain runs any more, unless the migration is being aborted."""
        if self.gate is not Gate.DRAINING or self.drains_running() or self._abort is not None:
            return []
        if self.grouped:  # the group releases every member at once (`group_release`)
            return self._tell_drained()
        self.gate = Gate.OPEN
        self._released_at = self.clock.time()
        return [
            SetDowntime(
                self._downtime(),
                f"gate open: every covered device drained; downtime limit {self._downtime()} ms",
            )
        ]
