"""What the user asked of a migration: the request, the libvirt job's per-run options and their checks,
the values a hook's placeholders take, and the plan, in words (for --dry-run and the report). Pure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from orchestrator.core.convergence import GATE_FLOOR_MS, Schedule
from orchestrator.core.errors import BadInput
from orchestrator.core.hooks import Trigger
from orchestrator.core.policy import DrainMode, MigrationMode, MigrationSettings, Policy, Switchover

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


def placeholder_values(
    request: Request,
    migration_id: str,
    device: str = "",
    qom_path: str = "",
    state: str = "",
    group: tuple[str, str, str] = ("", "", ""),
) -> dict[str, str]:
    """The values of a hook's placeholders (orchestrator.core.hooks.PLACEHOLDERS) for one run; `group`:
    a switchover group's name, id and members (comma-separated)."""
    return {
        "domain": request.domain,
        "device_id": device,
        "qom_path": qom_path,
        "state": state,
        "migration_id": migration_id,
        "source": request.source_uri,
        "destination": request.destination_uri,
        "group": group[0],
        "group_id": group[1],
        "members": group[2],
        "devices": "",
    }


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
