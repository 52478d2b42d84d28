"""A switchover group: several VMs migrated as one, drained once, switched over together.

`orchestrator.core.group.GroupMachine` decides; this module runs it: one `Migration` per member, each on
a thread of its own (`group-<domain>`) and on libvirt connections of its own (libvirtd serves at most
`max_client_requests` calls at once per connection, and a migration call holds one for its whole job:
on a shared connection the held members' statistics, releases and aborts would queue behind the jobs).

Each member's machine (grouped) tells the group what it sees through a `_Link`; the group's decisions
are carried out in the order they were made (one lock taken before the group's lock is released), on
the thread whose input made them: a release is the raise of every member's downtime limit, sent from
one thread per member at once, so that every QEMU acts at its next check. The caller's thread ticks
the group's deadlines and waits for every member's run to return.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.actions import Note, Notice
from orchestrator.core.errors import BadInput, OrchestratorError
from orchestrator.core.group import (
    GROUP_DEVICE,
    AbortMembers,
    DrainMembers,
    GroupAction,
    GroupMachine,
    Record,
    ReleaseMembers,
    RunGroupHooks,
    StartJobs,
    UndrainMembers,
)
from orchestrator.core.group_report import GroupMember, GroupReport
from orchestrator.core.hooks import HookResult, OnFailure, Trigger
from orchestrator.core.hypervisor import Clock, Hypervisor, SystemClock
from orchestrator.core.interfaces import Hooks, JournalLike, NullJournal
from orchestrator.core.policy import DrainMode
from orchestrator.core.report import Outcome, Report, TimelineEntry
from orchestrator.core.request import Request, placeholder_values
from orchestrator.flows.migration import Migration

TICK_S = 0.1  # how often the group's deadlines are looked at


def _default_runner() -> Hooks:
    from orchestrator.edges.hook_runner import HookRunner

    return HookRunner()


@dataclass(frozen=True)
class GroupOptions:
    """The group's own settings (the members' come from their requests)."""

    hold_timeout_s: float
    release_timeout_s: float


class _Link:
    """One member's line to the group (`orchestrator.core.interfaces.GroupLink`)."""

    def __init__(self, group: GroupMigration, name: str) -> None:
        self.group = group
        self.name = name
        self.names = (group.name, group.id, ",".join(r.domain for r in group.requests))

    def arrive(self) -> bool:
        return self.group._arrive(self.name)

    def tell(self, notice: Notice, detail: str) -> None:
        self.group._decide(lambda machine: machine.notice(self.name, notice, detail))


class GroupMigration:
    """Migrates its members' VMs as one switchover group."""

    def __init__(
        self,
        name: str,
        requests: Sequence[Request],
        open_host: Callable[[str], Hypervisor],
        options: GroupOptions,
        *,
        journal: JournalLike | None = None,
        clock: Clock | None = None,
        on_line: Callable[[str], None] | None = None,
        lock_dir: Path | None = None,
        lock_wait_s: float = 0.0,
        group_id: str | None = None,
        parent: str | None = None,
        dry_run: bool = False,
        runner: Hooks | None = None,
    ) -> None:
        domains = [r.domain for r in requests]
        if len(requests) < 2:
            raise BadInput(f"switchover group {name} has {len(requests)} member(s)", "name at least two VMs")
        if len(set(domains)) != len(domains):
            twice = sorted({d for d in domains if domains.count(d) > 1})
            raise BadInput(f"{', '.join(twice)} named twice in group {name}", "name each VM once")
        for request in requests:
            if request.switchover.drain is not DrainMode.GATED:
                raise BadInput(
                    f"{request.domain}: a switchover group needs the gated drain mode, not "
                    f"{request.switchover.drain.value}",
                    "drop --drain, or give --drain gated (the group holds every member at its gate)",
                )
        self.name = name
        self.requests = list(requests)
        self.open_host = open_host
        self.options = options
        self.journal: JournalLike = journal or NullJournal()
        self.clock: Clock = clock or SystemClock()
        self.on_line = on_line
        self.lock_dir = lock_dir
        self.lock_wait_s = lock_wait_s
        self.id = group_id or uuid.uuid4().hex[:12]
        self.dry_run = dry_run
        self.parent = parent  # an evacuation's id, when the group is part of one
        policy = requests[0].policy
        self.report = GroupReport(
            self.id, name, str(policy.path) if policy.path else policy.name, dry_run=dry_run
        )
        self.policy = policy
        self.runner: Hooks = runner or _default_runner()
        self.machine = GroupMachine(
            domains,
            self.clock,
            hold_timeout_s=options.hold_timeout_s,
            release_timeout_s=options.release_timeout_s,
            drain_hooks=len(policy.hooks_for(Trigger.GROUP_DRAIN)),
            undrain_hooks=len(policy.hooks_for(Trigger.GROUP_UNDRAIN)),
        )
        self._cv = threading.Condition()  # the group's machine
        self._queue: collections.deque[GroupAction] = collections.deque()  # decided, not yet done
        self._members: dict[str, Migration] = {}
        self._reports: dict[str, Report] = {}
        self._hosts: list[Hypervisor] = []
        self._begun = False

    # --- the members' side ------------------------------------------------------------------------
    def _arrive(self, name: str) -> bool:
        self._decide(lambda machine: machine.arrived(name))
        with self._cv:
            while (go := self.machine.may_start(name)) is None:
                self.clock.wait(self._cv, TICK_S)
        return go

    def _decide(self, decide: Callable[[GroupMachine], list[GroupAction]]) -> None:
        """Feed the machine (from any thread); the caller's thread carries out its decisions, in the
        order made, never on the thread that fed it (libvirt's event thread, a hook's reader)."""
        with self._cv:
            self._queue.extend(decide(self.machine))
            self._cv.notify_all()

    def _execute(self, actions: Sequence[GroupAction]) -> None:
        for action in actions:
            if isinstance(action, Record):
                self._record(action.step, action.detail)
            elif isinstance(action, StartJobs):
                with self._cv:
                    self._cv.notify_all()
            elif isinstance(action, DrainMembers):
                for name in action.members:
                    self._members[name].group_drain()
            elif isinstance(action, ReleaseMembers):
                self._release(action.members)
            elif isinstance(action, AbortMembers):
                for name in action.members:
                    member = self._members.get(name)
                    if member is not None:
                        member.abort(action.reason, action.outcome)
            elif isinstance(action, UndrainMembers):
                for name in action.members:
                    self._members[name].group_undrain()
            elif isinstance(action, RunGroupHooks):
                self._run_group_hooks(action.trigger)
            elif isinstance(action, Note):
                self._note(action.text)

    def _run_group_hooks(self, trigger: Trigger) -> None:
        """The group's own hooks, once for the whole group (device `@group` in its journal row): each
        gets the group's name, id, members and every member's devices."""
        hooks = self.policy.hooks_for(trigger)
        action = "drain" if trigger is Trigger.GROUP_DRAIN else "undrain"
        if self._begun:  # before any hook starts: recover acts on it
            self.journal.record_device_action(
                self.id, GROUP_DEVICE, action, "starting", self.clock.time(), None
            )
        devices = ",".join(
            f"{name}/{device}" for name, m in self._members.items() for device in m.machine.devices()
        )
        values = {
            **placeholder_values(
                self.requests[0],
                self.id,
                device=GROUP_DEVICE,
                state=trigger.value,
                group=(self.name, self.id, ",".join(self._members)),
            ),
            "domain": "",
            "source": ",".join(dict.fromkeys(r.source_uri for r in self.requests)),
            "destination": ",".join(dict.fromkeys(r.destination_uri for r in self.requests)),
            "devices": devices,
        }
        left = [len(hooks)]
        failed: list[str] = []

        def done(hook_failure: OnFailure) -> Callable[[HookResult], None]:
            def ended(result: HookResult) -> None:
                self.report.hooks.append(result)
                if self._begun:
                    self.journal.record_hook(self.id, result.to_json())
                failure = None if result.ok else f"{trigger} hook {result.label} failed: {result.error}"
                with self._cv:
                    left[0] -= 1
                    if failure:
                        failed.append(failure)
                    if left[0] == 0 and self._begun:
                        status = "failed" if failed else "done"
                        at = self.clock.time()
                        self.journal.record_device_action(self.id, GROUP_DEVICE, action, status, at, None)
                self._say(
                    f"group {self.name}: {trigger} hook {result.label}: {'ok' if result.ok else result.error}"
                )
                self._decide(
                    lambda machine: machine.hooks_done(trigger, failure, hook_failure is OnFailure.ABORT)
                )

            return ended

        for index, hook in enumerate(hooks):
            self.runner.start(hook, values, GROUP_DEVICE, done(hook.on_failure), index=index)

    def _release(self, names: Sequence[str]) -> None:
        """Raise every member's limit at once: each QEMU acts at its own next check (<= 100 ms)."""
        go = threading.Event()
        threads = [
            threading.Thread(
                target=lambda m=self._members[n]: (go.wait(), m.group_release()),
                name=f"release-{n}",
                daemon=True,
            )
            for n in names
        ]
        for thread in threads:
            thread.start()
        go.set()
        for thread in threads:
            thread.join()

    def _record(self, step: str, detail: str) -> None:
        now = self.clock.time()
        self.report.steps.append((now, step, detail))
        if step == "drain":
            self.report.drain_started = now
        elif step == "release":
            self.report.released = now
        elif step == "undrain":
            self.report.undrained = now
        self._say(f"group {self.name}: {step}: {detail}")
        if self._begun:
            self.journal.record_event(
                self.id, "orchestrator", None, "note", f"group {step}: {detail}", None, None, None, now, None
            )

    def _note(self, text: str) -> None:
        self.report.notes.append(text)
        self._say(f"group {self.name}: {text}")
        if self._begun:
            now = self.clock.time()
            self.journal.record_event(
                self.id, "orchestrator", None, "note", text, None, None, None, now, None
            )

    def _say(self, line: str) -> None:
        if self.on_line is not None:
            self.on_line(line)

    # --- control --------------------------------------------------------------------------------
    def interrupt(self, signal_name: str) -> None:
        """Ctrl-C or SIGTERM: abort every member that has not switched over (from a thread of its own)."""
        self._decide(lambda machine: machine.interrupt(f"{signal_name} received"))

    def hung_up(self) -> None:
        """SIGHUP: the group goes on; its story stays in the journal."""
        self._note(
            f"the terminal hung up (SIGHUP): the group goes on; its story: orchestrator history {self.id}"
        )

    # --- the flow -----------------------------------------------------------------------------
    def run(self) -> GroupReport:
        """Every member's pre-flight, then the group; returns the report (never raises for a failure
        of a member: a refusal of one is the group's refusal)."""
        report = self.report
        report.started = self.clock.time()
        try:
            self._open_members()
            self._begin()
            threads = [
                threading.Thread(target=self._member, args=(name,), name=f"group-{name}", daemon=True)
                for name in self._members
            ]
            for thread in threads:
                thread.start()
            if not self.dry_run:
                self._carry_out()
            for thread in threads:
                thread.join()
            self._conclude()
        finally:
            report.ended = self.clock.time()
            self._finish()
            for host in self._hosts:
                close = getattr(host, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
        return report

    def _carry_out(self) -> None:
        """The caller's thread: the group's deadlines, and every decision carried out in order, until
        every member's run has returned."""
        while True:
            with self._cv:
                if not self._queue:
                    if self.machine.done:
                        return
                    self.clock.wait(self._cv, TICK_S)
                    self._queue.extend(self.machine.tick())
                actions = list(self._queue)
                self._queue.clear()
            self._execute(actions)

    def _open_members(self) -> None:
        """Every member on connections of its own (see the module's docstring)."""
        for request in self.requests:
            source = self.open_host(request.source_uri)
            self._hosts.append(source)
            destination = self.open_host(request.destination_uri)
            self._hosts.append(destination)
            name = request.domain
            self._members[name] = Migration(
                request,
                source,
                destination,
                journal=self.journal if not self.dry_run else None,
                clock=self.clock,
                on_entry=self._entry(name),
                parent=self.id,
                lock_dir=self.lock_dir,
                lock_wait_s=self.lock_wait_s,
                group=None if self.dry_run else _Link(self, name),
                kind="group-member",
            )

    def _entry(self, name: str) -> Callable[[TimelineEntry], None]:
        def on_entry(entry: TimelineEntry) -> None:
            if entry.kind in ("note", "decision", "hook", "phase"):
                self._say(f"{name}: {entry.text}")

        return on_entry

    def _member(self, name: str) -> None:
        migration = self._members[name]
        error: str | None = None
        try:
            report = migration.run()
        except OrchestratorError as exc:
            report = migration.report
            error = exc.line()
            report.outcome, report.error = Outcome.REFUSED, error
        except Exception as exc:  # one member's bug must not leave the others held
            report = migration.report
            report.outcome, report.error = Outcome.FAILED, f"internal error: {exc!r}"
        self._reports[name] = report
        self._say(f"{name}: {report.outcome.value}" + (f": {report.error}" if report.error else ""))
        if not self.dry_run:
            self._decide(lambda machine: machine.ended(name, report.outcome, report.error))

    def _conclude(self) -> None:
        report = self.report
        for name, migration in self._members.items():
            member_report = self._reports.get(name, migration.report)
            released = self.machine.members[name].released_at is not None
            report.members.append(
                GroupMember(member_report, migration.machine.downtime_limit if released else None)
            )
        if self.dry_run:
            refused = [m.report for m in report.members if m.report.outcome is Outcome.REFUSED]
            report.outcome = Outcome.REFUSED if refused else Outcome.PLANNED
            report.error = "; ".join(f"{r.domain}: {r.error}" for r in refused) or None
            return
        report.outcome, report.error = self.machine.outcome()
        report.undrain_failed = any(Trigger.GROUP_UNDRAIN.value in f for f in self.machine.hooks_failed)
        if self.machine.hooks_failed:
            failed = "; ".join(self.machine.hooks_failed)
            report.error = f"{report.error}; {failed}" if report.error else failed

    def _begin(self) -> None:
        """The group's own journal row: `history` lists it, `history ID` shows its members."""
        if self.dry_run:
            return
        first = self.requests[0]
        policy = first.policy
        self.journal.begin_migration(
            self.id,
            "group",
            self.name,
            ",".join(dict.fromkeys(r.source_uri for r in self.requests)),
            ",".join(dict.fromkeys(r.destination_uri for r in self.requests)),
            str(policy.path) if policy.path else policy.name,
            self.report.started,
            parent=self.parent,
            drain_mode=DrainMode.GATED.value,
            supervisor=self.runner.supervisor_pid if self._has_hooks else None,
        )
        self._begun = True
        log = self.journal.run_log(self.id)
        if self._has_hooks and log is not None:  # the supervisor records the group hooks' starts and ends
            self.runner.attach(self.id, log.fd)
        members = ", ".join(f"{r.domain} -> {r.destination_uri}" for r in self.requests)
        self._note(f"members: {members}")

    @property
    def _has_hooks(self) -> bool:
        return bool(
            self.policy.hooks_for(Trigger.GROUP_DRAIN) or self.policy.hooks_for(Trigger.GROUP_UNDRAIN)
        )

    def _finish(self) -> None:
        if not self._begun:
            return
        if self._has_hooks:
            self.runner.detach()
        report = self.report
        self.journal.finish_migration(
            self.id,
            report.outcome.value,
            report.changed,
            report.error,
            int(report.exit_code),
            report.ended or time.time(),
            report.to_json(),
        )
