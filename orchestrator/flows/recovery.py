"""`orchestrator recover`: finish what an orchestrator that died left undone.

A migration writes every drain down as `starting` in its run log before its hooks start, and its hook
supervisor writes each hook's start and end there itself (edges.runlog, edges.supervisor).
So whenever the orchestrator died (SIGKILL, OOM, the controller rebooting), its run log says which
devices may still be drained and what became of every hook. For each migration of this host whose
process is gone and that was never finished (`Journal.unfinished`), recovery, holding the VM's lock:

1. waits for the dead run's hook supervisor to finish: it lets every running hook end or reach its
   deadline, writes their ends, and exits (bounded by the policy's longest hook timeout; killed after
   it). A hook whose end was never written (the supervisor died too) is waited for, to its deadline,
   then its whole tree is killed. So no device is undrained while a drain of it may still run;
2. asks both hosts whether a libvirt job of the VM still runs (a peer-to-peer migration goes on
   without its client) and waits for it to end (`job="wait"`, bounded) or aborts it (`"abort"`; a job
   held at the gate is aborted either way: nothing would release it), then where the VM runs now;
3. decides, device by device, from the records alone (`plan`): a device whose drain never started a
   hook needs nothing; an undrain whose every hook ended under the supervisor is journaled `ended`
   with their result, never run again; the undrain hooks that never started are run, once, with the
   policy the migration used (its text, as journaled when it began) and the state the device ends in;
4. records the true outcome: succeeded when the VM runs on the destination, rolled-back on the
   source, failed (an admin must look) when it runs on neither or both; and imports the run log.

The same reconciliation runs, for the VM in question, at the start of `migrate` and `evacuate`.
Migrations recorded by older orchestrators (no run log) are recovered from their device actions: every
device still drained is undrained.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.core.convergence import GATE_FLOOR_MS
from orchestrator.core.errors import ExitCode, OrchestratorError
from orchestrator.core.group import GROUP_DEVICE
from orchestrator.core.hooks import PLACEHOLDERS, Hook, HookResult, Trigger
from orchestrator.core.hypervisor import ACTIVE_STATES, Clock, Hypervisor, SystemClock
from orchestrator.core.policy import Policy
from orchestrator.core.policy_toml import parse_policy
from orchestrator.core.records import DeviceAction, MigrationKind, MigrationRow, still_drained
from orchestrator.core.report import Outcome
from orchestrator.edges import procfs
from orchestrator.edges.hook_runner import HookRunner
from orchestrator.edges.journal import Journal
from orchestrator.edges.locks import MigrationLock, lock_dir
from orchestrator.edges.process_tree import KILL_GRACE_S, KILL_WAIT_S, Tree
from orchestrator.edges.supervisor_process import ORPHAN_GRACE_S

JOB_WAIT_S = 300.0  # job="wait": how long to wait for a libvirt job the dead orchestrator left running
_JOB_POLL_S = 0.5
PROGRESS_EVERY_S = 5.0  # while recover waits (a supervisor, a job), a line this often
JOB_CHOICES = ("wait", "abort")
SUPERVISOR_SLACK_S = 5.0  # beyond the policy's longest hook timeout: a supervisor still alive is killed


@dataclass
class Recovered:
    """What recovery did for one migration."""

    migration_id: str
    domain: str
    outcome: str
    location: str
    undrained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # devices whose undrain failed: an admin must look
    notes: list[str] = field(default_factory=list)
    awaited: list[str] = field(default_factory=list)  # devices whose undrain had run under the supervisor

    def to_json(self) -> dict[str, Any]:
        """One JSON object."""
        return {
            "migration_id": self.migration_id,
            "domain": self.domain,
            "outcome": self.outcome,
            "location": self.location,
            "undrained": self.undrained,
            "awaited": self.awaited,
            "failed": self.failed,
            "notes": self.notes,
        }


@dataclass
class RecoveryReport:
    """What `orchestrator recover` prints with --json (with `dry_run`: what it would do, nothing done)."""

    recovered: list[Recovered] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # could not be recovered now, and why
    dry_run: bool = False

    @property
    def exit_code(self) -> ExitCode:
        """0 when everything was recovered; 9 when something needs an admin."""
        needs_admin = self.skipped or any(r.failed or r.outcome == Outcome.FAILED for r in self.recovered)
        return ExitCode.NEEDS_ADMIN if needs_admin else ExitCode.OK

    def to_json(self) -> dict[str, Any]:
        """One JSON document."""
        return {
            "recovered": [r.to_json() for r in self.recovered],
            "skipped": self.skipped,
            "dry_run": self.dry_run,
            "exit_code": int(self.exit_code),
        }


# --- the decision: pure, from the records -----------------------------------------------------------


@dataclass(frozen=True)
class DevicePlan:
    """What recovery does for one device.

    `run`: the undrain hooks (their places among the policy's undrain hooks) to run now. `ended`: the
    undrain ran to its end under the supervisor (`ok`: every hook of it succeeded). `why`: in words."""

    device_id: str
    run: tuple[int, ...] = ()
    ended: bool = False
    ok: bool = True
    why: str = ""


def plan(records: Sequence[Mapping[str, Any]], policy: Policy, *, supervised: bool) -> list[DevicePlan]:
    """For each device the run log shows drained and not undrained: what recovery must do.

    `supervised`: every supervisor of the run wrote that it finished (so a hook it has no start record
    of never ran); otherwise a drain is assumed to have run as soon as it was written down."""
    undrain_hooks = policy.hooks_for(Trigger.UNDRAIN)
    armed_drain = any(hook.armed for hook in policy.hooks_for(Trigger.DRAIN))
    drains: dict[str, bool] = {}  # device -> a drain hook of it may have run
    undone: dict[str, str] = {}  # device -> the status of its last undrain action
    starts: dict[str, Mapping[str, Any]] = {}
    ended: dict[tuple[str, int], bool] = {}  # (device, undrain hook place) -> ok
    armed_answers: dict[tuple[str, str], bool] = {}  # (device, label) -> ok
    unknown: set[str] = set()  # devices with an undrain hook that ended with no one to see its status
    for record in records:
        k = record.get("k")
        if k == "action":
            device, action, status = record.get("device_id", ""), record.get("action"), record.get("status")
            if action == "drain" and status == "starting":
                drains.setdefault(device, armed_drain or not supervised)
                undone.pop(device, None)
            elif action == "undrain":
                undone[device] = str(status)
        elif k == "hook-start":
            starts[str(record.get("run"))] = record
            if record.get("trigger") == "drain" and record.get("device_id") in drains:
                drains[str(record["device_id"])] = True
        elif k == "hook-end":
            start = starts.get(str(record.get("run")), {})
            if start.get("trigger") == "undrain" and isinstance(start.get("hook"), int):
                ok = record.get("error") is None and record.get("exit_code") == 0
                ended[(str(start.get("device_id")), int(start["hook"]))] = ok
                if record.get("unknown"):
                    unknown.add(str(start.get("device_id")))
        elif k == "hook" and record.get("trigger") == "undrain" and record.get("device_id"):
            armed_answers[(str(record["device_id"]), str(record.get("label")))] = bool(record.get("ok"))
    plans = []
    for device, ran in drains.items():
        if undone.get(device) in ("done", "failed", "ended"):
            continue
        if not ran:
            plans.append(DevicePlan(device, why="its drain never started a hook: nothing to undo"))
            continue
        missing, oks = [], []
        for place, hook in enumerate(undrain_hooks):
            result = armed_answers.get((device, hook.label)) if hook.armed else ended.get((device, place))
            if result is None:
                missing.append(place)
            else:
                oks.append(result)
        if missing or not undrain_hooks:
            plans.append(DevicePlan(device, run=tuple(missing), why="drained, and not undrained"))
        elif device in unknown:  # it ran: not run twice; whether it restored anything, no one saw
            why = "its undrain ran to its end, its exit status unseen (its supervisor died): check it"
            plans.append(DevicePlan(device, ended=True, ok=False, why=why))
        else:
            plans.append(DevicePlan(device, ended=True, ok=all(oks), why="its undrain ran to its end"))
    return plans


# --- the I/O around it ------------------------------------------------------------------------------

HostOpener = Callable[[str], Hypervisor]
_CONTAINERS = frozenset({MigrationKind.GROUP, MigrationKind.EVACUATION})


class Recovery:
    """Recovers the unfinished migrations of one journal."""

    def __init__(
        self,
        journal: Journal,
        open_host: HostOpener,
        *,
        job: str = "wait",
        job_wait_s: float = JOB_WAIT_S,
        runner: HookRunner | None = None,
        on_line: Callable[[str], None] | None = None,
        clock: Clock | None = None,
        hosts: Sequence[Hypervisor] = (),
    ) -> None:
        if job not in JOB_CHOICES:
            raise ValueError(f"job must be one of {JOB_CHOICES}")
        self.journal = journal
        self.open_host = open_host
        self.job = job
        self.job_wait_s = job_wait_s
        self.runner = runner or HookRunner()
        self.on_line = on_line
        self.clock: Clock = clock or SystemClock()
        self._given = {host.uri: host for host in hosts}  # open already: the caller closes them
        self._opened: dict[str, Hypervisor] = {}
        self._pause = threading.Condition()

    def run(self, domain: str | None = None, *, dry_run: bool = False) -> RecoveryReport:
        """Recover every unfinished migration (of `domain` only, if given), oldest first; with `dry_run`,
        say what it would do (asking both hosts, reading the run logs) and do nothing."""
        report = RecoveryReport(dry_run=dry_run)
        rows = self.journal.unfinished()
        # A group's or an evacuation's own row holds no device: it is closed once its VMs are recovered.
        containers = [row for row in rows if row.kind in _CONTAINERS]
        for row in rows:
            if row.kind in _CONTAINERS or (domain is not None and row.domain != domain):
                continue
            try:
                report.recovered.append(self._preview(row) if dry_run else self._recover(row))
            except OrchestratorError as exc:
                report.skipped.append({"migration_id": row.id, "domain": row.domain, "error": exc.line()})
                self._say(f"{row.domain}: migration {row.id} not recovered: {exc.line()}")
        for row in reversed(containers):  # newest first: a group inside an evacuation closes before it
            if (
                domain is not None
                and row.domain != domain
                and not any(r.domain == domain for r in self.journal.children(row.id))
            ):
                continue
            try:
                closed = self._close_container(row, dry_run=dry_run)
            except OrchestratorError as exc:
                report.skipped.append({"migration_id": row.id, "domain": row.domain, "error": exc.line()})
                continue
            if closed is not None:
                report.recovered.append(closed)
        return report

    def _close_container(self, row: MigrationRow, *, dry_run: bool) -> Recovered | None:
        """A dead group's or evacuation's own row, once none of its VMs' migrations is unfinished: its
        outcome from theirs. None while one still is (recover it first; a later recover closes it)."""
        children = self.journal.children(row.id)
        if any(child.outcome is Outcome.RUNNING or child.outcome is None for child in children):
            return None
        moved = [c.domain for c in children if c.outcome is Outcome.SUCCEEDED]
        if children and len(moved) == len(children):
            outcome = Outcome.SUCCEEDED
        elif moved:
            outcome = Outcome.PARTIAL
        else:
            outcome = Outcome.INTERRUPTED
        what = f"{row.kind.value} {row.domain}"
        error = f"the orchestrator (process {row.pid}) died; its VMs' migrations were recovered: " + (
            ", ".join(f"{c.domain} {c.outcome.value if c.outcome else '?'}" for c in children)
            or "none started"
        )
        result = Recovered(row.id, row.domain, outcome.value, "-", notes=[error])
        due = self._group_undrain_due(row)
        if dry_run:
            result.notes = [f"would close {what}: {outcome.value}"]
            if due:
                result.notes.append(f"would run the group's {len(due)} group-undrain hook(s)")
            return result
        self.journal.resume(row.id)
        if due:
            self._group_undrain(row, due, result)
            if result.failed:
                error += "; its group-undrain failed: restore the job's workloads by hand"
        self.journal.mark_recovered(row.id, outcome, error, time.time(), result.to_json())
        self._say(f"{what}: {row.id} {outcome.value} ({error})")
        return result

    # --- one migration ----------------------------------------------------------------------------
    def _recover(self, row: MigrationRow) -> Recovered:
        source, destination = self._host(row.source_uri), self._host(row.destination_uri)
        uuid = self._uuid(row, source, destination)
        with MigrationLock.acquire(
            lock_dir(), uuid, f"recover-{row.id}", domain=row.domain, source=row.source_uri, wait_s=5.0
        ):
            self._say(
                f"{row.domain}: recovering migration {row.id} (process {row.pid} died in phase {row.phase})"
            )
            policy = self._policy(row)
            legacy = not self.journal.records(row.id)
            notes = [] if legacy else self._await_supervisors(row, policy)
            notes += self._settle_job(row, source)
            location = self._location(row, source, destination)
            result = Recovered(row.id, row.domain, _outcome(location).value, location, notes=notes)
            # An older orchestrator's: every device still drained per its device actions (read before
            # recover adds its own records).
            drained = still_drained(self.journal.device_actions(row.id)) if legacy else {}
            self.journal.resume(row.id)
            log = self.journal.run_log(row.id)
            if log is not None:
                self.runner.attach(row.id, log.fd)
            self.journal.claim(row.id, self.runner.supervisor_pid)
            try:
                self._settle_orphans(row, policy)
                plans = self._plans(row, policy, legacy=drained if legacy else None)
                for device in plans:
                    self._carry_out(row, policy, device, location, result)
            finally:
                self.runner.detach()
            done = []
            if result.undrained:
                done.append(f"undrained {', '.join(result.undrained)}")
            if result.awaited:
                done.append(f"the undrain of {', '.join(result.awaited)} had run to its end")
            what = "; ".join(done) or "nothing was left drained"
            error = (
                f"the orchestrator (process {row.pid}) died in phase {row.phase}; recovered: {what}; "
                f"the VM runs on {location}"
            )
            if result.failed:
                error += f"; the undrain of {', '.join(result.failed)} failed: restore them by hand"
            outcome = _outcome(location)
            self.journal.mark_recovered(row.id, outcome, error, time.time(), result.to_json())
            self._say(f"{row.domain}: migration {row.id} {outcome.value} ({what}; the VM runs on {location})")
            return result

    def _preview(self, row: MigrationRow) -> Recovered:
        """What `_recover` would do for `row`, from the run log and both hosts' answers; nothing done,
        nothing locked, nothing written."""
        source, destination = self._host(row.source_uri), self._host(row.destination_uri)
        policy = self._policy(row)
        legacy = not self.journal.records(row.id)
        notes = [
            f"would wait for the dead run's hook supervisor (process {pid}) to finish its hooks"
            for pid, start in ([] if legacy else self.journal.supervisors(row.id))
            if procfs.same_process(pid, start)
        ]
        dom = source.find_domain(row.domain)
        if dom is not None and dom.job_stats() is not None:
            held = dom.max_downtime() == GATE_FLOOR_MS
            notes.append(
                "would abort the libvirt job held at the gate"
                if held or self.job == "abort"
                else f"would wait for the libvirt job still running (at most {self.job_wait_s:g} s)"
            )
        location = self._location(row, source, destination)
        result = Recovered(row.id, row.domain, _outcome(location).value, location, notes=notes)
        drained = still_drained(self.journal.device_actions(row.id)) if legacy else None
        for device in self._plans(row, policy, legacy=drained):
            if device.ended:
                (result.awaited if device.ok else result.failed).append(device.device_id)
            elif device.run:
                result.undrained.append(device.device_id)
        undrain = ", ".join(result.undrained) or "nothing"
        self._say(
            f"{row.domain}: migration {row.id} would be recovered: undrain {undrain}; the VM runs on "
            f"{location}" + "".join(f"; {note}" for note in notes)
        )
        return result

    def _plans(
        self, row: MigrationRow, policy: Policy, *, legacy: Mapping[str, Any] | None
    ) -> list[DevicePlan]:
        if legacy is not None:  # an older orchestrator's: every device still drained, every undrain hook
            everything = tuple(range(len(policy.hooks_for(Trigger.UNDRAIN))))
            return [DevicePlan(device, run=everything, why="drained, and not undrained") for device in legacy]
        records = self.journal.records(row.id)
        supervisors = {pid for pid, _start in self.journal.supervisors(row.id)}
        clean = {r.get("pid") for r in records if r.get("k") == "supervised"}
        mine = self.runner.supervisor_pid
        return plan(records, policy, supervised=bool(supervisors) and supervisors - {mine} <= clean)

    def _group_undrain_due(self, row: MigrationRow) -> tuple[Hook, ...]:
        """A dead group's own undrain hooks, when its group drain started and its undrain never did
        (run once: an undrain that started, even unfinished, is not run again)."""
        if row.kind is not MigrationKind.GROUP:
            return ()
        steps = [a for a in self.journal.device_actions(row.id) if a.device_id == GROUP_DEVICE]
        drained = any(a.action is DeviceAction.DRAIN for a in steps)
        if not drained or any(a.action is DeviceAction.UNDRAIN for a in steps):
            return ()
        return self._policy(row).hooks_for(Trigger.GROUP_UNDRAIN)

    def _group_undrain(self, row: MigrationRow, hooks: Sequence[Hook], result: Recovered) -> None:
        policy = self._policy(row)
        result.notes += self._await_supervisors(row, policy)  # the group drain's hooks end first
        log = self.journal.run_log(row.id)
        if log is not None:
            self.runner.attach(row.id, log.fd)
        self.journal.claim(row.id, self.runner.supervisor_pid)
        action = DeviceAction.UNDRAIN.value
        self.journal.record_device_action(row.id, GROUP_DEVICE, action, "starting", time.time(), "recover")
        members = ",".join(child.domain for child in self.journal.children(row.id))
        values = {name: "" for name in PLACEHOLDERS} | {
            "device_id": GROUP_DEVICE,
            "state": Trigger.GROUP_UNDRAIN.value,
            "migration_id": row.id,
            "source": row.source_uri,
            "destination": row.destination_uri,
            "group": row.domain,
            "group_id": row.id,
            "members": members,
        }
        try:
            for hook in hooks:
                outcome = self.runner.run(hook, values, GROUP_DEVICE)
                self.journal.record_hook(row.id, outcome.to_json())
                if not outcome.ok:
                    result.failed.append(f"{GROUP_DEVICE} ({hook.label}: {outcome.error})")
        finally:
            self.runner.detach()
        status = "failed" if result.failed else "done"
        self.journal.record_device_action(row.id, GROUP_DEVICE, action, status, time.time(), None)
        result.undrained.append(GROUP_DEVICE)
        self._say(f"group {row.domain}: ran its group-undrain hooks ({status})")

    def _await_supervisors(self, row: MigrationRow, policy: Policy) -> list[str]:
        """Wait for the dead run's supervisors to finish its hooks and exit; kill one that outlives the
        longest hook's timeout (its hooks are then settled one by one, `_settle_orphans`)."""
        longest = max((hook.timeout_ms for hook in policy.all_hooks()), default=0) / 1000
        bound = longest + KILL_GRACE_S + KILL_WAIT_S + ORPHAN_GRACE_S + SUPERVISOR_SLACK_S
        notes = []
        for pid, start in self.journal.supervisors(row.id):
            if not procfs.same_process(pid, start):
                continue
            self._say(
                f"{row.domain}: the dead run's hook supervisor (process {pid}) still runs its hooks: waiting "
                f"for them (at most {bound:g} s, the policy's longest hook timeout and its kill)"
            )
            if not self._wait_gone_telling(row, pid, start, bound, "the dead run's hooks to end"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, 9)
                _wait_gone(pid, start, KILL_WAIT_S)
                notes.append(f"killed the dead run's hook supervisor (process {pid}) after {bound:g} s")
            else:
                notes.append(f"waited for the dead run's hook supervisor (process {pid}) to finish its hooks")
        return notes

    def _wait_gone_telling(
        self, row: MigrationRow, pid: int, start: Any, timeout_s: float, what: str
    ) -> bool:
        """`_wait_gone`, saying every PROGRESS_EVERY_S that it still waits."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if _wait_gone(pid, start, min(PROGRESS_EVERY_S, max(left, 0.0))):
                return True
            if left <= PROGRESS_EVERY_S:
                return False
            self._say(f"{row.domain}: still waiting for {what} ({left - PROGRESS_EVERY_S:.0f} s left)")

    def _settle_orphans(self, row: MigrationRow, policy: Policy) -> None:
        """Hooks whose end no supervisor wrote (it died too): wait for each to its deadline, then kill its
        tree, and write its end down in recover's words. So nothing of the dead run still acts."""
        records = self.journal.records(row.id)
        ends = {str(r.get("run")) for r in records if r.get("k") == "hook-end"}
        for start in (r for r in records if r.get("k") == "hook-start" and str(r.get("run")) not in ends):
            pid, tick, tag = start.get("pid"), start.get("start"), str(start.get("tag") or "")
            if not isinstance(pid, int):
                continue
            deadline = float(start.get("started") or 0) + float(start.get("timeout_ms") or 0) / 1000
            if start.get("armed"):
                deadline += ORPHAN_GRACE_S
            waited = _wait_gone(pid, tick, max(0.0, deadline + KILL_GRACE_S - time.time()))
            if not waited:
                Tree(pid, tag.encode(), tick or 0, set).signal_until_gone()
            how = (
                "it ended by itself, its exit status unseen"
                if waited
                else "recover killed it at its deadline"
            )
            error = f"its end was not recorded (the hook supervisor died); {how}"
            self.journal.record_supervised_end(row.id, str(start.get("run")), error, unknown=waited)
            what = f"{start.get('label')} ({start.get('trigger')} {start.get('device_id')})"
            self._say(f"{row.domain}: hook {what}: {error}")

    def _carry_out(
        self, row: MigrationRow, policy: Policy, device: DevicePlan, location: str, result: Recovered
    ) -> None:
        name = device.device_id
        if device.ended:
            status = "ended" if device.ok else "failed"
            self.journal.record_device_action(row.id, name, "undrain", status, time.time(), device.why)
            (result.awaited if device.ok else result.failed).append(name)
            self._say(f"{row.domain}: undrain {name}: {device.why} under the hook supervisor")
            return
        if not device.run and policy.hooks_for(Trigger.UNDRAIN):
            self._say(f"{row.domain}: {name}: {device.why}")
            return
        self._undrain(row, policy, name, device.run, location, result)

    def _undrain(
        self,
        row: MigrationRow,
        policy: Policy,
        device: str,
        places: Iterable[int],
        location: str,
        result: Recovered,
    ) -> None:
        state = "running" if location in ("source", "destination") else "unknown"
        values = {
            "domain": row.domain,
            "device_id": device,
            "qom_path": f"/machine/peripheral/{device}",
            "state": state,
            "migration_id": row.id,
            "source": row.source_uri,
            "destination": row.destination_uri,
        }
        reason = f"recovery: the orchestrator died; the VM runs on {location}"
        self.journal.record_device_action(row.id, device, "undrain", "starting", time.time(), reason)
        hooks = policy.hooks_for(Trigger.UNDRAIN)
        waits: list[Callable[[], HookResult]] = []
        for place in places:
            hook = hooks[place]
            if hook.armed:
                waits.append(self._fire_armed(hook, values, device, state))
            else:
                waits.append(self.runner.start(hook, values, device, index=place).wait)
        results = [wait() for wait in waits]
        for hook_result in results:
            self.journal.record_hook(row.id, hook_result.to_json())
        ok = all(r.ok for r in results)
        self.journal.record_device_action(row.id, device, "undrain", "done" if ok else "failed", time.time())
        (result.undrained if ok else result.failed).append(device)
        self._say(
            f"{row.domain}: undrain {device}: "
            + ("ok" if ok else "; ".join(r.error or "failed" for r in results))
        )

    def _fire_armed(
        self, hook: Hook, values: dict[str, str], device: str, state: str
    ) -> Callable[[], HookResult]:
        """An armed undrain hook, for one device: arm it and wake it now; what waits for its answer and
        closes it."""
        armed = self.runner.arm(hook, {**values, "device_id": "", "qom_path": "", "state": "armed"})
        arming = armed.wait_ready()
        answered = threading.Event()
        box: list[HookResult] = []

        def done(answer: HookResult) -> None:
            box.append(answer)
            answered.set()

        if arming.ok:
            armed.fire(device, state, None, done)

        def wait() -> HookResult:
            if arming.ok:
                answered.wait(hook.timeout_ms / 1000 + 5)  # the hook's own deadline ends it before this
            armed.close()
            return box[0] if box else arming

        return wait

    def _settle_job(self, row: MigrationRow, source: Hypervisor) -> list[str]:
        """Wait for (or abort) a libvirt job the dead process left running; notes of what happened."""
        dom = source.find_domain(row.domain)
        if dom is None or dom.job_stats() is None:
            return []
        if self.job == "abort" or dom.max_downtime() == GATE_FLOOR_MS:
            held = self.job != "abort"
            dom.abort_job()
            note = (
                "aborted the libvirt job held at the gate (nothing would release it)"
                if held
                else "aborted the libvirt job that was still running"
            )
            self._say(f"{row.domain}: {note}")
        else:
            self._say(
                f"{row.domain}: waiting for the libvirt job the dead orchestrator left running (at most "
                f"{self.job_wait_s:g} s, --job-wait; to abort it instead: orchestrator recover --job abort)"
            )
            note = "waited for the libvirt job that was still running"
        began = self.clock.monotonic()
        deadline, told = began + self.job_wait_s, began
        while (stats := dom.job_stats()) is not None:
            now = self.clock.monotonic()
            if now - told >= PROGRESS_EVERY_S:
                told = now
                left = (
                    f", {stats.memory_remaining >> 20} MiB left" if stats.memory_remaining is not None else ""
                )
                self._say(
                    f"{row.domain}: the libvirt job still runs ({now - began:.0f} s of at most "
                    f"{self.job_wait_s:g}{left}); --job abort aborts it instead"
                )
            if self.clock.monotonic() > deadline:
                raise OrchestratorError(
                    f"the libvirt job of {row.domain} still runs after {self.job_wait_s:g} s",
                    f"recover again later, or abort it: virsh -c '{row.source_uri}' domjobabort {row.domain}",
                )
            with self._pause:  # libvirt has no event for a job ending that reaches another client
                self.clock.wait(self._pause, _JOB_POLL_S)
        return [note]

    def _location(self, row: MigrationRow, source: Hypervisor, destination: Hypervisor) -> str:
        running = []
        for host in (source, destination):
            dom = host.find_domain(row.domain)
            running.append(dom is not None and dom.state() in ACTIVE_STATES)
        return {(True, False): "source", (False, True): "destination", (True, True): "both"}.get(
            (running[0], running[1]), "neither"
        )

    def _policy(self, row: MigrationRow) -> Policy:
        if row.policy_text is None:
            raise OrchestratorError(
                f"migration {row.id} did not journal its policy ({row.policy}): its undrain hooks are "
                "unknown",
                f"run its undrain hooks by hand for the devices shown by: orchestrator history {row.id}",
            )
        return parse_policy(row.policy_text, row.policy)

    def close(self) -> None:
        """Close the connections recovery opened itself."""
        for host in self._opened.values():
            close = getattr(host, "close", None)
            if close is not None:
                close()
        self._opened.clear()

    def _host(self, uri: str) -> Hypervisor:
        if uri in self._given:
            return self._given[uri]
        if uri not in self._opened:
            self._opened[uri] = self.open_host(uri)
        return self._opened[uri]

    @staticmethod
    def _uuid(row: MigrationRow, *hosts: Hypervisor) -> str:
        for host in hosts:
            dom = host.find_domain(row.domain)
            if dom is not None:
                return dom.uuid()
        return f"name:{row.domain}"  # gone from both: the name is all there is to lock on

    def _say(self, line: str) -> None:
        if self.on_line is not None:
            self.on_line(line)


def _wait_gone(pid: int, start: Any, timeout_s: float) -> bool:
    """Wait until the process `pid` (started at `start`, clock ticks) is gone, at most `timeout_s`; True
    if it is. It need not be our child: followed through a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return True  # gone
    try:
        if not procfs.same_process(pid, start):  # checked after opening: the pidfd is this process's
            return True
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout_s))
        return bool(ready) or not procfs.same_process(pid, start)
    finally:
        os.close(fd)


def _outcome(location: str) -> Outcome:
    return {"destination": Outcome.SUCCEEDED, "source": Outcome.ROLLED_BACK}.get(location, Outcome.FAILED)


def open_libvirt_host(uri: str) -> Hypervisor:
    """A libvirt connection (imported here: the rest of recovery is tested without libvirt)."""
    from orchestrator.edges.virt import Host

    return Host.open(uri)


def recover_before(
    journal: Journal, hosts: Sequence[Hypervisor], domain: str, on_line: Callable[[str], None] | None = None
) -> RecoveryReport:
    """The reconciliation `migrate` and `evacuate` run for a VM before migrating it, on hosts already open."""
    recovery = Recovery(journal, open_libvirt_host, on_line=on_line, hosts=hosts)
    try:
        return recovery.run(domain)
    finally:
        recovery.close()
