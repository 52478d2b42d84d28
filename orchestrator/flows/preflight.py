"""A migration's pre-flight: the request checked against both hosts before anything changes, and the
VM's lock it takes (one migration per VM per host at a time), held until the run has ended.

A refusal is a `BadInput` (or the lock's `MigrationBusy`) with its one-line fix; nothing has been
changed on either host by then.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.core import domxml
from orchestrator.core.errors import BadInput, shell_uri
from orchestrator.core.hypervisor import ACTIVE_STATES, GONE, SHUT_OFF, Guest, Hypervisor
from orchestrator.core.phases import MigrationMachine
from orchestrator.core.policy import MigrationMode, WhenEventsOff
from orchestrator.core.report import Outcome, Report
from orchestrator.core.request import Request, plan_lines, same_machine
from orchestrator.edges.hook_runner import preflight

if TYPE_CHECKING:
    from orchestrator.edges.locks import MigrationLock


class PreFlight:
    """The checks before one migration, and the VM's lock they take."""

    def __init__(
        self,
        request: Request,
        source: Hypervisor,
        destination: Hypervisor,
        migration_id: str,
        *,
        lock_dir: Path | None = None,
        lock_wait_s: float = 0.0,
    ) -> None:
        self.request = request
        self.source = source
        self.destination = destination
        self.id = migration_id
        self.lock_dir = lock_dir  # None: no lock (a caller that serialises migrations itself, tests)
        self.lock_wait_s = lock_wait_s
        self._vm_lock: MigrationLock | None = None

    def release(self) -> None:
        """The run has ended: release the VM's lock, if it was taken."""
        if self._vm_lock is not None:
            self._vm_lock.release()

    def check(self, report: Report, machine: MigrationMachine) -> Guest | None:
        """Check the request against both hosts; None when there is nothing to do (already there).
        Writes the plan (and a refusal's or a dry run's outcome) into `report`; tells `machine` the
        covered devices."""
        request = self.request
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
        devices, events_note = self._check_events(dom, report, machine)
        machine.learn_devices(devices)
        report.plan = plan_lines(request, devices, events_note)
        if request.dry_run:
            report.outcome = Outcome.PLANNED
        return dom

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

    def _check_events(self, dom: Guest, report: Report, machine: MigrationMachine) -> tuple[list[str], str]:
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
            machine.disable_hooks()
            note = f"events off for {', '.join(off)}: migrating WITHOUT device hooks (policy says proceed)"
            report.notes.append(note)
            return names, note
        if status.global_on:
            note = "events: -global vfio-pci.migration-events=on (every vfio-pci device emits)"
        elif covered:
            note = "events: on for every covered device"
        else:
            note = "events: no VFIO hostdev in the XML; any device that emits is followed"
        return names, note
