"""One VM's live migration: the driver that carries out the phase machine's decisions.

`orchestrator.core.phases.MigrationMachine` decides what to do; this module does the I/O around it: the
pre-flight against both hosts, the monitor-event subscriptions, the hooks, the libvirt job and its
statistics, the journal and the report. It reaches libvirt only through the narrow `Hypervisor` and
`Guest` interface (`orchestrator.core.hypervisor`), so the unit tests drive every path of it on a scripted
fake, on a fake clock.

Threads: libvirt's event thread delivers monitor events (the hot path: event -> decision -> spawn,
nothing else first); hook waiter threads report each hook's end; the job's own thread reports its
end; the caller's thread moves through the phases and reads the job's statistics. One lock (`_cv`,
and `_job_end` on the same lock) guards the machine; actions are carried out after it is released,
so a slow libvirt call never holds up an event.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import ipaddress
import os
import shlex
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from orchestrator.core import domxml, vfio
from orchestrator.core.convergence import GATE_FLOOR_MS, Schedule
from orchestrator.core.digest import sha256_hex
from orchestrator.core.errors import BadInput, OrchestratorError, shell_uri
from orchestrator.core.hooks import Hook, HookResult, HookRunner, OnFailure, Trigger, preflight
from orchestrator.core.hypervisor import (
    ACTIVE_STATES,
    GONE,
    SHUT_OFF,
    Clock,
    Guest,
    Hypervisor,
    MigrateRequest,
    Subscription,
    SystemClock,
)
from orchestrator.core.phases import (
    AbortJob,
    Action,
    JobState,
    Location,
    MigrationMachine,
    Note,
    Phase,
    RunHooks,
    SetDowntime,
)
from orchestrator.core.policy import (
    DrainMode,
    MigrationMode,
    MigrationSettings,
    Policy,
    Switchover,
    WhenEventsOff,
)
from orchestrator.core.report import Outcome, Progress, Report, TimelineEntry
from orchestrator.core.vfio import Role, VfioEvent

if TYPE_CHECKING:
    from orchestrator.edges.locks import MigrationLock
    from orchestrator.edges.runlog import RunLog

# How long after the job ends to wait for the events that undrain (destination or source `running`)
# before undraining on our own: the guest resumes within milliseconds of the job's end.
SETTLE_S = 15.0
POLL_S = 0.1  # how often the job's statistics are read (the schedule, the gate and progress use them)
_FOLLOWED_EVENTS = ("MIGRATION", "RESUME", "SHUTDOWN", "STOP", *vfio.EVENTS)


class JournalLike(Protocol):
    """What a migration writes to the journal (orchestrator.edges.journal.Journal, or NullJournal)."""

    def begin_migration(
        self,
        id: str,
        kind: str,
        domain: str,
        source_uri: str,
        destination_uri: str,
        policy: str,
        started: float,
        parent: str | None = None,
        *,
        drain_mode: str = ...,
        policy_text: str | None = ...,
        policy_sha256: str | None = ...,
        supervisor: int | None = ...,
    ) -> None:
        """Record that a migration started (its run log, room reserved: EnvironmentProblem if not)."""

    def run_log(self, migration_id: str) -> RunLog | None:
        """The migration's open run log (the hook supervisor records into it), if it has one."""

    def record_phase(self, migration_id: str, phase: str, at: float) -> None:
        """Record a phase change."""

    def record_event(
        self,
        migration_id: str,
        host: str,
        role: str | None,
        kind: str,
        name: str,
        device_id: str | None,
        state: str | None,
        qemu_time: float | None,
        received: float,
        data: object = ...,
    ) -> None:
        """Record an event or a note."""

    def record_device_action(
        self, migration_id: str, device_id: str, action: str, status: str, at: float, detail: str | None = ...
    ) -> str | None:
        """Record a drain or undrain starting (durable before it returns) or ending; why it could not
        be written, if it could not."""

    def record_hook(self, migration_id: str, result: Mapping[str, Any]) -> None:
        """Record one hook run."""

    def finish_migration(
        self,
        id: str,
        outcome: str,
        changed: bool | None,
        error: str | None,
        exit_code: int | None,
        ended: float,
        summary: Mapping[str, object] | None = ...,
    ) -> None:
        """Record how a migration ended."""

    @property
    def failures(self) -> list[str]:
        """Every record that could not be written or imported, one line each."""


class Started(Protocol):
    """A hook just asked for (orchestrator.core.hooks.SupervisedRun)."""

    def wait(self) -> HookResult:
        """Until it has ended; its result."""


class Armed(Protocol):
    """An armed hook (orchestrator.core.hooks.ArmedHook): started with the migration, woken per event."""

    def wait_ready(self) -> HookResult:
        """Until it is ready (or failed to be); the arming's result."""

    def fire(
        self,
        device_id: str,
        state: str,
        qemu_time: float | None,
        on_done: Callable[[HookResult], None] | None,
    ) -> object:
        """Act for one device now; `on_done` gets the result."""

    def close(self) -> HookResult | None:
        """The migration is over; a result only if it did not exit cleanly."""


class Hooks(Protocol):
    """What a migration needs of the hook runner (orchestrator.core.hooks.HookRunner, or a fake)."""

    def attach(self, log: str, fd: int) -> None:
        """Record every hook started from now on in the run log `log` (open as `fd`)."""

    def detach(self) -> None:
        """The run is over (its run log is closed once its hooks have ended)."""

    @property
    def supervisor_pid(self) -> int | None:
        """The hook supervisor's process, written in the run log (None: hooks are not run by one)."""

    def start(
        self,
        hook: Hook,
        values: Mapping[str, str],
        device_id: str | None = None,
        on_done: Callable[[HookResult], None] | None = None,
        *,
        index: int | None = None,
    ) -> Started:
        """Start one hook now; `on_done` gets its result. `index`: its place among its trigger's hooks."""

    def run(self, hook: Hook, values: Mapping[str, str], device_id: str | None = None) -> HookResult:
        """Run one hook to its end (with its retries)."""

    def arm(self, hook: Hook, values: Mapping[str, str]) -> Armed:
        """Start an armed hook."""


class NullJournal:
    """No journal (a dry run, or a caller that keeps none): every record is dropped."""

    def begin_migration(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    def record_phase(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    def run_log(self, migration_id: str) -> RunLog | None:
        """None: no run log."""
        return None

    def record_device_action(self, *args: Any, **kwargs: Any) -> str | None:
        """Dropped."""
        return None

    def record_hook(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    def finish_migration(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    @property
    def failures(self) -> list[str]:
        """Nothing was written, so nothing failed."""
        return []


COMPRESSION_METHODS = ("mt", "xbzrle", "zlib", "zstd")  # what libvirt accepts for QEMU
MAX_PARALLEL_CONNECTIONS = 255  # QEMU's multifd-channels limit


@dataclass(frozen=True)
class JobOptions:
    """Per-run options of the libvirt job, as `virsh migrate` names them (not part of a policy)."""

    tls: bool = False
    parallel_connections: int | None = None  # --parallel-connections N (--parallel alone: QEMU's 2)
    compression_methods: tuple[str, ...] = ()  # --comp-methods
    copy_storage_all: bool = False
    migrate_disks: tuple[str, ...] = ()
    dest_name: str | None = None  # --dname
    dest_xml: str | None = None  # the text of --xml FILE
    disks_uri: str | None = None  # --disks-uri: the disks' NBD copy (needed with a unix:// --migrateuri)

    def validate(self) -> None:
        """One clear line for each bad option."""
        if (
            self.parallel_connections is not None
            and not 1 <= self.parallel_connections <= MAX_PARALLEL_CONNECTIONS
        ):
            raise BadInput(
                f"--parallel-connections must be between 1 and {MAX_PARALLEL_CONNECTIONS}, "
                f"not {self.parallel_connections}",
                "fix --parallel-connections",
            )
        unknown = [m for m in self.compression_methods if m not in COMPRESSION_METHODS]
        if unknown:
            raise BadInput(
                f"--comp-methods {','.join(unknown)}: not a compression method",
                f"use some of {','.join(COMPRESSION_METHODS)}",
            )
        if any(not disk.strip() for disk in self.migrate_disks):
            raise BadInput("--migrate-disks has an empty disk name", "name disks by target, e.g. vda,vdb")
        if self.dest_name is not None and not self.dest_name.strip():
            raise BadInput("--dname is empty", "give the name the domain takes on the destination")


@dataclass(frozen=True)
class Request:
    """What the user asked for."""

    domain: str
    source_uri: str
    destination_uri: str
    policy: Policy
    settings: MigrationSettings | None = None  # the policy's, with CLI overrides applied
    drain: DrainMode | None = None  # the CLI's --drain, overriding the policy's
    listen_address: str | None = None
    postcopy: bool = False
    dry_run: bool = False
    job: JobOptions = field(default_factory=JobOptions)

    @property
    def destination_domain(self) -> str:
        """The domain's name on the destination (--dname renames it)."""
        return self.job.dest_name or self.domain

    @property
    def migration(self) -> MigrationSettings:
        """The effective migration settings."""
        return self.settings or self.policy.migration

    @property
    def switchover(self) -> Switchover:
        """The effective switchover settings."""
        switchover = self.policy.switchover
        return replace(switchover, drain=self.drain) if self.drain else switchover


def same_machine(
    source_uri: str, destination_uri: str, *, p2p: bool, names: Sequence[str] = ()
) -> str | None:
    """Why the destination URI names the source's own machine, if it does (None otherwise).

    libvirt refuses such a migration only once the job has started. Peer-to-peer, the source's daemon
    resolves the destination URI, so a loopback name always means the source itself; and when the
    source is this machine (a URI without a host), so does this machine's own name. `names` are this
    machine's host names.
    """
    host = urlsplit(destination_uri).hostname
    if not host:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost" or host.startswith("localhost.")
    source_is_here = not urlsplit(source_uri).hostname
    if loopback and p2p:
        return f"{host} in the destination URI is the source host itself (its daemon resolves the URI)"
    if source_is_here and (loopback or host in names):
        return f"{host} in the destination URI is this machine, where the source runs"
    return None


def plan_lines(request: Request, devices: Sequence[str], events_note: str) -> list[str]:
    """What would run when, in words (for --dry-run and the report)."""
    policy, settings, switchover = request.policy, request.migration, request.switchover
    schedule = Schedule.of(switchover, settings)
    lines = [f"policy {policy.name}" + (f" ({policy.path})" if policy.path else "")]
    for hook in policy.hooks_for(Trigger.BEFORE):
        lines.append(
            f"before: run {' '.join(hook.argv)} (timeout {hook.timeout_ms} ms, on failure {hook.on_failure})"
        )
    mode = "peer-to-peer" if settings.mode is MigrationMode.P2P else "client-driven"
    extras = [
        f"data over {settings.data_uri}" if settings.data_uri else "",
        f"bandwidth {settings.bandwidth_mib} MiB/s" if settings.bandwidth_mib else "",
        f"abort after {settings.completion_timeout_s:g} s" if settings.completion_timeout_s else "",
        f"abort when stalled for {schedule.stall_timeout_s:g} s" if schedule.stall_timeout_s else "",
        "persist on destination" if settings.persist else "",
        "undefine source" if settings.undefine_source else "",
    ]
    lines.append(
        f"migrate {request.domain} live ({mode}) {request.source_uri} -> {request.destination_uri}: "
        + ", ".join(e for e in extras if e)
    )
    gated = switchover.drain is DrainMode.GATED
    first = "once the gate opens" if gated else "from the start"
    steps = "; ".join(
        f"{step.downtime_ms} ms " + (schedule.describe(i).split(" ", 2)[2] if i else first)
        for i, step in enumerate(schedule.steps)
    )
    floor = (
        f"{GATE_FLOOR_MS} ms (the gate's floor) until every covered device is drained, then " if gated else ""
    )
    lines.append(f"downtime limit: {floor}{steps}")
    covered = ", ".join(devices) if devices else "none known from the XML"
    lines.append(
        f"devices covered: {covered}; also any device id matching {list(policy.devices.match)} that emits"
    )
    lines.append(events_note)
    when = {
        DrainMode.PREPARE: "on pre-copy-p2p-prepare of each covered device (late: first P2P state on QEMU "
        "< 11.0)",
        DrainMode.GATED: "gated: the job holds QEMU in pre-copy (downtime limit at its floor); once "
        "QEMU would converge, every covered device is drained, then the limit is raised and QEMU "
        "switches over (a device that quiesces first is drained on its prepare event)",
        DrainMode.START: "before the job starts, every covered device",
    }[switchover.drain]
    for hook in policy.hooks_for(Trigger.DRAIN):
        armed = " (armed: started with the migration, woken through its stdin)" if hook.armed else ""
        lines.append(
            f"drain {when}: run {' '.join(hook.argv)}{armed} (deadline {hook.timeout_ms} ms, "
            f"on failure {hook.on_failure})"
        )
    for hook in policy.hooks_for(Trigger.UNDRAIN):
        lines.append(f"when that device runs again (destination or source): run {' '.join(hook.argv)}")
    for trigger in (Trigger.AFTER_SUCCESS, Trigger.AFTER_FAILURE):
        for hook in policy.hooks_for(trigger):
            lines.append(f"{trigger}: run {' '.join(hook.argv)}")
    if not policy.hooks_for(Trigger.DRAIN):
        lines.append("no drain hooks: events are relayed and journaled only")
    return lines


class Migration:
    """One migration of one VM between two open hosts."""

    def __init__(
        self,
        request: Request,
        source: Hypervisor,
        destination: Hypervisor,
        *,
        journal: JournalLike | None = None,
        runner: Hooks | None = None,
        clock: Clock | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_entry: Callable[[TimelineEntry], None] | None = None,
        on_plan: Callable[[Sequence[str]], None] | None = None,
        migration_id: str | None = None,
        parent: str | None = None,
        lock_dir: Path | None = None,
        lock_wait_s: float = 0.0,
    ) -> None:
        self.request = request
        self.source = source
        self.destination = destination
        self.journal: JournalLike = journal or NullJournal()
        self.runner: Hooks = runner or HookRunner()
        self.clock: Clock = clock or SystemClock()
        self.on_progress = on_progress
        self.on_entry = on_entry
        self.on_plan = on_plan
        self.parent = parent
        self.lock_dir = lock_dir  # None: no lock (a caller that serialises migrations itself, tests)
        self.lock_wait_s = lock_wait_s
        self._vm_lock: MigrationLock | None = None
        self.id = migration_id or uuid.uuid4().hex[:12]
        policy = request.policy
        self.report = Report(
            migration_id=self.id,
            domain=request.domain,
            source=request.source_uri,
            destination=request.destination_uri,
            policy=policy.name,
            drain_mode=request.switchover.drain.value,
            started=self.clock.time(),
        )
        self.machine = MigrationMachine(
            request.switchover.drain,
            Schedule.of(request.switchover, request.migration),
            self.clock,
            drain_hooks=len(policy.hooks_for(Trigger.DRAIN)),
            undrain_hooks=len(policy.hooks_for(Trigger.UNDRAIN)),
            covers=policy.devices.covers,
        )
        machine_lock = threading.RLock()
        self._cv = threading.Condition(machine_lock)  # events, hooks' ends, phases
        # What the job's poll loop waits on: only the job's end, not every event. Woken by each event,
        # that thread took the interpreter's lock just as the next device's event (often ~0.1 ms after a
        # device's P2P state) needed it.
        self._job_end = threading.Condition(machine_lock)
        self._lock = threading.Lock()  # the report's lists, appended to from several threads
        self._downtime_lock = threading.Lock()  # downtime changes applied in the order decided
        self._dom: Guest | None = None
        self._subs: list[Subscription] = []
        self._job_done = False
        self._abort_sent = False
        self._armed: dict[int, Armed] = {}  # by id() of the policy's Hook
        # VFIO events that needed no action, recorded (journal, timeline) a little later: see on_event
        self._deferred: collections.deque[VfioEvent] = collections.deque()
        self._bookkeeping = threading.Lock()  # one flush at a time, in order
        self._arrivals: _Arrivals | None = None
        self._by_name: Subscription | None = None

    # --- the hot path: libvirt's event thread ---------------------------------------------------
    def _listener(self, role: Role) -> Callable[[str, str, int, int, dict[str, Any] | None], None]:
        host = role.value

        def on_event(domain: str, name: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            received = self.clock.time()
            # The subscription already filtered the domain and the event names (see _subscribe).
            if name not in vfio.EVENTS:
                self._record_qemu(host, role, name, seconds + micros / 1e6, received, data)
                return
            try:
                event = VfioEvent.from_qmp(host, role, domain, seconds, micros, data, received, name)
            except ValueError as exc:
                self._note(str(exc))
                return
            with self._cv:
                if not self.machine.following:
                    return  # not our job's: before it started (another migration's?) or after settling
                actions = self.machine.on_vfio(event)
            if actions:
                self._execute(actions)  # spawn first: everything else can wait
                self._record_vfio(event)
            else:
                # A state the machine only notes (a device's P2P state, say): its records wait for the
                # next event or the next poll (<= POLL_S). The next device's prepare event often comes
                # ~0.1 ms after it, and recording it here (~0.1 ms on a CPU cold from the device's quiet
                # time) delayed that event's drain by as much (measured on the lab, 8 devices).
                self._deferred.append(event)
            with self._cv:
                self._cv.notify_all()

        return on_event

    def _execute(self, actions: Sequence[Action]) -> None:
        """Carry out the machine's actions (never with `_cv` held by this call)."""
        for action in actions:
            if isinstance(action, RunHooks):
                self._run_device_hooks(action)
            elif isinstance(action, AbortJob):
                self._abort_job(action.reason)
            elif isinstance(action, SetDowntime):
                self._set_downtime(action)
            elif isinstance(action, Note):
                self._note(action.text, report=not action.timeline_only)

    def _run_device_hooks(self, action: RunHooks) -> None:
        device, trigger = action.device_id, action.trigger
        values: Mapping[str, str] | None = None  # the placeholders' values: spawned hooks only
        # Written down BEFORE any hook starts (one write to the run log): a kill at any instant after
        # this leaves a record `recover` acts on; the supervisor writes each hook's start and end itself.
        failure = self.journal.record_device_action(
            self.id, device, trigger.value, "starting", self.clock.time(), action.reason
        )
        for index, hook in enumerate(self.request.policy.hooks_for(trigger)):
            done = self._device_hook_done(hook.on_failure)
            armed = self._armed.get(id(hook))
            if armed is not None:
                armed.fire(device, action.state, action.qemu_time, done)
            else:
                if values is None:
                    values = self._values(device, action.qom_path, action.state)
                self.runner.start(hook, values, device, done, index=index)
        if trigger is Trigger.DRAIN:
            # Hand the CPU to the hooks just started or told: Linux lets the parent run on first, and
            # our bookkeeping below would otherwise delay the drain by ~1 ms on a busy host.
            os.sched_yield()
        self._flush_deferred()  # what happened before this action is recorded before what follows
        if failure:
            self._note(f"{failure}: the hooks run all the same")
        text = f"{trigger} {device}: {action.reason}"
        self._entry(self.clock.time(), "orchestrator", "decision", text)

    def _device_hook_done(self, on_failure: OnFailure) -> Callable[[HookResult], None]:
        def done(result: HookResult) -> None:
            self._record_hook(result)
            device = result.device_id or ""
            failure = None
            if not result.ok:
                failure = f"{result.trigger} hook {result.label} for {device} failed: {result.error}"
            with self._cv:
                actions = self.machine.on_hook_done(
                    result.trigger, device, failure, on_failure is OnFailure.ABORT
                )
                finished = self.machine.pending(device) == 0
                self._cv.notify_all()
            if finished:
                self.journal.record_device_action(
                    self.id, device, result.trigger.value, "failed" if failure else "done", self.clock.time()
                )
            self._execute(actions)

        return done

    def _abort_job(self, reason: str) -> None:
        dom, first = self._dom, not self._abort_sent
        self._abort_sent = True
        if dom is None:
            return
        try:
            dom.abort_job()
        except OrchestratorError as exc:
            if first:
                self._note(f"could not abort the job: {exc.message}")

    def _set_downtime(self, action: SetDowntime) -> None:
        dom = self._dom
        if dom is None:
            return
        with self._downtime_lock:
            try:
                dom.set_max_downtime(action.ms)
            except OrchestratorError as exc:
                self._note(f"could not set the downtime limit to {action.ms} ms: {exc.message}")
                return
        self._entry(self.clock.time(), "orchestrator", "decision", action.why)
        self.journal.record_event(
            self.id, "orchestrator", None, "note", action.why, None, None, None, self.clock.time(), None
        )

    # --- control --------------------------------------------------------------------------------
    def abort(self, reason: str, outcome: Outcome = Outcome.ROLLED_BACK) -> None:
        """Abort the migration (from any thread); the first reason wins."""
        self._feed(lambda: self.machine.request_abort(reason, outcome))

    def interrupt(self, signal_name: str) -> None:
        """Ctrl-C or SIGTERM: abort the job, undrain, then the caller exits. Call it from a thread of
        its own, not from a signal handler (it takes the migration's lock)."""
        self.abort(f"{signal_name} received", Outcome.INTERRUPTED)

    def hung_up(self) -> None:
        """SIGHUP: the terminal hung up (the admin's ssh session died). The migration goes on (its job runs
        in libvirt anyway), is undrained and recorded; this says so in its story."""
        self._note(
            "the terminal hung up (SIGHUP): the migration goes on; its story: "
            f"orchestrator history {self.id}",
            report=False,
        )

    def _feed(self, decide: Callable[[], list[Action]]) -> None:
        with self._cv:
            actions = decide()
            self._cv.notify_all()
        self._execute(actions)

    def _advance(self, phase: Phase) -> None:
        with self._cv:
            self.machine.advance(phase)
        self._phase_recorded(phase)

    def _phase_recorded(self, phase: Phase) -> None:
        self._flush_deferred()
        at = self.clock.time()
        self.journal.record_phase(self.id, phase.value, at)
        if phase is not Phase.DONE:
            self._entry(at, "orchestrator", "phase", f"phase {phase.value}")

    # --- the flow -----------------------------------------------------------------------------
    def run(self) -> Report:
        """Pre-flight, then migrate; returns the report (never raises for a failed migration)."""
        report = self.report
        try:
            try:
                dom = self._preflight()
            except OrchestratorError as exc:
                report.outcome, report.error = Outcome.REFUSED, exc.line()
                with contextlib.suppress(OrchestratorError):  # the refusal says more than the journal
                    self._record_unmoved(int(exc.code))
                raise
            if self.on_plan is not None:
                self.on_plan(report.plan)
            if dom is None or self.request.dry_run:
                self._advance(Phase.DONE)
                self._record_unmoved(int(report.exit_code))
                return report
            self._migrate(dom)
        finally:
            if self._vm_lock is not None:
                self._vm_lock.release()
        return report

    def _record_unmoved(self, exit_code: int) -> None:
        """A run that changed nothing (unchanged, refused) is journaled too, so that `history` tells the
        whole story; a dry run (Ansible's check mode) writes nothing at all."""
        report = self.report
        report.ended = self.clock.time()
        if self.request.dry_run:
            return
        self._begin(hooks=False)
        self.journal.finish_migration(
            self.id, report.outcome.value, False, report.error, exit_code, report.ended, report.to_json()
        )

    def _lock_vm(self, dom: Guest) -> None:
        """One migration per VM per host at a time: taken in the pre-flight, before it looks for a
        running job (waiting `lock_wait_s` for another run to end), held until everything is undone.
        MigrationBusy names the run that holds it."""
        if self.lock_dir is None or self._vm_lock is not None:
            return
        from orchestrator.edges.locks import MigrationLock

        self._vm_lock = MigrationLock.acquire(
            self.lock_dir,
            dom.uuid(),
            self.id,
            domain=self.request.domain,
            source=self.request.source_uri,
            wait_s=self.lock_wait_s,
        )

    def _migrate(self, dom: Guest) -> None:
        report = self.report
        self._begin()
        location: Location | None = None
        try:
            self._advance(Phase.SUBSCRIBED)
            self._subscribe(dom)
            self._advance(Phase.BEFORE_HOOKS)
            if self._run_before_hooks() and self._arm() and self.request.switchover.drain is DrainMode.START:
                self._advance(Phase.DRAINING)
                self._drain_ahead()
            if self.machine.abort_reason is None:
                self._run_job(dom)
        finally:
            self._advance(Phase.SETTLING)
            self._settle()
            self._disarm()
            self._unsubscribe()
            if self.machine.job is not JobState.NOT_STARTED:
                location = self._where()
            self._conclude(location)
            self._advance(Phase.AFTER_HOOKS)
            self._run_after_hooks()
            self._advance(Phase.DONE)
            report.ended = self.clock.time()
            self.runner.detach()
            self.journal.finish_migration(
                self.id,
                report.outcome.value,
                report.changed,
                report.error,
                int(report.exit_code),
                report.ended,
                report.to_json(),
            )
            lost = self.journal.failures  # a record it could not write, or the import that failed
            if lost:
                more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
                self.report.journal_error = lost[0] + more

    def _begin(self, *, hooks: bool = True) -> None:
        """The migration's first record (its run log begins); with `hooks`, the hook supervisor records
        each hook's start and end there too (a run that changed nothing runs none)."""
        policy = self.request.policy
        text = _policy_text(policy.path)
        self.journal.begin_migration(
            self.id,
            "evacuate-item" if self.parent else "migrate",
            self.request.domain,
            self.request.source_uri,
            self.request.destination_uri,
            str(policy.path) if policy.path else policy.name,
            self.report.started,
            parent=self.parent,
            drain_mode=self.request.switchover.drain.value,
            policy_text=text,
            policy_sha256=sha256_hex(text.encode()) if text is not None else None,
            supervisor=self.runner.supervisor_pid if hooks else None,
        )
        log = self.journal.run_log(self.id)
        if hooks and log is not None:  # the supervisor records each hook's start and end there itself
            self.runner.attach(self.id, log.fd)

    def _preflight(self) -> Guest | None:
        """Check the request against both hosts; None when there is nothing to do (already there)."""
        request, report = self.request, self.report
        if request.postcopy:
            raise BadInput(
                "post-copy migration is refused: VFIO forbids it (QEMU: 'VFIO migration is not supported "
                "with postcopy migration')",
                "drop --postcopy",
            )
        if request.source_uri == request.destination_uri:
            raise BadInput(
                f"source and destination are the same host ({request.destination_uri})",
                "give a different destination URI",
            )
        names = (os.uname().nodename,)  # = gethostname(); not getfqdn(): DNS could stall the pre-flight
        local = same_machine(
            request.source_uri,
            request.destination_uri,
            p2p=request.migration.mode is MigrationMode.P2P,
            names=names,
        )
        if local is not None:
            raise BadInput(
                f"cannot migrate {request.domain} to {request.destination_uri}: {local}",
                "give the destination's own host name (as the source host resolves it)",
            )
        dom = self.source.find_domain(request.domain)
        if dom is not None and not request.dry_run and dom.state() not in (SHUT_OFF, GONE):
            # Another run of ours on this VM: MigrationBusy names it, or we wait for it (--lock-wait);
            # what follows sees the VM as that run left it.
            self._lock_vm(dom)
        there = self.destination.find_domain(request.destination_domain)
        there_running = there is not None and there.state() in ACTIVE_STATES
        if dom is None or dom.state() in (SHUT_OFF, GONE):
            if there_running:
                report.outcome = Outcome.UNCHANGED
                report.plan = [f"{request.domain} already runs on {request.destination_uri}: nothing to do"]
                return None
            if dom is None:
                raise BadInput(
                    f"no domain {request.domain!r} on {request.source_uri}",
                    f"list them with: virsh -c '{request.source_uri}' list --all",
                )
            raise BadInput(
                f"domain {request.domain!r} is not running on {request.source_uri}",
                f"start it first (only running VMs are live-migrated): virsh -c '{request.source_uri}' "
                f"start {request.domain}",
            )
        if request.dry_run and dom.job_stats() is not None and self.lock_dir is not None:
            self._lock_vm(dom)  # a dry run: our own kind's job? MigrationBusy names that migration
            assert self._vm_lock is not None
            self._vm_lock.release()
            self._vm_lock = None
        if dom.job_stats() is not None:
            raise BadInput(
                f"domain {request.domain!r} already has a libvirt job running on {request.source_uri} "
                "(another migration?)",
                f"wait for it, or see: virsh -c '{request.source_uri}' domjobinfo {request.domain}",
            )
        if there_running:
            raise BadInput(
                f"domain {request.domain!r} runs on both {request.source_uri} and {request.destination_uri} "
                "(two URIs of the same host, or two copies of the VM)",
                "give the URI of another host, or stop the copy that should not run",
            )
        problems = preflight(request.policy.all_hooks())
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BadInput(
                f"{problems[0]}{more}",
                f"fix the hooks of policy {request.policy.name} (for {request.domain})",
            )
        devices, events_note = self._check_events(dom)
        self.machine.learn_devices(devices)
        report.plan = plan_lines(request, devices, events_note)
        if request.dry_run:
            report.outcome = Outcome.PLANNED
        return dom

    def _check_events(self, dom: Guest) -> tuple[list[str], str]:
        """Covered VFIO devices from the live XML, and whether their events are on."""
        policy = self.request.policy
        status = domxml.events_status(dom.xml())
        covered = [
            d
            for d in (*status.devices, *status.commandline_devices)
            if d.alias and policy.devices.covers(d.alias, d.host_address if d.kind == "pci" else None)
        ]
        names = [d.alias or "?" for d in covered]
        off = [d.alias or "?" for d in covered if not status.device_enabled(d)]
        if off:
            if policy.when_events_off is WhenEventsOff.REFUSE:
                raise BadInput(
                    f"VFIO device(s) {', '.join(off)} of {self.request.domain} run without migration-events, "
                    "so no drain could be triggered",
                    f"run: orchestrator events enable -c {shell_uri(self.request.source_uri)} "
                    f"{shlex.quote(self.request.domain)}, then cold-boot the VM (or copy policy "
                    f"{policy.name} to /etc/orchestrator/policies/NAME.toml with events.when_off = "
                    '"proceed")',
                )
            self.machine.disable_hooks()
            note = f"events off for {', '.join(off)}: migrating WITHOUT device hooks (policy says proceed)"
            self.report.notes.append(note)
            return names, note
        if status.global_on:
            note = "events: -global vfio-pci.migration-events=on (every vfio-pci device emits)"
        elif covered:
            note = "events: on for every covered device"
        else:
            note = "events: no VFIO hostdev in the XML; any device that emits is followed"
        return names, note

    def _subscribe(self, dom: Guest) -> None:
        events = sorted(_FOLLOWED_EVENTS)
        self._subs.append(
            self.source.subscribe_monitor_events(self._listener(Role.SOURCE), events=events, dom=dom)
        )
        # The incoming domain does not exist yet on the destination: filtered by name here, which means
        # every domain's events cross the connection, until `_narrow_destination` follows the domain.
        self._arrivals = _Arrivals(self._listener(Role.DESTINATION))
        self._by_name = self.destination.subscribe_monitor_events(
            self._arrivals, events=events, domain=self.request.destination_domain
        )
        self._subs.append(self._by_name)

    def _narrow_destination(self) -> None:
        """Once the incoming domain exists, follow it by object (libvirt then filters for us) and drop the
        subscription by name; an event delivered through both in the handover counts once."""
        if self._by_name is None or self._arrivals is None:
            return
        there = self.destination.find_domain(self.request.destination_domain)
        if there is None:
            return
        events = sorted(_FOLLOWED_EVENTS)
        self._subs.append(self.destination.subscribe_monitor_events(self._arrivals, events=events, dom=there))
        self._by_name.cancel()
        self._by_name = None

    def _unsubscribe(self) -> None:
        for sub in self._subs:
            sub.cancel()
        self._subs.clear()

    def _run_before_hooks(self) -> bool:
        for hook in self.request.policy.hooks_for(Trigger.BEFORE):
            result = self.runner.run(hook, self._values(state="before"))
            self._record_hook(result)
            if not result.ok and hook.on_failure is OnFailure.ABORT:
                self.abort(f"before hook {result.label} failed: {result.error}", Outcome.ABORTED)
                return False
            if self.machine.abort_reason is not None:
                return False
        return self.machine.abort_reason is None

    def _arm(self) -> bool:
        """Start the armed drain and undrain hooks and wait until each is ready; False when one with
        on_failure=abort could not arm (the migration is then aborted before its job)."""
        for trigger in (Trigger.DRAIN, Trigger.UNDRAIN):
            for hook in self.request.policy.hooks_for(trigger):
                if not hook.armed:
                    continue
                armed = self._armed[id(hook)] = self.runner.arm(hook, self._values(state="armed"))
                result = armed.wait_ready()
                self._record_hook(result)
                if not result.ok and hook.on_failure is OnFailure.ABORT:
                    self.abort(f"{trigger} hook {result.label}: {result.error}", Outcome.ABORTED)
        return self.machine.abort_reason is None

    def _disarm(self) -> None:
        """Close the armed hooks (their stdin); report any that did not exit cleanly."""
        for armed in self._armed.values():
            result = armed.close()
            if result is not None:
                self._record_hook(result)
                self._note(f"armed hook {result.label}: {result.error}")
        self._armed.clear()

    def _drain_ahead(self) -> None:
        """drain=start: drain every covered device and wait for the hooks (bounded by their deadlines)."""
        self._feed(self.machine.drain_ahead)
        with self._cv:
            while self.machine.drains_running():
                self.clock.wait(self._cv, 0.5)

    def _run_job(self, dom: Guest) -> None:
        request = self._migrate_request(dom)
        self._dom = dom
        # Before the job: libvirt keeps the limit for the job and restores the old one after it.
        dom.set_max_downtime(self.machine.initial_downtime())
        with self._cv:
            if self.machine.abort_reason is not None:  # interrupted just now
                return
            self.machine.advance(Phase.JOB_RUNNING)
            self.machine.job_started()
        self._phase_recorded(Phase.JOB_RUNNING)
        began = self.clock.monotonic()
        self.source.start_migration(dom, request, self.destination, self._job_ended)
        progress = Progress()
        next_poll = self.clock.monotonic() + POLL_S
        while True:
            with self._cv:
                # Only the job's end cuts the poll interval short (events do not even wake this
                # thread): a poll right after each event would take the GIL just as the next device's
                # event (often microseconds later) needs it.
                while not self._job_done and (left := next_poll - self.clock.monotonic()) > 0:
                    self.clock.wait(self._job_end, left)
                if self._job_done:
                    break
            next_poll = self.clock.monotonic() + POLL_S
            self._flush_deferred()
            try:
                stats = dom.job_stats()
                self._narrow_destination()
            except OrchestratorError as exc:
                self._note(f"could not read the job's statistics: {exc.message}")
                stats = None
            if stats is not None and self.on_progress is not None:
                progress = progress.advance(stats)
                self.on_progress(progress)
            self._feed(functools.partial(self.machine.on_tick, stats))
        self.report.job_s = self.clock.monotonic() - began
        if self.machine.job is JobState.SUCCEEDED and self.on_progress is not None:
            self.on_progress(replace(progress, fraction=1.0))

    def _job_ended(self, error: OrchestratorError | None) -> None:
        """The job's thread: the migration call returned."""
        with self._cv:
            actions = self.machine.on_job_end(None if error is None else error.message)
            self._job_done = True
            self._cv.notify_all()
            self._job_end.notify_all()
        self._execute(actions)

    def _migrate_request(self, dom: Guest) -> MigrateRequest:
        settings, job = self.request.migration, self.request.job
        request = MigrateRequest(
            destination_uri=self.request.destination_uri,
            peer2peer=settings.mode is MigrationMode.P2P,
            persist=settings.persist,
            undefine_source=settings.undefine_source,
            # `{domain}` lets one policy give each of several concurrent migrations its own socket.
            data_uri=settings.data_uri.replace("{domain}", self.request.domain)
            if settings.data_uri
            else None,
            listen_address=self.request.listen_address,
            bandwidth_mib=settings.bandwidth_mib or None,
            compressed=settings.compressed,
            compression_methods=job.compression_methods,
            auto_converge=settings.auto_converge,
            tls=job.tls,
            parallel_connections=job.parallel_connections,
            copy_storage_all=job.copy_storage_all,
            migrate_disks=job.migrate_disks,
            dest_name=job.dest_name,
            disks_uri=job.disks_uri,
        )
        # Carry the events property into the destination's live and persistent definitions (into the
        # user's own --xml when given).
        from orchestrator.core.domxml_edit import destination_xml

        given = job.dest_xml
        migratable = given if given is not None else dom.xml(migratable=True)
        dest = destination_xml(migratable)
        if dest == migratable and given is None:
            return request
        return replace(request, dest_xml=dest, persist_xml=dest if request.persist else None)

    def _settle(self) -> None:
        """Wait (bounded) for the events that undrain; then undrain whatever is still drained, and wait
        for every hook to end."""
        deadline = self.clock.monotonic() + SETTLE_S
        with self._cv:
            while self.machine.busy() and (left := deadline - self.clock.monotonic()) > 0:
                self.clock.wait(self._cv, min(0.5, left))
            actions = self.machine.force_undrain()
        self._execute(actions)
        with self._cv:
            while self.machine.busy():
                self.clock.wait(self._cv, 0.5)

    def _where(self) -> Location:
        """Where the VM runs now, asked of both hosts (a failure to ask counts as not running there)."""
        running = []
        for host, name in (
            (self.source, self.request.domain),
            (self.destination, self.request.destination_domain),
        ):
            try:
                dom = host.find_domain(name)
                running.append(dom is not None and dom.state() in ACTIVE_STATES)
            except OrchestratorError as exc:
                self._note(f"could not ask {host.uri} where {self.request.domain} runs: {exc.message}")
                running.append(False)
        on_source, on_destination = running
        if on_source and on_destination:
            return Location.BOTH
        if on_source:
            return Location.SOURCE
        return Location.DESTINATION if on_destination else Location.NEITHER

    def _conclude(self, location: Location | None) -> None:
        report, machine = self.report, self.machine
        with self._cv:
            report.outcome, report.error = machine.conclude(location)
            report.devices = machine.devices()
            report.undrain_failed = machine.undrain_failed
            report.gate = machine.gate.value if machine.gate is not None else None
        report.location = location.value if location is not None else Location.SOURCE.value  # never left
        if report.undrain_failed:  # in the journal's error too, not only in the exit code
            failed = sorted(
                {h.device_id or "?" for h in report.failed_hooks() if h.trigger is Trigger.UNDRAIN}
            )
            undrain = f"the undrain of {', '.join(failed)} failed: its workloads may still be drained"
            report.error = f"{report.error}; {undrain}" if report.error else undrain
        if report.outcome is Outcome.SUCCEEDED:
            there = self.destination.find_domain(self.request.destination_domain)
            stats = there.completed_job_stats() if there is not None else None
            if stats is not None and stats.expected_downtime_ms is not None:
                report.downtime_ms = stats.expected_downtime_ms
        if (
            location is not None
            and location is not Location.SOURCE
            and report.outcome is not Outcome.SUCCEEDED
        ):
            self._note(f"after the job the VM runs on: {location.value}")

    def _run_after_hooks(self) -> None:
        outcome = self.report.outcome
        trigger = Trigger.AFTER_SUCCESS if outcome is Outcome.SUCCEEDED else Trigger.AFTER_FAILURE
        for hook in self.request.policy.hooks_for(trigger):
            self._record_hook(self.runner.run(hook, self._values(state=outcome.value)))

    # --- records --------------------------------------------------------------------------------
    def _values(self, device: str = "", qom_path: str = "", state: str = "") -> dict[str, str]:
        return {
            "domain": self.request.domain,
            "device_id": device,
            "qom_path": qom_path,
            "state": state,
            "migration_id": self.id,
            "source": self.request.source_uri,
            "destination": self.request.destination_uri,
        }

    def _record_hook(self, result: HookResult) -> None:
        self._flush_deferred()
        self.journal.record_hook(self.id, result.to_json())
        self._entry(result.started, "orchestrator", "hook", _hook_text(result))
        with self._lock:
            self.report.hooks.append(result)

    def _entry(self, at: float, host: str, kind: str, text: str) -> None:
        self._flush_deferred()
        self._timeline(at, host, kind, text)

    def _timeline(self, at: float, host: str, kind: str, text: str) -> None:
        entry = TimelineEntry(at, host, kind, text)
        with self._lock:
            self.report.timeline.append(entry)
        if self.on_entry is not None:
            self.on_entry(entry)

    def _note(self, text: str, *, report: bool = True) -> None:
        now = self.clock.time()
        if report:
            with self._lock:
                self.report.notes.append(text)
        self._entry(now, "orchestrator", "note", text)
        self.journal.record_event(self.id, "orchestrator", None, "note", text, None, None, None, now, None)

    def _flush_deferred(self) -> None:
        """Record the deferred events, oldest first (any thread; cheap when there are none)."""
        if not self._deferred:
            return
        with self._bookkeeping:
            while self._deferred:
                self._record_vfio_now(self._deferred.popleft())

    def _record_vfio(self, event: VfioEvent) -> None:
        self._flush_deferred()
        self._record_vfio_now(event)

    def _record_vfio_now(self, event: VfioEvent) -> None:
        self.journal.record_event(
            self.id,
            event.host,
            event.role.value,
            "vfio",
            "VFIO_MIGRATION",
            event.device_id,
            str(event.state),
            event.qemu_time,
            event.received,
            {"qom_path": event.qom_path},
        )
        self._timeline(event.qemu_time, event.host, "event", f"{event.device_id} -> {event.state}")

    def _record_qemu(
        self, host: str, role: Role, name: str, qemu_time: float, received: float, data: dict[str, Any] | None
    ) -> None:
        self._flush_deferred()
        self.journal.record_event(
            self.id, host, role.value, "qemu", name, None, None, qemu_time, received, data
        )
        status = (data or {}).get("status")
        self._entry(qemu_time, host, "event", f"{name} {status}" if status else name)


class _Arrivals:
    """The destination's events, through the subscription by name and then the one by object: while
    both are registered libvirt delivers an event to each, so one seen already (same event, same
    QEMU timestamp) is dropped."""

    _REMEMBERED = 64

    def __init__(self, deliver: Callable[[str, str, int, int, dict[str, Any] | None], None]) -> None:
        self._deliver = deliver
        self._seen: collections.deque[tuple[str, int, int, str | None]] = collections.deque(
            maxlen=self._REMEMBERED
        )
        self._lock = threading.Lock()

    def __call__(
        self, domain: str, name: str, seconds: int, micros: int, data: dict[str, Any] | None
    ) -> None:
        key = (name, seconds, micros, None if data is None else str(data))
        with self._lock:
            if key in self._seen:
                return
            self._seen.append(key)
        self._deliver(domain, name, seconds, micros, data)


def _hook_text(result: HookResult) -> str:
    device = f" {result.device_id}" if result.device_id else " (armed process)" if result.arming else ""
    status = "ok" if result.ok else (result.error or "failed")
    return f"{result.trigger}{device}: {result.label} ({result.duration_ms:.0f} ms, {status})"


def _policy_text(path: Path | None) -> str | None:
    """The policy file's text, journaled so that `recover` runs the very hooks the migration used."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
