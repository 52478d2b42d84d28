"""One VM's live migration: the driver that carries out the phase machine's decisions.

`orchestrator.core.phases.MigrationMachine` decides what to do; this module does the I/O around it: the
monitor events, the hooks, the libvirt job and its statistics, the settling and the report's
conclusion. Its collaborators each do one part: `orchestrator.flows.preflight` checks the request
against both hosts first (and takes the VM's lock), `orchestrator.flows.subscriptions` holds the event
subscriptions, `orchestrator.flows.job` gives the job's parameters and turns its downtime limit and
abort, `orchestrator.flows.story` writes every record (journal, timeline, notes). It reaches libvirt
only through the narrow `Hypervisor` and `Guest` interface (`orchestrator.core.hypervisor`), so the
unit tests drive every path of it on a scripted fake, on a fake clock.

Threads (all of the program's: docs/ARCHITECTURE.md): libvirt's event thread delivers monitor events
(the hot path: event -> decision -> spawn, nothing else first); the hook supervisor's reader thread and
each armed hook's reader report the hooks' ends; the job's own thread reports its end; the caller's
thread moves through the phases and reads the job's statistics. One lock (`_cv`,
and `_job_end` on the same lock) guards the machine; actions are carried out after it is released,
so a slow libvirt call never holds up an event.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.core import vfio
from orchestrator.core.actions import (
    AbortJob,
    Action,
    JobState,
    Location,
    Note,
    RunHooks,
    SetDowntime,
    TellGroup,
)
from orchestrator.core.convergence import Schedule
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.hooks import HookResult, OnFailure, Trigger
from orchestrator.core.hypervisor import (
    ACTIVE_STATES,
    Clock,
    Guest,
    Hypervisor,
    SystemClock,
)
from orchestrator.core.interfaces import Armed, GroupLink, Hooks, JournalLike, NullJournal
from orchestrator.core.phases import MigrationMachine, Phase
from orchestrator.core.policy import DrainMode
from orchestrator.core.report import Outcome, Progress, Report, TimelineEntry
from orchestrator.core.request import Request, placeholder_values
from orchestrator.core.vfio import Role, VfioEvent
from orchestrator.edges.hook_runner import HookRunner
from orchestrator.flows.job import JobControl, migrate_request
from orchestrator.flows.preflight import PreFlight
from orchestrator.flows.story import Story
from orchestrator.flows.subscriptions import Subscriptions

# How long after the job ends to wait for the events that undrain (destination or source `running`)
# before undraining on our own: the guest resumes within milliseconds of the job's end.
SETTLE_S = 15.0
POLL_S = 0.1  # how often the job's statistics are read (the schedule, the gate and progress use them)


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
        group: GroupLink | None = None,
        kind: str | None = None,
    ) -> None:
        self.request = request
        self.group = group
        self.kind = kind or ("evacuate-item" if parent else "migrate")
        self.source = source
        self.destination = destination
        self.runner: Hooks = runner or HookRunner()
        self.clock: Clock = clock or SystemClock()
        self.on_progress = on_progress
        self.on_plan = on_plan
        self.parent = parent
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
            grouped=group is not None,
        )
        self.story = Story(journal or NullJournal(), self.report, self.clock, on_entry)
        self.preflight = PreFlight(
            request, source, destination, self.id, lock_dir=lock_dir, lock_wait_s=lock_wait_s
        )
        self.subscriptions = Subscriptions(source, destination, request.destination_domain)
        machine_lock = threading.RLock()
        self._cv = threading.Condition(machine_lock)  # events, hooks' ends, phases
        # What the job's poll loop waits on: only the job's end, not every event. Woken by each event,
        # that thread took the interpreter's lock just as the next device's event (which often follows a
        # device's P2P state closely) needed it.
        self._job_end = threading.Condition(machine_lock)
        self.job = JobControl(self.story)
        self._job_done = False
        self._armed: dict[int, Armed] = {}  # by id() of the policy's Hook

    # --- the hot path: libvirt's event thread ---------------------------------------------------
    def _listener(self, role: Role) -> Callable[[str, str, int, int, dict[str, Any] | None], None]:
        host = role.value

        def on_event(domain: str, name: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            received = self.clock.time()
            # The subscription already filtered the domain and the event names (see `Subscriptions`).
            if name not in vfio.EVENTS:
                self.story.qemu(host, role, name, seconds + micros / 1e6, received, data)
                return
            try:
                event = VfioEvent.from_qmp(host, role, domain, seconds, micros, data, received, name)
            except ValueError as exc:
                self.story.note(str(exc))
                return
            with self._cv:
                if not self.machine.following:
                    return  # not our job's: before it started (another migration's?) or after settling
                actions = self.machine.on_vfio(event)
            if actions:
                self._execute(actions)  # spawn first: everything else can wait
                self.story.vfio(event)
            else:
                # A state the machine only notes (a device's P2P state, say): its records wait for the
                # next event or the next poll (<= POLL_S). The next device's prepare event often follows
                # it closely, and recording it here (slow on a CPU cold from the device's quiet time)
                # delayed that event's drain by as much.
                self.story.defer(event)
            with self._cv:
                self._cv.notify_all()

        return on_event

    def _execute(self, actions: Sequence[Action]) -> None:
        """Carry out the machine's actions (never with `_cv` held by this call)."""
        for action in actions:
            if isinstance(action, RunHooks):
                self._run_device_hooks(action)
            elif isinstance(action, AbortJob):
                self.job.abort(action.reason)
            elif isinstance(action, SetDowntime):
                self.job.set_downtime(action)
            elif isinstance(action, Note):
                self.story.note(action.text, report=not action.timeline_only)
            elif isinstance(action, TellGroup) and self.group is not None:
                self.group.tell(action.notice, action.detail)

    def _run_device_hooks(self, action: RunHooks) -> None:
        device, trigger = action.device_id, action.trigger
        values: Mapping[str, str] | None = None  # the placeholders' values: spawned hooks only
        # Written down BEFORE any hook starts (one write to the run log): a kill at any instant after
        # this leaves a record `recover` acts on; the supervisor writes each hook's start and end itself.
        failure = self.story.device_action(device, trigger.value, "starting", action.reason)
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
            # our bookkeeping below would otherwise delay the drain on a busy host.
            os.sched_yield()
        self.story.flush()  # what happened before this action is recorded before what follows
        if failure:
            self.story.note(f"{failure}: the hooks run all the same")
        text = f"{trigger} {device}: {action.reason}"
        self.story.decision(text)

    def _values(self, device: str = "", qom_path: str = "", state: str = "") -> dict[str, str]:
        """The placeholders' values of one hook run (a group member's name its group too)."""
        group = self.group.names if self.group is not None else ("", "", "")
        return placeholder_values(self.request, self.id, device, qom_path, state, group)

    def _device_hook_done(self, on_failure: OnFailure) -> Callable[[HookResult], None]:
        def done(result: HookResult) -> None:
            self.story.hook(result)
            device = result.device_id or ""
            failure = None
            if not result.ok:
                failure = f"{result.trigger} hook {result.label} for {device} failed: {result.error}"
            with self._cv:
                if self.machine.pending(device) == 1:
                    # The device's last hook: its end is recorded before the machine learns it. Once the
                    # machine is not busy the main thread may settle and finish the run log, and a record
                    # written after that would be lost.
                    self.story.device_action(device, result.trigger.value, "failed" if failure else "done")
                actions = self.machine.on_hook_done(
                    result.trigger, device, failure, on_failure is OnFailure.ABORT
                )
                self._cv.notify_all()
            self._execute(actions)

        return done

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
        self.story.note(
            "the terminal hung up (SIGHUP): the migration goes on; its story: "
            f"orchestrator history {self.id}",
            report=False,
        )

    # --- a switchover group's word (orchestrator.flows.group) ------------------------------------
    def group_drain(self) -> None:
        """Drain every covered device now; the limit stays at the floor until `group_release`."""
        self._feed(self.machine.group_drain)

    def group_release(self) -> None:
        """Raise the downtime limit: QEMU may switch over."""
        self._feed(self.machine.group_release)

    def group_undrain(self) -> None:
        """Undrain every device still drained (the group's undrain)."""
        self._feed(self.machine.group_undrain)

    def _feed(self, decide: Callable[[], list[Action]]) -> None:
        with self._cv:
            actions = decide()
            self._cv.notify_all()
        self._execute(actions)

    def _advance(self, phase: Phase) -> None:
        with self._cv:
            self.machine.advance(phase)
        self.story.phase(phase)

    # --- the flow -----------------------------------------------------------------------------
    def run(self) -> Report:
        """Pre-flight, then migrate; returns the report (never raises for a failed migration)."""
        report = self.report
        try:
            try:
                dom = self.preflight.check(report, self.machine)
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
            self.preflight.release()
        return report

    def _record_unmoved(self, exit_code: int) -> None:
        """A run that changed nothing (unchanged, refused) is journaled too, so that `history` tells the
        whole story; a dry run (Ansible's check mode) writes nothing at all."""
        report = self.report
        report.ended = self.clock.time()
        if self.request.dry_run:
            return
        self._begin(hooks=False)
        self.story.finish(False, exit_code)

    def _migrate(self, dom: Guest) -> None:
        report = self.report
        self._begin()
        location: Location | None = None
        try:
            self._advance(Phase.SUBSCRIBED)
            self.subscriptions.subscribe(dom, self._listener(Role.SOURCE), self._listener(Role.DESTINATION))
            self._advance(Phase.BEFORE_HOOKS)
            if self._run_before_hooks() and self._arm() and self.request.switchover.drain is DrainMode.START:
                self._advance(Phase.DRAINING)
                self._drain_ahead()
            if self.group is not None:  # every member passes its before hooks before any job starts
                self.story.note("waiting for the other members of the group", report=False)
                if not self.group.arrive() and self.machine.abort_reason is None:
                    self.abort("the switchover group gave up before the job started")
            if self.machine.abort_reason is None:
                self._run_job(dom)
        finally:
            self._advance(Phase.SETTLING)
            self._settle()
            self._disarm()
            self.subscriptions.cancel()
            if self.machine.job is not JobState.NOT_STARTED:
                location = _where(self.request, self.source, self.destination, self.story.note)
            self._conclude(location)
            self._advance(Phase.AFTER_HOOKS)
            self._run_after_hooks()
            self._advance(Phase.DONE)
            report.ended = self.clock.time()
            self.runner.detach()
            self.story.finish(report.changed, int(report.exit_code))
            self.story.report_lost()

    def _begin(self, *, hooks: bool = True) -> None:
        """The migration's first record (its run log begins); with `hooks`, the hook supervisor records
        each hook's start and end there too (a run that changed nothing runs none)."""
        log = self.story.begin(
            self.request, self.parent, self.runner.supervisor_pid if hooks else None, self.kind
        )
        if hooks and log is not None:  # the supervisor records each hook's start and end there itself
            self.runner.attach(self.id, log.fd)

    def _run_before_hooks(self) -> bool:
        for hook in self.request.policy.hooks_for(Trigger.BEFORE):
            result = self.runner.run(hook, self._values(state="before"))
            self.story.hook(result)
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
                self.story.hook(result)
                if not result.ok and hook.on_failure is OnFailure.ABORT:
                    self.abort(f"{trigger} hook {result.label}: {result.error}", Outcome.ABORTED)
        return self.machine.abort_reason is None

    def _disarm(self) -> None:
        """Close the armed hooks (their stdin); report any that did not exit cleanly."""
        for armed in self._armed.values():
            result = armed.close()
            if result is not None:
                self.story.hook(result)
                self.story.note(f"armed hook {result.label}: {result.error}")
        self._armed.clear()

    def _drain_ahead(self) -> None:
        """drain=start: drain every covered device and wait for the hooks (bounded by their deadlines)."""
        self._feed(self.machine.drain_ahead)
        with self._cv:
            while self.machine.drains_running():
                self.clock.wait(self._cv, 0.5)

    def _run_job(self, dom: Guest) -> None:
        request = migrate_request(self.request, dom)
        self.job.dom = dom
        # Before the job: libvirt keeps the limit for the job and restores the old one after it.
        dom.set_max_downtime(self.machine.initial_downtime())
        with self._cv:
            if self.machine.abort_reason is not None:  # interrupted just now
                return
            self.machine.advance(Phase.JOB_RUNNING)
            started = self.machine.job_started()
        self.story.phase(Phase.JOB_RUNNING)
        began = self.clock.monotonic()
        self.source.start_migration(dom, request, self.destination, self._job_ended)
        self._execute(started)  # a group's drain that came as the job was starting
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
            self.story.flush()
            try:
                stats = dom.job_stats()
                self.subscriptions.narrow()
            except OrchestratorError as exc:
                self.story.note(f"could not read the job's statistics: {exc.message}")
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
            self.story.note(f"after the job the VM runs on: {location.value}")

    def _run_after_hooks(self) -> None:
        outcome = self.report.outcome
        trigger = Trigger.AFTER_SUCCESS if outcome is Outcome.SUCCEEDED else Trigger.AFTER_FAILURE
        for hook in self.request.policy.hooks_for(trigger):
            self.story.hook(self.runner.run(hook, self._values(state=outcome.value)))


def _where(
    request: Request, source: Hypervisor, destination: Hypervisor, note: Callable[[str], None]
) -> Location:
    """Where the VM runs now, asked of both hosts (a failure to ask counts as not running there)."""
    running = []
    for host, name in (
        (source, request.domain),
        (destination, request.destination_domain),
    ):
        try:
            dom = host.find_domain(name)
            running.append(dom is not None and dom.state() in ACTIVE_STATES)
        except OrchestratorError as exc:
            note(f"could not ask {host.uri} where {request.domain} runs: {exc.message}")
            running.append(False)
    on_source, on_destination = running
    if on_source and on_destination:
        return Location.BOTH
    if on_source:
        return Location.SOURCE
    return Location.DESTINATION if on_destination else Location.NEITHER
