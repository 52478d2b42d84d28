"""One VM's live migration: pre-flight, subscriptions, the libvirt job, hooks, and the invariant.

The invariant: every device that was drained is undrained exactly once, on every path (success,
failure, cancel, completion timeout, a drain hook aborting, Ctrl-C/SIGTERM). Drains and undrains are
decided by `vfio.MigrationTracker` from the events; this module starts the hooks at once on libvirt's
event thread (the hot path: nothing else happens before the spawn), and on every way out undrains
whatever is still drained.

Phases and their undo (Proxmox-style):
  subscribe        <-> unsubscribe
  before hooks     <-> after-failure hooks
  start the job    <-> abort the job (on hook abort, timeout, interrupt)
  drain (events)   <-> undrain (events, else forced at the end)
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from orchestrator import domxml, domxml_edit
from orchestrator.errors import BadInput, ExitCode, OrchestratorError
from orchestrator.hooks import HookResult, HookRunner, OnFailure, RunningHook, Trigger, preflight
from orchestrator.policy import MigrationMode, MigrationSettings, Policy, WhenEventsOff
from orchestrator.vfio import Action, Decision, MigrationTracker, Role, VfioEvent
from orchestrator.virt import (
    Host,
    MigrateRequest,
    MigrationError,
    Subscription,
    VirDomain,
    abort_job,
    completed_job_stats,
    domain_state,
    job_stats,
    migrate,
)

# How long after the job ends to wait for the events that undrain (destination or source `running`)
# before undraining on our own: the guest resumes within milliseconds of the job's end.
SETTLE_S = 15.0
_FOLLOWED_EVENTS = frozenset({"VFIO_MIGRATION", "MIGRATION", "STOP", "RESUME", "SHUTDOWN"})


class Outcome(StrEnum):
    """How a migration ended."""

    SUCCEEDED = "succeeded"
    UNCHANGED = "unchanged"  # already on the destination: nothing to do (Ansible's changed=false)
    ROLLED_BACK = "rolled-back"  # failed or aborted; the VM runs on the source, workloads undrained
    ABORTED = "aborted"  # a hook with on_failure=abort failed
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    PLANNED = "planned"  # --dry-run


EXIT_CODES: Mapping[Outcome, ExitCode] = {
    Outcome.SUCCEEDED: ExitCode.OK,
    Outcome.UNCHANGED: ExitCode.OK,
    Outcome.PLANNED: ExitCode.OK,
    Outcome.ROLLED_BACK: ExitCode.MIGRATION_FAILED,
    Outcome.ABORTED: ExitCode.HOOK_FAILED,
    Outcome.INTERRUPTED: ExitCode.INTERRUPTED,
}


@dataclass(frozen=True)
class Progress:
    """Normalised job statistics (like Nova's JobInfo); `fraction` never goes backwards."""

    fraction: float = 0.0
    memory_processed: int = 0
    memory_total: int = 0
    vfio_transferred: int = 0
    elapsed_ms: int = 0

    def advance(self, stats: Mapping[str, Any]) -> Progress:
        """The progress after one more reading of libvirt's job stats."""
        total = int(stats.get("memory_total") or 0)
        processed = int(stats.get("memory_processed") or 0)
        remaining = stats.get("memory_remaining")
        if total and remaining is not None:
            fraction = 1.0 - int(remaining) / total
        else:
            fraction = processed / total if total else 0.0
        return Progress(
            fraction=max(self.fraction, min(max(fraction, 0.0), 1.0)),
            memory_processed=max(self.memory_processed, processed),
            memory_total=total or self.memory_total,
            vfio_transferred=max(self.vfio_transferred, int(stats.get("vfio_data_transferred") or 0)),
            elapsed_ms=int(stats.get("time_elapsed") or self.elapsed_ms),
        )


@dataclass(frozen=True)
class TimelineEntry:
    """One line of the final timeline: an event or a hook, when and where."""

    at: float  # epoch seconds
    host: str  # "source" | "destination" | "orchestrator"
    kind: str  # "event" | "hook" | "decision" | "note"
    text: str

    def to_json(self, start: float) -> dict[str, Any]:
        """With the time since the migration started."""
        return {"t": round(self.at - start, 6), "host": self.host, "kind": self.kind, "text": self.text}


@dataclass
class Report:
    """Everything a migration did; what `--json` prints and the journal's summary holds."""

    migration_id: str
    domain: str
    source: str
    destination: str
    policy: str
    outcome: Outcome = Outcome.SUCCEEDED
    changed: bool = False
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    job_s: float | None = None
    downtime_ms: int | None = None
    timeline: list[TimelineEntry] = field(default_factory=list)
    hooks: list[HookResult] = field(default_factory=list)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    undrain_failed: bool = False

    @property
    def exit_code(self) -> ExitCode:
        """The CLI's exit code for this report."""
        if self.undrain_failed:
            return ExitCode.NEEDS_ADMIN
        return EXIT_CODES[self.outcome]

    def to_json(self) -> dict[str, Any]:
        """One JSON document."""
        return {
            "migration_id": self.migration_id,
            "domain": self.domain,
            "source": self.source,
            "destination": self.destination,
            "policy": self.policy,
            "outcome": self.outcome.value,
            "changed": self.changed,
            "exit_code": int(self.exit_code),
            "error": self.error,
            "timings": {
                "total_s": round(self.ended - self.started, 3) if self.ended else None,
                "job_s": None if self.job_s is None else round(self.job_s, 3),
                "downtime_ms": self.downtime_ms,
            },
            "devices": self.devices,
            "timeline": [entry.to_json(self.started) for entry in sorted(self.timeline, key=lambda e: e.at)],
            "hooks": [hook.to_json() for hook in self.hooks],
            "notes": self.notes,
            "plan": self.plan,
        }


class JournalLike:
    """What a migration writes to the journal (orchestrator.journal.Journal, or nothing)."""

    def begin_migration(self, *args: Any, **kwargs: Any) -> None: ...
    def record_event(self, *args: Any, **kwargs: Any) -> None: ...
    def record_hook(self, *args: Any, **kwargs: Any) -> None: ...
    def finish_migration(self, *args: Any, **kwargs: Any) -> None: ...


@dataclass(frozen=True)
class Request:
    """What the user asked for."""

    domain: str
    source_uri: str
    destination_uri: str
    policy: Policy
    settings: MigrationSettings | None = None  # the policy's, with CLI overrides applied
    listen_address: str | None = None
    postcopy: bool = False
    dry_run: bool = False

    @property
    def migration(self) -> MigrationSettings:
        """The effective migration settings."""
        return self.settings or self.policy.migration


def plan_lines(request: Request, devices: list[str], events_note: str) -> list[str]:
    """What would run when, in words (for --dry-run and the report)."""
    policy, settings = request.policy, request.migration
    lines = [f"policy {policy.name}" + (f" ({policy.path})" if policy.path else "")]
    for hook in policy.hooks_for(Trigger.BEFORE):
        lines.append(
            f"before: run {' '.join(hook.argv)} (timeout {hook.timeout_ms} ms, on failure {hook.on_failure})"
        )
    mode = "peer-to-peer" if settings.mode is MigrationMode.P2P else "client-driven"
    extras = [
        f"data over {settings.data_uri}" if settings.data_uri else "",
        f"bandwidth {settings.bandwidth_mib} MiB/s" if settings.bandwidth_mib else "",
        f"max downtime {settings.max_downtime_ms} ms" if settings.max_downtime_ms else "",
        f"abort after {settings.completion_timeout_s:g} s" if settings.completion_timeout_s else "",
        "persist on destination" if settings.persist else "",
        "undefine source" if settings.undefine_source else "",
    ]
    lines.append(
        f"migrate {request.domain} live ({mode}) {request.source_uri} -> {request.destination_uri}: "
        + ", ".join(e for e in extras if e)
    )
    covered = ", ".join(devices) if devices else "none known from the XML"
    lines.append(
        f"devices covered: {covered}; also any device id matching {list(policy.devices.match)} that emits"
    )
    lines.append(events_note)
    for hook in policy.hooks_for(Trigger.DRAIN):
        lines.append(
            f"on pre-copy-p2p-prepare of each covered device (late: first P2P state on QEMU < 11.0): "
            f"run {' '.join(hook.argv)} (deadline {hook.timeout_ms} ms, on failure {hook.on_failure})"
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
        source: Host,
        destination: Host,
        *,
        journal: JournalLike | None = None,
        runner: HookRunner | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        on_entry: Callable[[TimelineEntry], None] | None = None,
        migration_id: str | None = None,
        parent: str | None = None,
    ) -> None:
        self.request = request
        self.source = source
        self.destination = destination
        self.journal = journal or JournalLike()
        self.runner = runner or HookRunner()
        self.on_progress = on_progress
        self.on_entry = on_entry
        self.parent = parent
        self.id = migration_id or uuid.uuid4().hex[:12]
        self.report = Report(
            migration_id=self.id,
            domain=request.domain,
            source=request.source_uri,
            destination=request.destination_uri,
            policy=request.policy.name,
        )
        self.tracker = MigrationTracker(covers=request.policy.devices.covers)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._hooks: dict[str, list[RunningHook]] = {}  # device id -> its running drain hooks
        self._all_hooks: list[RunningHook] = []
        self._abort_reason: str | None = None
        self._abort_outcome = Outcome.ROLLED_BACK
        self._dom: VirDomain | None = None
        self._job_running = False
        self._subs: list[Subscription] = []
        self._device_hooks_enabled = True

    # --- the hot path: libvirt's event thread ---------------------------------------------------
    def _listener(self, role: Role) -> Callable[[str, str, int, int, dict[str, Any] | None], None]:
        host = role.value

        def on_event(domain: str, name: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            received = time.time()
            # The subscription already filtered the domain and the event names (see _subscribe).
            if name == "VFIO_MIGRATION":
                try:
                    event = VfioEvent.from_qmp(host, role, domain, seconds, micros, data, received)
                except ValueError as exc:
                    self._note(str(exc))
                    return
                decision = self.tracker.feed(event) if self._device_hooks_enabled else None
                if decision is not None:
                    self._act(decision)  # spawn first: everything else can wait
                self._record_vfio(event, decision)
            else:
                self._record_qemu(host, role, name, seconds + micros / 1e6, received, data)

        return on_event

    def _act(self, decision: Decision) -> None:
        """Start the hooks of a drain or undrain decision now."""
        device = decision.device_id
        trigger = Trigger.DRAIN if decision.action is Action.DRAIN else Trigger.UNDRAIN
        state = decision.event.state.value if decision.event else "running"
        values = self._values(device, decision.event.qom_path if decision.event else "", state)
        if trigger is Trigger.DRAIN:
            started = [
                self.runner.start(hook, values, device, self._hook_done(hook.on_failure))
                for hook in self.request.policy.hooks_for(Trigger.DRAIN)
            ]
            # Hand the CPU to the hooks just spawned: Linux lets the parent run on first, and our
            # bookkeeping below would otherwise delay the drain by ~1 ms on a busy host.
            os.sched_yield()
            with self._lock:
                self._hooks[device] = started
                self._all_hooks.extend(started)
        else:
            with self._lock:
                drains = [h for h in self._hooks.get(device, []) if not h.done.is_set()]
            if drains:
                # Never restore a workload while its drain is still running: wait for it, off this thread.
                threading.Thread(
                    target=self._undrain_after, args=(drains, values, device), daemon=True
                ).start()
            else:
                self._start_undrain(values, device)
        self._device_entry(decision)

    def _start_undrain(self, values: Mapping[str, str], device: str) -> None:
        started = [
            self.runner.start(hook, values, device, self._hook_done(OnFailure.CONTINUE))
            for hook in self.request.policy.hooks_for(Trigger.UNDRAIN)
        ]
        with self._lock:
            self._all_hooks.extend(started)

    def _undrain_after(self, drains: list[RunningHook], values: Mapping[str, str], device: str) -> None:
        for hook in drains:
            hook.wait()
        self._start_undrain(values, device)

    def _hook_done(self, on_failure: OnFailure) -> Callable[[HookResult], None]:
        def done(result: HookResult) -> None:
            self.journal.record_hook(self.id, result.to_json())
            self._entry(result.started, "orchestrator", "hook", _hook_text(result))
            with self._lock:
                self.report.hooks.append(result)
                if result.trigger is Trigger.UNDRAIN and not result.ok:
                    self.report.undrain_failed = True
            if not result.ok and result.trigger is Trigger.DRAIN and on_failure is OnFailure.ABORT:
                self.abort(
                    f"drain hook {result.label} for {result.device_id} failed: {result.error}",
                    Outcome.ABORTED,
                )
            with self._changed:
                self._changed.notify_all()

        return done

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

    # --- records ------------------------------------------------------------------------------
    def _entry(self, at: float, host: str, kind: str, text: str) -> None:
        entry = TimelineEntry(at, host, kind, text)
        with self._lock:
            self.report.timeline.append(entry)
        if self.on_entry is not None:
            self.on_entry(entry)

    def _note(self, text: str) -> None:
        with self._lock:
            self.report.notes.append(text)
        self._entry(time.time(), "orchestrator", "note", text)
        self.journal.record_event(
            self.id, "orchestrator", None, "note", text, None, None, None, time.time(), None
        )

    def _record_vfio(self, event: VfioEvent, decision: Decision | None) -> None:
        self.journal.record_event(
            self.id,
            event.host,
            event.role.value,
            "vfio",
            "VFIO_MIGRATION",
            event.device_id,
            event.state.value,
            event.qemu_time,
            event.received,
            {"qom_path": event.qom_path, "late": decision.late} if decision else {"qom_path": event.qom_path},
        )
        self._entry(event.qemu_time, event.host, "event", f"{event.device_id} -> {event.state.value}")
        with self._changed:
            self._changed.notify_all()

    def _record_qemu(
        self, host: str, role: Role, name: str, qemu_time: float, received: float, data: dict[str, Any] | None
    ) -> None:
        self.journal.record_event(
            self.id, host, role.value, "qemu", name, None, None, qemu_time, received, data
        )
        status = (data or {}).get("status")
        self._entry(qemu_time, host, "event", f"{name} {status}" if status else name)

    def _device_entry(self, decision: Decision) -> None:
        now = time.time()
        with self._lock:
            record = self.report.devices.setdefault(decision.device_id, {})
            if decision.action is Action.DRAIN:
                record.update(drained_at=now, late=decision.late, drain_reason=decision.reason)
            else:
                record.update(undrained_at=now, undrain_reason=decision.reason)
        late = " (late: no prepare state)" if decision.late else ""
        self._entry(now, "orchestrator", "decision", f"{decision.action.value} {decision.device_id}{late}")

    # --- control --------------------------------------------------------------------------------
    def abort(self, reason: str, outcome: Outcome = Outcome.ROLLED_BACK) -> None:
        """Abort the migration job (from any thread); the first reason wins."""
        with self._lock:
            if self._abort_reason is not None:
                return
            self._abort_reason = reason
            self._abort_outcome = outcome
            dom, running = self._dom, self._job_running
            self._changed.notify_all()
        self._note(f"aborting: {reason}")
        if dom is not None and running:
            try:
                abort_job(dom)
            except OrchestratorError as exc:
                self._note(f"could not abort the job: {exc.message}")

    def interrupt(self, signal_name: str) -> None:
        """Ctrl-C or SIGTERM: abort the job, undrain, then the caller exits."""
        self.abort(f"{signal_name} received", Outcome.INTERRUPTED)

    # --- the flow -----------------------------------------------------------------------------
    def run(self) -> Report:
        """Pre-flight, then migrate; returns the report (never raises for a failed migration)."""
        report = self.report
        dom = self._preflight()
        if report.outcome is Outcome.UNCHANGED or self.request.dry_run:
            report.ended = time.time()
            return report
        self.journal.begin_migration(
            self.id,
            "evacuate-item" if self.parent else "migrate",
            self.request.domain,
            self.request.source_uri,
            self.request.destination_uri,
            self.request.policy.name,
            report.started,
            parent=self.parent,
        )
        report.changed = True
        try:
            self._subscribe(dom)
            if self._run_before_hooks():
                self._run_job(dom)
        finally:
            self._settle()
            self._unsubscribe()
            self._run_after_hooks()
            report.ended = time.time()
            self.journal.finish_migration(
                self.id,
                report.outcome.value,
                report.changed,
                report.error,
                int(report.exit_code),
                report.ended,
                report.to_json(),
            )
        return report

    def _preflight(self) -> VirDomain | None:
        request, report = self.request, self.report
        if request.postcopy:
            raise BadInput(
                "post-copy migration is refused: VFIO forbids it (QEMU: 'VFIO migration is not supported "
                "with postcopy migration')",
                "drop --postcopy",
            )
        if (
            request.source_uri == request.destination_uri
            or self.source.host_uuid() == self.destination.host_uuid()
        ):
            raise BadInput(
                f"source and destination are the same host ({request.destination_uri})",
                "give a different destination URI",
            )
        dom = self.source.find_domain(request.domain)
        there = self.destination.find_domain(request.domain)
        there_running = there is not None and domain_state(there) in ("running", "paused")
        if dom is None or domain_state(dom) in ("shut off", "gone"):
            if there_running:
                report.outcome, report.changed = Outcome.UNCHANGED, False
                report.plan = [f"{request.domain} already runs on {request.destination_uri}: nothing to do"]
                return None
            if dom is None:
                raise BadInput(
                    f"no domain {request.domain!r} on {request.source_uri}",
                    f"list them with: virsh -c '{request.source_uri}' list --all",
                )
            raise BadInput(
                f"domain {request.domain!r} is not running on {request.source_uri}",
                "start it first (only running VMs are live-migrated)",
            )
        if there_running:
            raise BadInput(
                f"domain {request.domain!r} runs on both {request.source_uri} and {request.destination_uri}",
                "stop the copy that should not run, then retry",
            )
        problems = preflight(request.policy.all_hooks())
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BadInput(f"{problems[0]}{more}", f"fix the hooks of policy {request.policy.name}")
        devices, events_note = self._check_events(dom)
        report.plan = plan_lines(request, devices, events_note)
        if request.dry_run:
            report.outcome = Outcome.PLANNED
        return dom

    def _check_events(self, dom: VirDomain) -> tuple[list[str], str]:
        """Covered VFIO devices from the live XML, and whether their events are on."""
        policy = self.request.policy
        status = domxml.events_status(self.source.xml(dom))
        covered = [
            d
            for d in (*status.devices, *status.commandline_devices)
            if d.alias and policy.devices.covers(d.alias, d.host_address if d.kind == "pci" else None)
        ]
        off = [d.alias or "?" for d in covered if not status.device_enabled(d)]
        if off:
            if policy.when_events_off is WhenEventsOff.REFUSE:
                raise BadInput(
                    f"VFIO device(s) {', '.join(off)} of {self.request.domain} run without migration-events, "
                    "so no drain could be triggered",
                    f"run 'orchestrator events enable {self.request.domain}' and cold-boot the VM, or set "
                    f'events.when_off = "proceed" in policy {policy.name}',
                )
            self._device_hooks_enabled = False
            note = f"events off for {', '.join(off)}: migrating WITHOUT device hooks (policy says proceed)"
            self.report.notes.append(note)
            return [d.alias or "?" for d in covered], note
        if status.global_on:
            note = "events: -global vfio-pci.migration-events=on (every vfio-pci device emits)"
        elif covered:
            note = "events: on for every covered device"
        else:
            note = "events: no VFIO hostdev in the XML; any device that emits is followed"
        return [d.alias or "?" for d in covered], note

    def _subscribe(self, dom: VirDomain) -> None:
        events = sorted(_FOLLOWED_EVENTS)
        self._subs.append(
            self.source.subscribe_monitor_events(self._listener(Role.SOURCE), events=events, dom=dom)
        )
        # The incoming domain does not exist yet on the destination: filtered by name, not object.
        self._subs.append(
            self.destination.subscribe_monitor_events(
                self._listener(Role.DESTINATION), events=events, domain=self.request.domain
            )
        )

    def _unsubscribe(self) -> None:
        for sub in self._subs:
            sub.cancel()
        self._subs.clear()

    def _run_before_hooks(self) -> bool:
        for hook in self.request.policy.hooks_for(Trigger.BEFORE):
            result = self.runner.run(hook, self._values(state="before"))
            self._hook_done(OnFailure.CONTINUE)(result)
            if not result.ok and hook.on_failure is OnFailure.ABORT:
                self.report.outcome = Outcome.ABORTED
                self.report.changed = False
                self.report.error = f"before hook {result.label} failed: {result.error}"
                return False
        return True

    def _run_job(self, dom: VirDomain) -> None:
        settings = self.request.migration
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
            max_downtime_ms=settings.max_downtime_ms,
            compressed=settings.compressed,
            auto_converge=settings.auto_converge,
        )
        request = self._with_destination_xml(dom, request)
        failure: list[BaseException] = []
        finished = threading.Event()

        def job() -> None:
            try:
                migrate(self.source, dom, request, self.destination)
            except BaseException as exc:  # handed to the main thread, which reports it
                failure.append(exc)
            finally:
                finished.set()
                with self._changed:
                    self._changed.notify_all()

        with self._lock:
            if self._abort_reason is not None:  # interrupted before the job started
                self.report.outcome = self._abort_outcome
                self.report.error = self._abort_reason
                self.report.changed = False
                return
            self._dom, self._job_running = dom, True
        began = time.monotonic()
        threading.Thread(target=job, name=f"migrate-{self.request.domain}", daemon=True).start()
        progress = Progress()
        timeout = settings.completion_timeout_s
        while not finished.wait(0.25):
            if self.on_progress is not None:
                progress = progress.advance(job_stats(dom))
                self.on_progress(progress)
            if timeout and time.monotonic() - began > timeout:
                self.abort(f"completion timeout of {timeout:g} s exceeded")
        with self._lock:
            self._job_running = False
        self.report.job_s = time.monotonic() - began
        if failure:
            exc = failure[0]
            with self._lock:
                reason, outcome = self._abort_reason, self._abort_outcome
            self.report.outcome = outcome if reason else Outcome.ROLLED_BACK
            self.report.error = reason or (exc.message if isinstance(exc, OrchestratorError) else repr(exc))
            if not isinstance(exc, MigrationError | OrchestratorError):
                self._note(f"unexpected error from the migration job: {exc!r}")
        else:
            self.report.outcome = Outcome.SUCCEEDED
            if self.on_progress is not None:
                self.on_progress(replace(progress, fraction=1.0))
            there = self.destination.find_domain(self.request.domain)
            if there is not None:
                stats = completed_job_stats(there)
                if "downtime" in stats:
                    self.report.downtime_ms = int(stats["downtime"])

    def _with_destination_xml(self, dom: VirDomain, request: MigrateRequest) -> MigrateRequest:
        """Carry the events property into the destination's live and persistent definitions."""
        migratable = self.source.xml(dom, migratable=True)
        dest = domxml_edit.destination_xml(migratable)
        if dest == migratable:
            return request
        return replace(request, dest_xml=dest, persist_xml=dest if request.persist else None)

    def _settle(self) -> None:
        """Wait (bounded) for the events that undrain; then undrain whatever is still drained."""
        deadline = time.monotonic() + SETTLE_S
        with self._changed:
            while self.tracker.still_drained() and time.monotonic() < deadline:
                self._changed.wait(max(0.0, min(0.5, deadline - time.monotonic())))
        for device in self.tracker.still_drained():
            if self.tracker.mark_undrained(device):
                self._note(f"no 'running' event for {device} after the job ended: undraining it anyway")
                self._act(Decision(Action.UNDRAIN, device, None, False, "forced at the end of the migration"))
        # Until none is pending: an undrain that waited for its drains starts hooks of its own.
        while True:
            with self._lock:
                pending = [h for h in self._all_hooks if not h.done.is_set()]
            if not pending:
                break
            for hook in pending:
                hook.wait()

    def _run_after_hooks(self) -> None:
        outcome = self.report.outcome
        if outcome in (Outcome.UNCHANGED, Outcome.PLANNED):
            return
        trigger = Trigger.AFTER_SUCCESS if outcome is Outcome.SUCCEEDED else Trigger.AFTER_FAILURE
        for hook in self.request.policy.hooks_for(trigger):
            result = self.runner.run(hook, self._values(state=outcome.value))
            self._hook_done(OnFailure.CONTINUE)(result)


def _hook_text(result: HookResult) -> str:
    device = f" {result.device_id}" if result.device_id else ""
    status = "ok" if result.ok else (result.error or "failed")
    return f"{result.trigger}{device}: {result.label} ({result.duration_ms:.0f} ms, {status})"


@contextlib.contextmanager
def opened(source_uri: str, destination_uri: str) -> Any:
    """Both connections, closed on the way out."""
    source = Host.open(source_uri)
    try:
        destination = Host.open(destination_uri)
    except BaseException:
        source.close()
        raise
    try:
        yield source, destination
    finally:
        destination.close()
        source.close()
