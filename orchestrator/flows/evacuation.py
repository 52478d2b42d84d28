"""Empty a host: place every VM on a destination, then migrate them a few at a time.

Placement is a pure function (`orchestrator.flows.evacuation_plan.place`). The runner starts at most
`concurrency` migrations at once and at most `per_destination` into one host (VDSM's incoming limit),
each through the very same `Migration` path as `orchestrator migrate` (policy, drain/undrain, journal).
A transient failure is retried with backoff, but only once the failed attempt has undrained
everything it drained. Re-running after an interruption moves only what is still there. VMs of one
switchover group (orchestrator.flows.evacuation_groups) move as one `GroupMigration`, never retried.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tenacity

from orchestrator.core import domxml, domxml_edit
from orchestrator.core.errors import BadInput, ConnectError, ExitCode, NothingToDo, OrchestratorError
from orchestrator.core.group import HOLD_TIMEOUT_S, RELEASE_TIMEOUT_S
from orchestrator.core.group_report import GroupReport
from orchestrator.core.interfaces import JournalLike
from orchestrator.core.policy import DrainMode, GroupBy, MigrationSettings, Policy
from orchestrator.core.report import Outcome, Report, hook_failure
from orchestrator.core.request import JobOptions, Request
from orchestrator.flows.evacuation_groups import Unit, assign_labels, group_placements, next_unit
from orchestrator.flows.evacuation_plan import Candidate, Placement, Plan, Target, Unplaced, place, select
from orchestrator.flows.group import GroupMigration, GroupOptions
from orchestrator.flows.migration import Migration

if TYPE_CHECKING:
    from orchestrator.edges.virt import Host

# libvirt errors worth another try: the destination or a connection was busy, not the VM broken.
TRANSIENT = re.compile(
    r"connection reset|end of file while reading|timed out during operation|cannot acquire state change lock"
    r"|resource temporarily unavailable|destination.*busy|too many|unable to connect",
    re.IGNORECASE,
)
RETRIES = 2


def is_transient(report: Report) -> bool:
    """Whether a failed attempt may be retried: a transient libvirt error, and nothing left drained."""
    return (
        report.outcome is Outcome.ROLLED_BACK
        and not report.undrain_failed
        and bool(report.error and TRANSIENT.search(report.error))
    )


@dataclass
class Result:
    """How one VM's move went."""

    domain: str
    destination: str
    outcome: str
    changed: bool
    migration_id: str | None = None
    error: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    group: str | None = None  # the switchover group it went with

    def take(self, report: Report) -> None:
        """The outcome of its migration (its failed hooks in the error)."""
        self.outcome, self.changed = report.outcome.value, report.changed
        self.migration_id, self.error = report.migration_id, report.error
        failures = [hook_failure(hook) for hook in report.failed_hooks()]
        if failures:
            self.error = "; ".join([self.error or self.outcome, *failures])


@dataclass
class EvacuationReport:
    """What `orchestrator evacuate` prints with --json."""

    evacuation_id: str
    source: str
    destinations: list[str]
    dry_run: bool
    plan: list[Placement] = field(default_factory=list)
    unplaced: list[Unplaced] = field(default_factory=list)
    unreachable: list[dict[str, str]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)  # each switchover group's outcome
    notes: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    interrupted: bool = False
    message: str = ""

    @property
    def changed(self) -> bool:
        """Whether anything moved."""
        return any(r.changed for r in self.results)

    @property
    def empty(self) -> bool:
        """Whether no selected VM is left on the source."""
        return not self.left

    @property
    def exit_code(self) -> ExitCode:
        """0 when the source is empty; 130 when interrupted; 8 otherwise."""
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.dry_run:
            refused = any(r.outcome == "refused" for r in self.results)
            return ExitCode.PARTIAL if self.unplaced or refused else ExitCode.OK
        return ExitCode.OK if self.empty else ExitCode.PARTIAL

    def to_json(self) -> dict[str, Any]:
        """One JSON document."""
        return {
            "evacuation_id": self.evacuation_id,
            "source": self.source,
            "destinations": self.destinations,
            "changed": self.changed,
            "dry_run": self.dry_run,
            "empty": self.empty,
            "plan": [asdict(p) for p in self.plan],
            "unplaced": [asdict(u) for u in self.unplaced],
            "unreachable": self.unreachable,
            "results": [asdict(r) for r in self.results],
            "groups": self.groups,
            "notes": self.notes,
            "left": self.left,
            "interrupted": self.interrupted,
            "message": self.message,
            "exit_code": int(self.exit_code),
        }


@dataclass(frozen=True)
class EvacuationRequest:
    """What the user asked for."""

    source_uri: str
    destination_uris: tuple[str, ...]
    policy: Policy
    concurrency: int = 2
    per_destination: int = 2
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    inactive: bool = False
    force: bool = False
    reserve_mib: int = 0
    dry_run: bool = False
    settings: MigrationSettings | None = None  # the policy's, with the command line's overrides
    drain: DrainMode | None = None
    job: JobOptions = field(default_factory=JobOptions)
    group_by: GroupBy | None = None  # --group-by; None: the policy's evacuate.group_by (and its groups)

    def validate(self) -> None:
        """One clear line for each bad option."""
        if not self.source_uri.strip():
            raise BadInput(
                "the source URI (-c/--connect) is empty", "give the libvirt URI of the host to empty"
            )
        if not self.destination_uris:
            raise BadInput("no destination given", "add --to URI (repeat it for several destinations)")
        empty = [index for index, uri in enumerate(self.destination_uris, 1) if not uri.strip()]
        if empty:
            raise BadInput(
                f"--to is empty (destination {empty[0]} of {len(self.destination_uris)})",
                "give a libvirt URI after each --to, e.g. --to 'qemu+ssh://HOST/system'",
            )
        if self.source_uri in self.destination_uris:
            raise BadInput(f"destination {self.source_uri} is the source itself", "drop it from --to")
        if len(set(self.destination_uris)) != len(self.destination_uris):
            raise BadInput("a destination is given twice", "give each --to once")
        if self.concurrency < 1:
            raise BadInput(
                f"--concurrency must be at least 1, not {self.concurrency}", "use 1 for one at a time"
            )
        if self.per_destination < 1:
            raise BadInput(
                f"--per-destination must be at least 1, not {self.per_destination}", "use 1 or more"
            )
        if self.reserve_mib < 0:
            raise BadInput(f"--reserve must be >= 0 MiB, not {self.reserve_mib}", "drop it or use 0")


StatusCallback = Callable[[dict[str, int], dict[str, float]], None]
LineCallback = Callable[[str], None]
Reconcile = Callable[[Sequence["Host"], str], None]


class Evacuation:
    """One evacuation of one source host."""

    def __init__(
        self,
        request: EvacuationRequest,
        *,
        journal: JournalLike | None = None,
        on_status: StatusCallback | None = None,
        on_line: LineCallback | None = None,
        lock_dir: Path | None = None,
        reconcile: Reconcile | None = None,
    ) -> None:
        self.request = request
        self.journal = journal
        self.on_status = on_status
        self.on_line = on_line
        self.lock_dir = lock_dir  # the per-VM migration locks (None: no locking)
        self.reconcile = reconcile  # finishes what a dead orchestrator left undone for a VM
        self.id = uuid.uuid4().hex[:12]
        self.report = EvacuationReport(
            self.id, request.source_uri, list(request.destination_uris), request.dry_run
        )
        self._lock = threading.Condition()
        self._started: float | None = None  # when its journal row was begun
        self._stopping = False
        self._running: dict[str, Migration | GroupMigration] = {}  # by domain, a group by "group NAME"
        self._progress: dict[str, float] = {}

    # --- control (signal handlers call these) ---------------------------------------------------
    def stop(self) -> None:
        """First Ctrl-C/SIGTERM: start nothing new; a second one aborts the running migrations and
        interrupts the running switchover groups (a group not yet released aborts every member)."""
        with self._lock:
            if self._stopping:
                running = list(self._running.values())
            else:
                self._stopping, running = True, []
            self._lock.notify_all()
        for migration in running:
            migration.interrupt("second interrupt")

    # --- the flow -----------------------------------------------------------------------------
    @staticmethod
    def open_host(uri: str) -> Host:
        """A new libvirt connection to `uri`."""
        from orchestrator.edges.virt import Host  # here, not at import: planning is tested without libvirt

        return Host.open(uri)

    def run(self) -> EvacuationReport:
        """Plan, then move; always returns the report (bad input and no source raise)."""
        self.request.validate()
        source = self.open_host(self.request.source_uri)
        destinations: dict[str, Host] = {}
        try:
            source_identity = source.identity()
            for uri in self.request.destination_uris:
                try:
                    host = self.open_host(uri)
                except ConnectError as exc:
                    self.report.unreachable.append({"uri": uri, "error": exc.message})
                    continue
                if source_identity and host.identity() == source_identity:
                    host.close()
                    raise BadInput(f"destination {uri} is the source host itself", "drop it from --to")
                destinations[uri] = host
            if not destinations:
                raise ConnectError(
                    "no destination is reachable: "
                    + "; ".join(f"{u['uri']}: {u['error']}" for u in self.report.unreachable),
                    "check the destination URIs and their libvirt daemons",
                )
            candidates = self._candidates(source)
            targets = [Target(uri, self._free_mib(host)) for uri, host in destinations.items()]
            units = self._group(source, candidates, place(candidates, targets, self.request.reserve_mib))
            for p in self.report.plan:
                self._say(
                    f"plan: {p.order}. {p.domain} ({p.memory_mib} MiB) -> {p.destination}: {p.reason}"
                    + (f" (group {p.group})" if p.group else "")
                )
            for u in self.report.unplaced:
                self._say(f"plan: {u.domain} ({u.memory_mib} MiB) fits nowhere: {u.reason}")
            for note in self.report.notes:
                self._say(f"plan: {note}")
            self._begin()
            if not candidates:
                self.report.message = f"nothing to move: {self.request.source_uri} has no selected VM"
            elif self.report.unplaced and not self.request.force:
                self.report.left = [c.name for c in candidates]
                self.report.message = (
                    f"{len(self.report.unplaced)} VM(s) fit on no destination; nothing moved "
                    "(--force moves the others)"
                )
            elif not self.request.dry_run:
                self._execute(source, destinations, units)
                self.report.left = [c.name for c in self._candidates(source, planning=False)]
            else:
                self._preflight(source, destinations, units)
                self.report.left = [c.name for c in candidates]
                refused = [r.domain for r in self.report.results if r.outcome == "refused"]
                self.report.message = "dry run: nothing moved" + (
                    f"; refused by their pre-flight: {', '.join(refused)}" if refused else ""
                )
        finally:
            self._finish()
            for host in destinations.values():
                host.close()
            source.close()
        return self.report

    def _group(self, source: Host, candidates: Sequence[Candidate], plan: Plan) -> list[Unit]:
        """The plan as the queue's units (switchover groups: --group-by, the policy's [evacuate]); the
        report gets the plan, with each VM's group, what cannot move, and the notes."""
        settings = self.request.policy.evacuate
        groups = () if self.request.group_by is GroupBy.NONE else settings.groups
        running = [c.name for c in candidates if c.running]
        own: dict[str, str] = {}
        if (self.request.group_by or settings.group_by) is GroupBy.METADATA:
            for name in running:
                dom = source.find_domain(name)
                label = domxml.group_label(source.xml(dom)) if dom is not None else None
                if label is not None:
                    own[name] = label
        labels, notes = assign_labels(running, own, groups)
        grouping = group_placements(plan, labels)
        self.report.plan, self.report.unplaced = list(grouping.plan.placements), list(grouping.plan.unplaced)
        self.report.notes = [*notes, *grouping.notes]
        return list(grouping.units)

    def _begin(self) -> None:
        """The evacuation's own journal row: `history` lists it, and `history ID` shows its VMs. A dry run
        (Ansible's check mode) writes nothing."""
        if self.journal is None or self.request.dry_run:
            return
        request = self.request
        policy = request.policy
        self._started = time.time()
        self.journal.begin_migration(
            self.id,
            "evacuation",
            " ".join(request.include) or "*",
            request.source_uri,
            ",".join(request.destination_uris),
            str(policy.path) if policy.path else policy.name,
            self._started,
            drain_mode=(request.drain or policy.switchover.drain).value,
        )

    def _finish(self) -> None:
        if self.journal is None or self._started is None:
            return
        report = self.report
        if report.dry_run:
            outcome = Outcome.PLANNED
        elif report.interrupted:
            outcome = Outcome.INTERRUPTED
        else:
            outcome = Outcome.SUCCEEDED if report.empty else Outcome.PARTIAL
        self.journal.finish_migration(
            self.id,
            outcome.value,
            report.changed,
            report.message or None,
            int(report.exit_code),
            time.time(),
            report.to_json(),
        )

    def _candidates(self, source: Host, *, planning: bool = True) -> list[Candidate]:
        """The selected VMs on the source; when planning, an --include matching nothing is an error
        (afterwards it just means everything moved)."""
        domains = source.domains()
        wanted = [d for d in domains if d.active or (self.request.inactive and d.persistent)]
        names = select([d.name for d in wanted], self.request.include, self.request.exclude)
        if (
            planning
            and self.request.include
            and not select([d.name for d in domains], self.request.include, ())
        ):
            raise NothingToDo(
                f"no VM on {self.request.source_uri} matches --include {' '.join(self.request.include)}",
                "check the globs (they match whole names; quote them in the shell)",
            )
        by_name = {d.name: d for d in wanted}
        return [Candidate(n, by_name[n].memory_kib // 1024, by_name[n].active) for n in names]

    @staticmethod
    def _free_mib(host: Host) -> int:
        held = sum(d.memory_kib for d in host.domains() if d.active) // 1024
        return host.node_memory_mib() - held

    def _execute(self, source: Host, destinations: dict[str, Host], units: Sequence[Unit]) -> None:
        queue = deque(u for u in units if all(p.destination in destinations for p in u.members))
        incoming: dict[str, int] = dict.fromkeys(destinations, 0)
        counts = {"done": 0, "running": 0, "queued": sum(len(u.members) for u in queue), "failed": 0}
        request = self.request
        with self._lock:
            while True:
                # Start what the limits allow, in plan order (evacuation_groups.next_unit).
                while not self._stopping and (
                    unit := next_unit(
                        queue, counts["running"], incoming, request.concurrency, request.per_destination
                    )
                ):
                    queue.remove(unit)
                    for item in unit.members:
                        incoming[item.destination] += 1
                    counts["running"] += len(unit.members)
                    counts["queued"] -= len(unit.members)
                    item = unit.members[0]
                    threading.Thread(
                        target=self._move if unit.group is None else self._move_group,
                        args=(unit, source, destinations, incoming, counts),
                        name=f"evacuate-{item.domain}"
                        if unit.group is None
                        else f"evacuate-group-{unit.group}",
                        daemon=True,
                    ).start()
                self._status(counts)
                if counts["running"] == 0 and (not queue or self._stopping):
                    break
                self._lock.wait(0.5)
        if self._stopping:
            self.report.interrupted = True
            if queue:
                self.report.message = f"interrupted: {sum(len(u.members) for u in queue)} VM(s) not started"

    def _status(self, counts: dict[str, int]) -> None:
        if self.on_status is not None:
            self.on_status(dict(counts), dict(self._progress))

    def _move(
        self,
        unit: Unit,
        source: Host,
        destinations: dict[str, Host],
        incoming: dict[str, int],
        counts: dict[str, int],
    ) -> None:
        item = unit.members[0]
        destination = destinations[item.destination]
        began = time.monotonic()
        result = Result(item.domain, item.destination, "failed", False)
        self._say(f"{item.domain}: started -> {item.destination}")
        try:
            if item.running:
                self._migrate_with_retries(item, source, destination, result)
            else:
                self._move_definition(item, source, destination, result)
        except OrchestratorError as exc:  # its pre-flight said no (journaled as refused): as in a dry run
            result.outcome, result.error = "refused", exc.line()
        except Exception as exc:  # one VM's bug must not stop the others
            result.error = f"internal error: {exc!r}"
        result.seconds = round(time.monotonic() - began, 3)
        self._tell(result, f" in {result.seconds:.1f} s")
        self._settle([result], incoming, counts)

    def _move_group(
        self,
        unit: Unit,
        source: Host,
        destinations: dict[str, Host],
        incoming: dict[str, int],
        counts: dict[str, int],
    ) -> None:
        """A switchover group's members, as one `GroupMigration` (never retried); a `Result` each."""
        began, name = time.monotonic(), f"group {unit.group}"
        results = [Result(p.domain, p.destination, "failed", False, group=unit.group) for p in unit.members]
        self._say(f"{name}: started: {', '.join(f'{p.domain} -> {p.destination}' for p in unit.members)}")
        try:
            if self.reconcile is not None:
                for p in unit.members:
                    self.reconcile([source, destinations[p.destination]], p.domain)
            group = self._group_migration(unit)
            with self._lock:
                if self._stopping:
                    raise _Stopped
                self._running[name] = group
            try:
                self._group_results(group.run(), results)
            finally:
                with self._lock:
                    self._running.pop(name, None)
        except _Stopped:
            for r in results:
                r.outcome, r.error = "not-started", "interrupted before it started"
        except OrchestratorError as exc:
            for r in results:
                r.outcome, r.error = "refused", exc.line()
        except Exception as exc:  # one group's bug must not stop the others
            for r in results:
                r.error = f"internal error: {exc!r}"
        for r in results:
            r.seconds = round(time.monotonic() - began, 3)
            self._tell(r, f" in {r.seconds:.1f} s")
        if any(r.outcome not in ("succeeded", "unchanged", "not-started") for r in results):
            self._say(f"{name}: not retried (a group never is): run the evacuation again to move the rest")
        self._settle(results, incoming, counts)

    def _group_migration(self, unit: Unit, *, dry_run: bool = False) -> GroupMigration:
        return GroupMigration(
            unit.group or "",
            [self._request(p, dry_run=dry_run, gated=True) for p in unit.members],
            self.open_host,
            GroupOptions(hold_timeout_s=HOLD_TIMEOUT_S, release_timeout_s=RELEASE_TIMEOUT_S),
            journal=self.journal,
            parent=self.id,
            lock_dir=self.lock_dir,
            on_line=self._say,
            dry_run=dry_run,
        )

    def _group_results(self, report: GroupReport, results: Sequence[Result]) -> None:
        """Each member's outcome from its own report (the group's, if it has none); the group's line."""
        members = {m.report.domain: m.report for m in report.members}
        for result in results:
            result.attempts = 0 if report.dry_run else 1
            if result.domain in members:
                result.take(members[result.domain])
            else:
                result.outcome, result.error = report.outcome.value, report.error
        summary: dict[str, Any] = {"group": report.name, "group_id": report.group_id, "error": report.error}
        summary.update(
            outcome=report.outcome.value, stall_ms=report.stall_ms, members=[r.domain for r in results]
        )
        with self._lock:
            self.report.groups.append(summary)

    def _settle(self, results: Sequence[Result], incoming: dict[str, int], counts: dict[str, int]) -> None:
        with self._lock:
            for result in results:
                self.report.results.append(result)
                incoming[result.destination] -= 1
                counts["running"] -= 1
                counts["failed" if result.outcome not in ("succeeded", "unchanged") else "done"] += 1
                self._progress.pop(result.domain, None)
            self._lock.notify_all()

    def _say(self, line: str) -> None:
        if self.on_line is not None:
            self.on_line(line)

    def _tell(self, r: Result, timing: str = "") -> None:
        group = f" with group {r.group}" if r.group else ""
        self._say(f"{r.domain}: {r.outcome}{timing}{group}" + (f": {r.error}" if r.error else ""))

    def _request(self, item: Placement, *, dry_run: bool = False, gated: bool = False) -> Request:
        return Request(
            domain=item.domain,
            source_uri=self.request.source_uri,
            destination_uri=item.destination,
            policy=self.request.policy,
            settings=self.request.settings,
            drain=DrainMode.GATED if gated else self.request.drain,
            job=self.request.job,
            dry_run=dry_run,
        )

    def _preflight(self, source: Host, destinations: dict[str, Host], units: Sequence[Unit]) -> None:
        """--dry-run (Ansible's check mode): each running VM's own pre-flight (events on, hooks there,
        no job running, not already on the destination; a group's dry run for its members), so that the
        plan promises only what would work."""
        for unit in units:
            if unit.group is not None:
                results = [
                    Result(p.domain, p.destination, "planned", False, group=unit.group) for p in unit.members
                ]
                try:
                    self._group_results(self._group_migration(unit, dry_run=True).run(), results)
                except OrchestratorError as exc:
                    for r in results:
                        r.outcome, r.error = "refused", exc.line()
                self.report.results.extend(results)
                for r in results:
                    self._tell(r)
                continue
            item = unit.members[0]
            result = Result(item.domain, item.destination, "planned", False, attempts=0)
            if item.running and item.destination in destinations:
                try:
                    report = Migration(
                        self._request(item, dry_run=True),
                        source,
                        destinations[item.destination],
                        journal=self.journal,
                        parent=self.id,
                    ).run()
                    result.outcome = report.outcome.value
                except OrchestratorError as exc:
                    result.outcome, result.error = "refused", exc.line()
            self.report.results.append(result)
            self._tell(result)

    def _migrate_with_retries(self, item: Placement, source: Host, destination: Host, result: Result) -> None:
        request = self._request(item)
        if self.reconcile is not None:
            self.reconcile([source, destination], item.domain)

        def attempt() -> Report:
            # Each migration on a source connection of its own: libvirtd serves at most
            # max_client_requests calls at once per connection (5 by default) and a migration call
            # holds one for its whole job, so on one shared connection the fifth running migration
            # would hold back every other call on it: the gate's release, statistics, aborts.
            own = self.open_host(self.request.source_uri)
            try:
                migration = Migration(
                    request,
                    own,
                    destination,
                    journal=self.journal,
                    parent=self.id,
                    on_progress=lambda p: self._progress.__setitem__(item.domain, p.fraction),
                    on_entry=lambda entry: self._say(f"{item.domain}: {entry.text}"),
                    lock_dir=self.lock_dir,
                )
                with self._lock:
                    if self._stopping:
                        raise _Stopped
                    self._running[item.domain] = migration
                try:
                    result.attempts += 1
                    return migration.run()
                finally:
                    with self._lock:
                        self._running.pop(item.domain, None)
            finally:
                own.close()

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(1 + RETRIES),
            wait=tenacity.wait_exponential(multiplier=1, min=1, max=8),
            retry=tenacity.retry_if_result(is_transient),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        try:
            report: Report = retrying(attempt)
        except _Stopped:
            result.outcome, result.error = "not-started", "interrupted before it started"
            return
        result.take(report)

    def _move_definition(self, item: Placement, source: Host, destination: Host, result: Result) -> None:
        """A persistent inactive VM: define it on the destination, then undefine it on the source."""
        result.attempts = 1
        dom = source.domain(item.domain)
        if destination.find_domain(item.domain) is not None:
            raise BadInput(f"{item.domain} is already defined on {item.destination}", "remove one of the two")
        xml = domxml_edit.destination_xml(source.xml(dom, inactive=True, secure=True))
        copy = destination.define(xml)
        try:
            source.undefine(dom)
        except BaseException:
            destination.undefine(copy)  # the undo: never two definitions of one VM
            raise
        result.outcome, result.changed = "succeeded", True


class _Stopped(Exception):
    """Raised inside a worker when the evacuation stopped before its migration started."""
