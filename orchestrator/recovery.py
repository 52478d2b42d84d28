"""`orchestrator recover`: finish what an orchestrator that died left undone.

A migration journals every drain as "starting" before its hooks start (orchestrator.phases), so
whenever its process died (SIGKILL, OOM, the controller rebooting), the journal says which devices
may still be drained. For each migration of this host whose process is gone and that was never
recovered (`Journal.unfinished`), recovery:

1. asks both hosts whether a libvirt job of the VM is still running (a peer-to-peer migration goes
   on without its client) and waits for it to end (`job="wait"`, bounded) or aborts it (`"abort"`);
2. asks both hosts where the VM runs now;
   (Its records that only its intents file has, see orchestrator.intents, are copied into the
   journal first.)
3. runs the undrain hooks of every device that may still be drained, once, with the policy the
   migration used (its text, as journaled when it began) and the state the device ends in; each
   undrain is journaled as "starting" before its hooks and "done"/"failed" after, under the same
   migration id, and as "spawned" (naming the hook processes) once they all started. An undrain the
   dead process had spawned is not run twice: while one of its hook processes still runs, recovery
   waits for it (to its hooks' timeout, then kills it) and journals the undrain "ended" (its result was
   the dead process's to see). It is run again only when it may not have happened: journaled
   "starting" and no more (the process died before every hook started), or spawned hooks that are
   gone, their result never journaled, or that outlived their timeout. Undrain hooks must therefore
   still be idempotent (re-arming armed peers is), but exactly once is the rule, not the exception;
4. records the true outcome: succeeded when the VM runs on the destination, rolled-back on the
   source, failed (an admin must look) when it runs on neither or both.

The same reconciliation runs, for the VM in question, at the start of `migrate` and `evacuate`.
A migration lock (orchestrator.locks) keeps a recovery and a new migration of the VM apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.convergence import GATE_FLOOR_MS
from orchestrator.errors import ExitCode, OrchestratorError
from orchestrator.hooks import (
    KILL_GRACE_S,
    Hook,
    HookResult,
    HookRunner,
    ProcessToken,
    Trigger,
    kill_tokens,
    wait_gone,
)
from orchestrator.hypervisor import ACTIVE_STATES, Clock, Hypervisor, SystemClock
from orchestrator.journal import DeviceActionRow, Journal, MigrationRow, still_drained, undrains_spawned
from orchestrator.locks import MigrationLock, lock_dir
from orchestrator.policy import Policy, parse_policy
from orchestrator.report import Outcome

JOB_WAIT_S = 300.0  # job="wait": how long to wait for a libvirt job the dead orchestrator left running
_JOB_POLL_S = 0.5
JOB_CHOICES = ("wait", "abort")


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
    awaited: list[str] = field(default_factory=list)  # devices whose undrain the dead process had spawned

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
    """What `orchestrator recover` prints with --json."""

    recovered: list[Recovered] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # could not be recovered now, and why

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
            "exit_code": int(self.exit_code),
        }


HostOpener = Callable[[str], Hypervisor]


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
        locks: Path | None = None,
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
        self.runner = runner or HookRunner(eager=False)  # undrains only, nothing racing: at the first hook
        self.locks = locks if locks is not None else lock_dir(journal.path)
        self.on_line = on_line
        self.clock: Clock = clock or SystemClock()
        self._given = {host.uri: host for host in hosts}  # open already: the caller closes them
        self._opened: dict[str, Hypervisor] = {}
        self._pause = threading.Condition()

    def run(self, domain: str | None = None) -> RecoveryReport:
        """Recover every unfinished migration (of `domain` only, if given), oldest first."""
        report = RecoveryReport()
        for row in self.journal.unfinished():
            if domain is not None and row.domain != domain:
                continue
            try:
                report.recovered.append(self._recover(row))
            except OrchestratorError as exc:
                report.skipped.append({"migration_id": row.id, "domain": row.domain, "error": exc.line()})
                self._say(f"{row.domain}: migration {row.id} not recovered: {exc.line()}")
        return report

    # --- one migration ----------------------------------------------------------------------------
    def _recover(self, row: MigrationRow) -> Recovered:
        source, destination = self._host(row.source_uri), self._host(row.destination_uri)
        uuid = self._uuid(row, source, destination)
        with MigrationLock.acquire(self.locks, row.source_uri, uuid, f"recover-{row.id}", wait_s=5.0):
            self._say(
                f"{row.domain}: recovering migration {row.id} (process {row.pid} died in phase {row.phase})"
            )
            notes = self._settle_job(row, source)
            location = self._location(row, source, destination)
            result = Recovered(row.id, row.domain, _outcome(location).value, location, notes=notes)
            self.journal.adopt_intents(row.id)  # what only its intents file had: into the journal first
            actions = self.journal.device_actions(row.id)
            drained, spawned = still_drained(actions), undrains_spawned(actions)
            if drained:
                policy = self._policy(row)
                for device in drained:
                    if device in spawned and self._awaited(row, policy, spawned[device], result):
                        continue
                    self._undrain(row, policy, device, location, result)
            outcome = _outcome(location)
            done = []
            if result.undrained:
                done.append(f"undrained {', '.join(result.undrained)}")
            if result.awaited:
                done.append(f"waited for the undrain of {', '.join(result.awaited)} it had started")
            what = "; ".join(done) or "nothing was left drained"
            error = (
                f"the orchestrator (process {row.pid}) died in phase {row.phase}; recovered: {what}; "
                f"the VM runs on {location}"
            )
            if result.failed:
                error += f"; the undrain of {', '.join(result.failed)} failed: restore them by hand"
            self.journal.mark_recovered(row.id, outcome, error, time.time(), result.to_json())
            self._say(f"{row.domain}: migration {row.id} {outcome.value} ({what}; the VM runs on {location})")
            return result

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
            self._say(f"{row.domain}: waiting for the libvirt job the dead orchestrator left running")
            note = "waited for the libvirt job that was still running"
        deadline = self.clock.monotonic() + self.job_wait_s
        while dom.job_stats() is not None:
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

    def _awaited(
        self, row: MigrationRow, policy: Policy, spawned: DeviceActionRow, result: Recovered
    ) -> bool:
        """The undrain of a device whose hooks the dead process had all started: True if they ran to
        their end (waited for here while one still runs); False if it must be run again."""
        device, tokens = spawned.device_id, ProcessToken.parse_all(spawned.detail)
        running = [token for token in tokens if token.alive()]
        if not running:
            self._say(
                f"{row.domain}: the undrain of {device} had started, but its hooks are gone and their "
                "result was never journaled: running it again"
            )
            return False
        pids = ", ".join(str(token.pid) for token in running)
        timeout_ms = max((hook.timeout_ms for hook in policy.hooks_for(Trigger.UNDRAIN)), default=0)
        left_s = spawned.at + timeout_ms / 1000 + KILL_GRACE_S - self.clock.time()
        self._say(f"{row.domain}: the undrain of {device} is under way (process {pids}): waiting for it")
        still = wait_gone(running, max(left_s, 0.0))
        if still:
            kill_tokens(still)
            self._say(
                f"{row.domain}: the undrain of {device} outlived its hooks' timeout "
                f"({timeout_ms} ms): killed it; running it again"
            )
            return False
        self.journal.record_device_action(
            row.id,
            device,
            "undrain",
            "ended",
            self.clock.time(),
            f"its hooks (process {pids}) ran to their end after the orchestrator died; their exit "
            "status was its to see",
        )
        result.awaited.append(device)
        self._say(f"{row.domain}: undrain {device}: its hooks ended (started before the orchestrator died)")
        return True

    def _undrain(
        self, row: MigrationRow, policy: Policy, device: str, location: str, result: Recovered
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
        self.journal.record_device_action(row.id, device, "undrain", "starting", self.clock.time(), reason)
        started: list[tuple[int | None, Callable[[], HookResult]]] = []
        for hook in policy.hooks_for(Trigger.UNDRAIN):
            if hook.armed:
                started.append(self._fire_armed(hook, values, device, state))
            else:
                running = self.runner.start(hook, values, device)
                started.append((running.pid, running.wait))
        tokens = " ".join(str(ProcessToken.of(pid)) for pid, _wait in started if pid is not None)
        self.journal.record_device_action(
            row.id, device, "undrain", "spawned", self.clock.time(), f"hook processes {tokens}"
        )
        results = [wait() for _pid, wait in started]
        for hook_result in results:
            self.journal.record_hook(row.id, hook_result.to_json())
        ok = all(r.ok for r in results)
        self.journal.record_device_action(
            row.id, device, "undrain", "done" if ok else "failed", self.clock.time()
        )
        (result.undrained if ok else result.failed).append(device)
        self._say(
            f"{row.domain}: undrain {device}: "
            + ("ok" if ok else "; ".join(r.error or "failed" for r in results))
        )

    def _fire_armed(
        self, hook: Hook, values: dict[str, str], device: str, state: str
    ) -> tuple[int | None, Callable[[], HookResult]]:
        """An armed undrain hook, for one device: arm it and wake it now; its process, and what waits
        for its answer and closes it."""
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

        return armed.pid, wait

    def close(self) -> None:
        """Close the connections recovery opened itself."""
        for host in self._opened.values():
            close = getattr(host, "close", None)
            if close is not None:
                close()
        self._opened.clear()

    # --- helpers ----------------------------------------------------------------------------------
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


def _outcome(location: str) -> Outcome:
    return {"destination": Outcome.SUCCEEDED, "source": Outcome.ROLLED_BACK}.get(location, Outcome.FAILED)


def open_libvirt_host(uri: str) -> Hypervisor:
    """A libvirt connection (imported here: the rest of recovery is tested without libvirt)."""
    from orchestrator.virt import Host

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
