"""The `orchestrator` command line: parse, call, render. No logic of its own.

Commands import what they need when they run, so that `--help` stays fast (Ansible calls often).
Start-up cost (measured by bench/startup.py) is kept down three ways:

- help is plain Click text (`rich_markup_mode=None`): Typer's rich help imports rich, rich.markdown
  and markdown_it, ~50 ms, for every `--help`;
- the help flags of the groups default to False (HELP_DEFAULTS): when absent, their value is then
  already a bool, so Typer does not build a Pydantic adapter to coerce it; that import (pydantic,
  pydantic_core, typer._adapters) is another ~50 ms of every `orchestrator COMMAND --help`;
- json is imported when a command prints JSON, not at start.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from orchestrator.commands import cli_values
from orchestrator.commands.render import (
    emit_json,
    evacuation_failure_line,
    info,
    outlast_the_terminal,
    priority,
    show_evacuation,
    show_record,
    show_report,
    table,
    time_text,
)
from orchestrator.core.errors import ExitCode, NothingToDo, OrchestratorError

# Click's default_map for a group's context: its own help flag is False unless given (see above).
HELP_DEFAULTS: dict[str, Any] = {"help": False}

cli_values.install()  # option values without Pydantic: ~70 ms less start-up per command

app = typer.Typer(
    name="orchestrator",
    help="Live migration of VMs with VFIO devices: drains dependent RDMA workloads on QEMU's VFIO events.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"], "default_map": HELP_DEFAULTS},
)
lab_app = typer.Typer(
    help="A lab of libvirt hosts on this machine, with simulated VFIO devices.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"default_map": HELP_DEFAULTS},
)
app.add_typer(lab_app, name="lab")
events_app = typer.Typer(
    help="Turn QEMU's VFIO migration events on or off in a domain's definition.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"default_map": HELP_DEFAULTS},
)
app.add_typer(events_app, name="events")

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of tables.")]
LabDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--lab-dir",
        envvar="ORCH_LAB_DIR",
        metavar="PATH",
        help="Lab directory [default: /var/lib/orchestrator/lab].",
    ),
]


class EventsMode(enum.StrEnum):
    """`events enable --mode`: how the property gets into the definition."""

    OVERRIDE = "override"
    GLOBAL = "global"


class DrainChoice(enum.StrEnum):
    """`--drain`: when to drain (the policy's `switchover.drain`)."""

    PREPARE = "prepare"
    GATED = "gated"
    START = "start"


class QemuBehaviour(enum.StrEnum):
    """`lab guest --qemu-behaviour`: which QEMU's event sequence the simulated devices follow."""

    V11_0 = "11.0"
    V10_0 = "10.0"
    V11_0_EVENT = "11.0-event"  # QEMU's first design: the prepare as VFIO_MIGRATION_PREPARE


def package_version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("vfio-migration-orchestrator")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        from orchestrator import __version__

        return __version__


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"orchestrator {package_version()}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_show_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Options of `orchestrator` itself (the help text is the app's)."""


# --- lab ---------------------------------------------------------------------------------------


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option("--hosts", "-n", metavar="N", help="How many hosts (1-8).")] = 2,
    lab_dir: LabDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start lab hosts (each its own libvirtd); harmless when already up."""
    from orchestrator.lab import hosts as lab

    started = lab.up(hosts, lab_dir)
    if as_json:
        emit_json([{"name": h.name, "uri": h.uri, "running": h.running} for h in started])
        return
    table(["HOST", "URI"], [[h.name, h.uri] for h in started])


@lab_app.command("status")
def lab_status(lab_dir: LabDirOpt = None, as_json: JsonOpt = False) -> None:
    """Show lab hosts and their guests."""
    from orchestrator.lab import hosts as lab

    found = lab.status(lab_dir)
    if as_json:
        emit_json(
            [
                {
                    "name": h.name,
                    "uri": h.uri,
                    "running": h.running,
                    "libvirtd_pid": h.pid("libvirtd"),
                    "guests": [
                        {"name": g.name, "state": g.state, "persistent": g.persistent} for g in h.guests
                    ],
                }
                for h in found
            ]
        )
        return
    if not found:
        info(f"no lab hosts; start them with: {lab.lab_command('up', lab_dir)}")
        return
    rows = []
    for h in found:
        guests = ", ".join(f"{g.name} ({g.state})" for g in h.guests) or "-"
        rows.append([h.name, "up" if h.running else "down", str(h.pid("libvirtd") or "-"), guests, h.uri])
    table(["HOST", "STATE", "PID", "GUESTS", "URI"], rows)


@lab_app.command("down")
def lab_down(lab_dir: LabDirOpt = None, as_json: JsonOpt = False) -> None:
    """Destroy the lab's guests and stop the daemons it started."""
    from orchestrator.lab import hosts as lab

    stopped = lab.down(lab_dir)
    if as_json:
        emit_json({"stopped": stopped})
    else:
        info(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@lab_app.command("guest")
def lab_guest(
    name: Annotated[str, typer.Argument(metavar="DOMAIN", help="Guest (domain) name.")],
    host: Annotated[
        str, typer.Option("--host", metavar="HOST", help="Lab host to define it on, e.g. lab-a.")
    ],
    devices: Annotated[
        int, typer.Option("--devices", metavar="N", help="Simulated VFIO devices (ids nic0, nic1, ...).")
    ] = 1,
    qemu_behaviour: Annotated[
        QemuBehaviour,
        typer.Option(
            "--qemu-behaviour", help="11.0 (emits pre-copy-p2p-prepare) or 10.0 (no prepare state)."
        ),
    ] = QemuBehaviour.V11_0,
    precopy: Annotated[bool, typer.Option("--precopy/--no-precopy", help="Devices support precopy.")] = True,
    p2p: Annotated[bool, typer.Option("--p2p/--no-p2p", help="Devices support the P2P states.")] = True,
    transition_ms: Annotated[
        int, typer.Option("--transition-ms", metavar="MS", help="Duration of the transition into P2P.")
    ] = 300,
    fail_transition: Annotated[
        str | None,
        typer.Option(
            "--fail-transition",
            metavar="STATE",
            help="Make the P2P transition fail into this state (e.g. running).",
        ),
    ] = None,
    events: Annotated[
        bool, typer.Option("--events/--no-events", help="Add -global vfio-pci.migration-events=on.")
    ] = True,
    memory: Annotated[
        int | None,
        typer.Option("--memory", metavar="MIB", help="Guest memory in MiB [default: 64 idle, 128 dirty]."),
    ] = None,
    workload: Annotated[
        str,
        typer.Option(
            "--workload",
            metavar="idle|dirty",
            help="idle: firmware only, converges at any downtime limit; dirty: a Linux guest "
            "rewriting memory at --dirty-rate, so pre-copy iterates as with a loaded VM.",
        ),
    ] = "idle",
    dirty_rate: Annotated[
        float,
        typer.Option("--dirty-rate", metavar="MIB_S", help="dirty: MiB of memory rewritten per second."),
    ] = 64.0,
    dirty_mib: Annotated[
        int, typer.Option("--dirty-mib", metavar="SIZE", help="dirty: MiB of memory it cycles through.")
    ] = 4,
    disk_mib: Annotated[
        int,
        typer.Option(
            "--disk-mib",
            metavar="MIB",
            help="A qcow2 disk (vda) of this size, local to the host: "
            "/var/lib/libvirt/images/DOMAIN.qcow2 in its own images directory [default: no disk].",
        ),
    ] = 0,
    start: Annotated[bool, typer.Option("--start/--no-start", help="Start it after defining it.")] = True,
    lab_dir: LabDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Define and start a tiny TCG guest with simulated VFIO devices on a lab host."""
    from orchestrator.lab import guest as lab_guest_mod
    from orchestrator.lab import hosts as lab

    if memory is not None and memory <= 0:  # to GuestSpec, 0 means "the workload's default"
        raise_bad(f"--memory must be 16 to 4096 MiB, not {memory}", "pick another size")
    spec = lab_guest_mod.GuestSpec(
        name=name,
        devices=devices,
        behaviour=qemu_behaviour.value,
        precopy=precopy,
        p2p=p2p,
        transition_ms=transition_ms,
        fail_transition=fail_transition,
        events=events,
        memory_mib=memory if memory is not None else 0,  # 0: the workload's default
        workload=workload,
        dirty_rate=dirty_rate,
        dirty_mib=dirty_mib,
        disk_mib=disk_mib,
    )
    target = lab.host_by_name(host, lab_dir)
    ready_s = lab_guest_mod.create_guest(target, spec, start=start, root=lab_dir).ready_s
    if as_json:
        report: dict[str, object] = {
            "name": name,
            "host": target.name,
            "uri": target.uri,
            "devices": spec.device_ids,
        }
        if disk_mib:
            report["disk"] = {
                "target": lab_guest_mod.DISK_TARGET,
                "path": str(spec.disk),
                "file": str(lab_guest_mod.host_disk_file(target, name)),
                "mib": disk_mib,
            }
        if workload != "idle":
            report.update(
                workload=workload,
                memory_mib=spec.memory_mib,
                dirty_rate_mib_s=dirty_rate,
                dirty_mib=dirty_mib,
                console_log=str(lab_guest_mod.console_log(name, lab_dir)),
                ready_s=ready_s,
            )
        emit_json(report)
    else:
        devices_text = ", ".join(spec.device_ids) or "none"
        info(f"{name} {'running' if start else 'defined'} on {target.name} with devices: {devices_text}")
        if disk_mib:
            info(
                f"disk {lab_guest_mod.DISK_TARGET}: {disk_mib} MiB qcow2 {spec.disk} "
                f"(on this machine {lab_guest_mod.host_disk_file(target, name)})"
            )
        if workload != "idle":
            ready = f", ready after {ready_s:.1f} s" if ready_s is not None else ""
            info(
                f"workload {workload}: {dirty_rate:g} MiB/s over {dirty_mib} MiB{ready}; "
                f"console log {lab_guest_mod.console_log(name, lab_dir)}"
            )


@lab_app.command("peer")
def lab_peer(
    domain: Annotated[
        str, typer.Argument(metavar="DOMAIN", help="The guest whose device the peer talks to.")
    ],
    device: Annotated[str, typer.Option("--device", metavar="ID", help="Device id.")] = "nic0",
    interval_ms: Annotated[
        float, typer.Option("--interval-ms", metavar="MS", help="Request every this many ms.")
    ] = 5.0,
    timeout_ms: Annotated[
        float, typer.Option("--timeout-ms", metavar="MS", help="The peers' RDMA timeout.")
    ] = 30.0,
    duration: Annotated[
        float | None, typer.Option("--duration", metavar="SECONDS", help="Stop after this many seconds.")
    ] = None,
    lab_dir: LabDirOpt = None,
) -> None:
    """Stand in for a device's RDMA peers: probe it, count timeouts while armed; JSON report at the end.

    The rdma-drain policy's hooks (orchestrator-rdma-hook) disarm and re-arm it.
    """
    from orchestrator.lab import peer

    if interval_ms <= 0 or timeout_ms <= 0:
        raise_bad("--interval-ms and --timeout-ms must be > 0", "give positive numbers")
    if lab_dir is not None:
        os.environ["ORCH_LAB_DIR"] = str(lab_dir)
    stats = peer.serve(domain, device, interval_ms, timeout_ms, duration)
    emit_json(stats.to_json())


@lab_app.command("demo")
def lab_demo(
    lab_dir: LabDirOpt = None,
    name: Annotated[str, typer.Option("--name", metavar="DOMAIN", help="Guest name.")] = "demo",
) -> None:
    """Bring up two hosts and live-migrate a guest with simulated VFIO devices back and forth,
    printing every VFIO event seen on both hosts."""
    from orchestrator.lab import demo

    demo.run(name, lab_dir, out=sys.stdout)


# --- migrate ---------------------------------------------------------------------------------

ConnectOpt = Annotated[
    str | None,
    typer.Option(
        "--connect",
        "-c",
        envvar="LIBVIRT_DEFAULT_URI",
        metavar="URI",
        help="Source libvirt URI [default: qemu:///system].",
    ),
]
JournalOpt = Annotated[
    Path | None,
    typer.Option(
        "--journal",
        envvar="ORCH_JOURNAL",
        metavar="PATH",
        help="Journal file [default: /var/lib/orchestrator/journal.sqlite].",
    ),
]
PolicyOpt = Annotated[
    str | None,
    typer.Option(
        "--policy", "-p", help="Policy name (from /etc/orchestrator/policies, then the shipped ones) or path."
    ),
]


def source_uri(uri: str | None) -> str:
    """The source URI as virsh would pick it (an empty $LIBVIRT_DEFAULT_URI counts as unset).

    An explicit empty one (`-c ''`, or an empty SOURCE_URI in the systemd unit's env file) is bad
    input, not the default: silently acting on qemu:///system instead could empty the wrong host.
    """
    if uri is None:
        return "qemu:///system"
    if not uri.strip():
        raise_bad("the source URI (-c/--connect) is empty", "give a libvirt URI, e.g. -c 'qemu:///system'")
    plain_argument("the source URI (-c/--connect)", uri)
    return uri


DrainOpt = Annotated[
    DrainChoice | None,
    typer.Option(
        "--drain",
        help="When to drain: prepare (on the device's prepare event), gated (hold the switchover until "
        "every device is drained) or start (before the job) [default: the policy's].",
    ),
]
MaxDowntimeOpt = Annotated[
    int | None,
    typer.Option(
        "--max-downtime", metavar="MS", help="The most downtime QEMU may use; caps the policy's steps."
    ),
]
BandwidthOpt = Annotated[int | None, typer.Option("--bandwidth", metavar="MIB/S", help="Bandwidth limit.")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", metavar="SECONDS", help="Abort a job that runs longer than this."),
]
AutoConvergeOpt = Annotated[
    bool | None, typer.Option("--auto-converge", help="Throttle the vCPUs of a guest that does not converge.")
]
CompressedOpt = Annotated[bool | None, typer.Option("--compressed", help="Compress the migration data.")]
CompMethodsOpt = Annotated[
    str | None,
    typer.Option(
        "--comp-methods", metavar="LIST", help="Compression methods, comma-separated: mt,xbzrle,zlib,zstd."
    ),
]
ParallelOpt = Annotated[bool, typer.Option("--parallel", help="Several connections for the data (multifd).")]
ParallelConnectionsOpt = Annotated[
    int | None, typer.Option("--parallel-connections", metavar="N", help="How many (implies --parallel).")
]
TlsOpt = Annotated[bool, typer.Option("--tls", help="Encrypt the migration data with TLS.")]


def job_options(
    *,
    tls: bool,
    parallel: bool,
    parallel_connections: int | None,
    comp_methods: str | None,
    copy_storage_all: bool = False,
    migrate_disks: str | None = None,
    disks_uri: str | None = None,
    dname: str | None = None,
    xml: Path | None = None,
) -> Any:
    """The per-run options of the libvirt job (migration.JobOptions), checked."""
    from orchestrator.flows.migration import JobOptions

    dest_xml = None
    if xml is not None:
        try:
            dest_xml = xml.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise_bad(f"cannot read --xml {xml}: {exc}", "give a readable domain XML file")
    options = JobOptions(
        tls=tls,
        parallel_connections=parallel_connections or (2 if parallel else None),
        compression_methods=tuple(m.strip() for m in comp_methods.split(",")) if comp_methods else (),
        copy_storage_all=copy_storage_all,
        migrate_disks=tuple(d.strip() for d in migrate_disks.split(",")) if migrate_disks else (),
        dest_name=dname,
        dest_xml=dest_xml,
        disks_uri=disks_uri,
    )
    options.validate()
    return options


def complete_domain(ctx: typer.Context, incomplete: str) -> list[str]:
    """The shell's completion of a DOMAIN: the domains of the -c URI (else $LIBVIRT_DEFAULT_URI, else
    qemu:///system), where that is cheap: a daemon of this machine (a URI without a host), read-only.
    Nothing on a remote URI (an ssh connection per Tab) or any failure."""
    from urllib.parse import urlsplit

    uri = ctx.params.get("connect") or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
    if urlsplit(uri).hostname:
        return []
    try:
        from orchestrator.edges.virt import domain_names
    except ImportError:  # no libvirt-python: no names
        return []
    return [name for name in domain_names(uri) if name.startswith(incomplete)]


DomainArg = Annotated[
    str, typer.Argument(metavar="DOMAIN", help="Domain name or UUID.", autocompletion=complete_domain)
]


@app.command("migrate")
def migrate_cmd(
    domain: DomainArg,
    dest_uri: Annotated[str, typer.Argument(metavar="DESTURI", help="Destination libvirt URI.")],
    connect: ConnectOpt = None,
    policy: PolicyOpt = None,
    drain: DrainOpt = None,
    p2p: Annotated[
        bool | None,
        typer.Option("--p2p/--direct", help="Peer-to-peer or client-driven [default: the policy's]."),
    ] = None,
    persistent: Annotated[
        bool | None, typer.Option("--persistent/--no-persistent", help="Define the VM on the destination.")
    ] = None,
    undefinesource: Annotated[
        bool | None,
        typer.Option("--undefinesource/--keep-source", help="Undefine the VM on the source after success."),
    ] = None,
    migrateuri: Annotated[
        str | None,
        typer.Option(
            "--migrateuri", metavar="URI", help="Migration data URI (tcp://HOST:PORT, unix:///PATH)."
        ),
    ] = None,
    listen_address: Annotated[
        str | None,
        typer.Option(
            "--listen-address", metavar="ADDRESS", help="Address the destination listens on for the data."
        ),
    ] = None,
    bandwidth: BandwidthOpt = None,
    max_downtime: MaxDowntimeOpt = None,
    timeout: TimeoutOpt = None,
    auto_converge: AutoConvergeOpt = None,
    compressed: CompressedOpt = None,
    comp_methods: CompMethodsOpt = None,
    parallel: ParallelOpt = False,
    parallel_connections: ParallelConnectionsOpt = None,
    tls: TlsOpt = False,
    copy_storage_all: Annotated[
        bool, typer.Option("--copy-storage-all", help="Copy the VM's non-shared disks too.")
    ] = False,
    migrate_disks: Annotated[
        str | None,
        typer.Option("--migrate-disks", metavar="LIST", help="Copy only these disks (targets: vda,vdb)."),
    ] = None,
    disks_uri: Annotated[
        str | None,
        typer.Option(
            "--disks-uri",
            metavar="URI",
            help="Where the destination takes the disks' copy (tcp://HOST:PORT or unix:///PATH); "
            "needed with a unix:// --migrateuri.",
        ),
    ] = None,
    dname: Annotated[
        str | None, typer.Option("--dname", metavar="NAME", help="The domain's name on the destination.")
    ] = None,
    xml: Annotated[
        Path | None, typer.Option("--xml", metavar="FILE", help="The domain XML for the destination.")
    ] = None,
    postcopy: Annotated[bool, typer.Option("--postcopy", help="Refused: VFIO forbids post-copy.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Pre-flight and print the plan; change nothing.")
    ] = False,
    lock_wait: Annotated[
        float,
        typer.Option(
            "--lock-wait",
            metavar="SECONDS",
            help="When another migration of DOMAIN runs, wait this long for it instead of failing at once.",
        ),
    ] = 0.0,
    journal: JournalOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Live-migrate DOMAIN to DESTURI, draining the workloads of its VFIO devices around the switchover."""
    for what, text in (("the domain name", domain), ("the destination URI", dest_uri), ("--dname", dname)):
        plain_argument(what, text)
    if not dest_uri.strip():
        raise_bad("the destination URI is empty", "give a libvirt URI, e.g. 'qemu+ssh://HOST/system'")

    if not (math.isfinite(lock_wait) and 0 <= lock_wait <= MAX_LOCK_WAIT_S):
        raise_bad(
            f"--lock-wait must be a number of seconds from 0 to {MAX_LOCK_WAIT_S:g}, not {lock_wait:g}",
            "give how long to wait for another migration of the VM",
        )
    if not dry_run:
        start_supervisor()  # forked already by the program's entry; here for in-process callers
    # reads the whole journal while the rest starts up (a dry run does not open it: it writes nothing)
    checked = None if dry_run else check_journal(journal)
    from orchestrator.commands.render import LiveMigration, failure_line
    from orchestrator.core.policy import DrainMode, resolve_policy
    from orchestrator.edges.locks import lock_dir
    from orchestrator.edges.virt import open_hosts
    from orchestrator.flows import migration as mig

    chosen = resolve_policy(policy)
    settings = chosen.migration.overridden(
        p2p=p2p,
        persist=persistent,
        undefine_source=undefinesource,
        data_uri=migrateuri,
        bandwidth_mib=bandwidth,
        max_downtime_ms=max_downtime,
        completion_timeout_s=timeout,
        compressed=compressed,
        auto_converge=auto_converge,
    )
    request = mig.Request(
        domain=domain,
        source_uri=source_uri(connect),
        destination_uri=dest_uri,
        policy=chosen,
        settings=settings,
        drain=DrainMode(drain.value) if drain else None,
        listen_address=listen_address,
        postcopy=postcopy,
        dry_run=dry_run,
        job=job_options(
            tls=tls,
            parallel=parallel,
            parallel_connections=parallel_connections,
            comp_methods=comp_methods,
            copy_storage_all=copy_storage_all,
            migrate_disks=migrate_disks,
            disks_uri=disks_uri,
            dname=dname,
            xml=xml,
        ),
    )
    if request.source_uri == request.destination_uri:
        raise_bad(f"source and destination are the same URI ({dest_uri})", "give a different destination")
    outlast_the_terminal()
    live = LiveMigration()
    with (
        open_journal(journal, checked, writing=not dry_run) as jour,
        open_hosts(request.source_uri, request.destination_uri) as (src, dst),
    ):
        if not dry_run:  # a dry run changes nothing, undrains included
            reconcile(jour, [src, dst], domain, info)
        migration = mig.Migration(
            request,
            src,
            dst,
            journal=jour,
            on_progress=live.progress,
            on_entry=live.entry,
            on_plan=live.plan,
            lock_dir=None if dry_run else lock_dir(),
            lock_wait_s=lock_wait,
        )
        # until the report is out and the journal closed
        signals = on_signals(migration.interrupt, migration.hung_up)
        try:
            report = migration.run()
        finally:
            signals.ended()  # the migration has ended: later signals are recorded and ignored
            live.close()
    if as_json:
        emit_json(report.to_json())
    else:
        show_report(report)
    line = failure_line(report, None if journal is None else str(journal))
    if line is not None:
        sys.stderr.write(f"{priority(3)}orchestrator: error: {line}\n")
    if report.exit_code:
        raise SystemExit(int(report.exit_code))


class SignalGuard:
    """SIGINT, SIGTERM and SIGHUP from `on_signals` to the exit of the `orchestrator` process (ignored from
    the end of the command on: Python puts the default action back for its shutdown, and a signal then
    would turn exit 130 into death by SIGTERM); when the CLI runs in another program (tests), to the
    end of the command (the click context's close: after its report is printed and its journal
    closed, on every path). Each signal is recorded in `received`, then:

    - while the work runs, handed to the handler, on a thread of its own (it takes locks that the
      interrupted main thread may hold) that the signal wakes at once (`signal.set_wakeup_fd`): Python
      runs a signal's handler in the main thread only, after the call it is in returns, and a libvirt
      call can last as long as QEMU's monitor is busy (1.5 s during a device's P2P transition, which
      is exactly when an abort must land); with no handler, the first one raises KeyboardInterrupt in
      the main thread, as Ctrl-C does by default (exit 130);
    - once `ended()`, only recorded: a storm of signals never kills the process (the default action)
      before its report is written, its devices undrained and its journal closed;
    - SIGHUP only ever recorded (and `on_hangup` told): the migration runs in libvirt anyway, so it is
      finished, undrained and recorded; the terminal's streams are `render.Outlasting`.
    """

    def __init__(
        self, handler: Callable[[str], None] | None, on_hangup: Callable[[], None] | None = None
    ) -> None:
        import signal

        self.received: list[str] = []
        self._handler = handler
        self._on_hangup = on_hangup
        self._running = True
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        self._wakeup: tuple[int, int] | None = None  # (its write end, the previous wakeup fd)
        if handler is not None:
            self._follow_wakeups()

    def _follow_wakeups(self) -> None:
        """Dispatch each SIGINT/SIGTERM from a thread that the signal itself wakes."""
        import _thread
        import signal

        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        try:
            previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: the main thread's handler dispatches, later
            os.close(read_end)
            os.close(write_end)
            return
        self._wakeup = (write_end, previous)
        _thread.start_new_thread(self._follow, (read_end,))

    def _follow(self, read_end: int) -> None:
        import signal

        try:
            while data := os.read(read_end, 64):  # one byte per signal received; EOF: restored
                for signum in data:
                    if signum == signal.SIGHUP and self._running and self._on_hangup is not None:
                        try:
                            self._on_hangup()
                        except Exception as exc:  # a bug: one line, and the run goes on
                            sys.stderr.write(f"orchestrator: error: handling SIGHUP failed: {exc!r}\n")
                    elif signum in (signal.SIGINT, signal.SIGTERM) and self._running and self._handler:
                        name = signal.Signals(signum).name
                        try:
                            self._handler(name)
                        except Exception as exc:  # a bug: one line, and the next signal still counts
                            sys.stderr.write(f"orchestrator: error: handling {name} failed: {exc!r}\n")
        finally:
            os.close(read_end)

    def ended(self) -> None:
        """The work is over: from now on signals are recorded and ignored."""
        self._running = False

    def restore(self) -> None:
        """Put the previous handlers back (the command is over)."""
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if self._wakeup is not None:
            write_end, previous_fd = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous_fd)
            os.close(write_end)  # the following thread reads EOF and ends

    def ignore_to_exit(self) -> None:
        """The command is over and the process only exits now: ignore the signals to the end."""
        import signal

        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, _frame: object) -> None:
        import _thread
        import signal

        name = signal.Signals(signum).name
        self.received.append(name)
        if not self._running or signum == signal.SIGHUP:  # a hang-up never stops the work
            return
        if self._handler is not None:
            if self._wakeup is None:  # else the wakeup's thread has dispatched it already
                _thread.start_new_thread(self._handler, (name,))
            return
        self._running = False
        raise KeyboardInterrupt(name)


def on_signals(
    handler: Callable[[str], None] | None, on_hangup: Callable[[], None] | None = None
) -> SignalGuard:
    """Guard SIGINT, SIGTERM and SIGHUP until the command ends (see `SignalGuard`): `handler(signal name)`
    stops the work, or, None, the first SIGINT/SIGTERM raises KeyboardInterrupt; SIGHUP (the terminal
    hung up: the admin's ssh session died) never stops it, `on_hangup` is told."""
    guard = SignalGuard(handler, on_hangup)
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - depends on the installed Typer
        from click import get_current_context  # type: ignore[no-redef,import-not-found,unused-ignore]
    context = get_current_context(silent=True)
    if context is not None:  # else (outside a command) the caller restores
        # The `orchestrator` program itself (console script, `python -m orchestrator`) exits when
        # the command ends; a program running the CLI in-process gets its own handlers back.
        from orchestrator import entry as program

        ours = getattr(sys.modules.get("__main__"), "main", None) in (main, program.main)
        context.call_on_close(guard.ignore_to_exit if ours else guard.restore)
    return guard


MAX_LOCK_WAIT_S = 86400.0  # a day: longer than any migration a run could wait for


def start_supervisor() -> None:
    """Fork the hook supervisor now, unless the program's entry has (orchestrator.entry): a command that
    may run hooks calls it first, before any thread of its own exists."""
    from orchestrator.edges import supervisor

    supervisor.shared()


def plain_argument(what: str, text: str | None) -> None:
    """Refuse an argument with a control character (a newline would split our one-line messages and
    forge log lines; no domain name or URI has one), before anything is opened."""
    if text is not None and any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise_bad(f"{what} {text[:200]!r} contains a control character", "give it without one")


def raise_bad(message: str, hint: str) -> NoReturn:
    """Raise the BadInput error for a CLI option."""
    from orchestrator.core.errors import BadInput

    raise BadInput(message, hint)


def check_journal(path: Path | None) -> Callable[[], bool]:
    """Start verifying the journal now, in the background (see journal.check_in_background), for
    `open_journal`: call first thing in a command, so that reading the whole file overlaps the imports."""
    from orchestrator.edges.journal import journal_path
    from orchestrator.edges.journal_db import check_in_background

    return check_in_background(journal_path(path))


@contextlib.contextmanager
def open_journal(
    path: Path | None, checked: Callable[[], bool] | None = None, *, writing: bool = True
) -> Any:
    """The journal, verified before anything changes (by `checked`, started with `check_journal`, if
    given), closed on the way out; None when not `writing` (a dry run, Ansible's check mode, writes
    nothing, the journal included: not even a new journal file)."""
    from orchestrator.edges.journal import Journal, journal_path

    if not writing:
        yield None
        return
    verified = checked is not None and checked()  # raises for a damaged journal
    jour = Journal.open(journal_path(path), check=not verified)
    try:
        yield jour
    finally:
        jour.close()


def reconcile(jour: Any, hosts: list[Any], domain: str, say: Callable[[str], None]) -> None:
    """Finish what a dead orchestrator left undone for this VM, before migrating it again; refuse to
    migrate it when that needs an admin."""
    if not any(row.domain == domain for row in jour.unfinished()):
        return  # the usual case: nothing to finish, and nothing of recover's to import
    from orchestrator.core.errors import OrchestratorError as Refused
    from orchestrator.flows.recovery import recover_before

    report = recover_before(jour, hosts, domain, on_line=say)
    if int(report.exit_code):
        problem = report.skipped[0]["error"] if report.skipped else "an undrain failed"
        raise Refused(
            f"an earlier migration of {domain} was not finished and could not be recovered: {problem}",
            "fix that, then run: orchestrator recover (or see: orchestrator history)",
            ExitCode.NEEDS_ADMIN,
        )


# --- recover ---------------------------------------------------------------------------------


class JobChoice(enum.StrEnum):
    """`recover --job`: what to do with a libvirt job a dead orchestrator left running."""

    WAIT = "wait"
    ABORT = "abort"


@app.command("recover")
def recover_cmd(
    domain: Annotated[
        str | None, typer.Option("--domain", "-d", metavar="DOMAIN", help="Only this domain's migrations.")
    ] = None,
    job: Annotated[
        JobChoice,
        typer.Option(
            "--job",
            help="A libvirt job the dead orchestrator left running: wait for it to end, or abort it "
            "(a job held at the gate is always aborted: nothing else would release it).",
        ),
    ] = JobChoice.WAIT,
    job_wait: Annotated[
        float, typer.Option("--job-wait", metavar="SECONDS", help="How long to wait for such a job.")
    ] = 300.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what it would do (asking both hosts); do nothing.")
    ] = False,
    journal: JournalOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Finish what an orchestrator that died left undone: undrain what it drained (once, with the policy
    it used), and record where each VM runs. Safe to run any time; systemd runs it before evacuations."""
    from orchestrator.edges.journal import Journal, journal_path
    from orchestrator.flows.recovery import Recovery, open_libvirt_host

    if not (math.isfinite(job_wait) and 0 < job_wait <= MAX_LOCK_WAIT_S):
        raise_bad(
            f"--job-wait must be a number of seconds above 0 and at most {MAX_LOCK_WAIT_S:g}, "
            f"not {job_wait:g}",
            "give how long to wait for a libvirt job a dead orchestrator left running",
        )
    path = journal_path(journal)
    if not path.exists():
        info(f"nothing to recover: no journal at {path}")
        if as_json:
            emit_json({"recovered": [], "skipped": [], "exit_code": 0})
        return
    if not dry_run:
        start_supervisor()  # before any thread exists: it runs recover's undrain hooks
    outlast_the_terminal()
    with Journal.open(path, check=True) as jour:
        unfinished = [row for row in jour.unfinished() if domain is None or row.domain == domain]
        if unfinished and not dry_run:  # how it will go, before it may wait for minutes
            jobs = (
                "aborted"
                if job is JobChoice.ABORT
                else f"waited for (at most {job_wait:g} s; --job abort aborts them)"
            )
            info(
                f"recover: {len(unfinished)} unfinished migration(s); libvirt jobs they left running are "
                f"{jobs}, a job held at the gate is aborted; --dry-run shows what would be done"
            )
        recovery = Recovery(jour, open_libvirt_host, job=job.value, job_wait_s=job_wait, on_line=info)
        # The first signal stops it as Ctrl-C does; later ones cannot cut its close or the journal's.
        signals = on_signals(None)
        try:
            report = recovery.run(domain, dry_run=dry_run)
        finally:
            signals.ended()
            recovery.close()
    if as_json:
        emit_json(report.to_json())
    elif report.recovered or report.skipped:
        if report.dry_run:
            info("dry run: nothing was done; the table says what recover would do")
        table(
            [
                "MIGRATION",
                "DOMAIN",
                "OUTCOME",
                "RUNS ON",
                "WOULD UNDRAIN" if report.dry_run else "UNDRAINED",
                "FAILED",
            ],
            [
                [
                    r.migration_id,
                    r.domain,
                    r.outcome,
                    r.location,
                    # awaited: the dead run's own undrain hooks finished it; recover waited for them
                    ", ".join([*r.undrained, *(f"{d} (awaited)" for d in r.awaited)]) or "-",
                    ", ".join(r.failed) or "-",
                ]
                for r in report.recovered
            ]
            + [
                [s["migration_id"], s["domain"], "not recovered", "-", "-", s["error"]]
                for s in report.skipped
            ],
        )
    else:
        info("nothing to recover: every migration in the journal finished")
    if report.exit_code:
        failed = sum(len(r.failed) for r in report.recovered)
        sys.stderr.write(
            f"{priority(3)}orchestrator: error: {len(report.skipped)} migration(s) could not be recovered "
            f"and {failed} undrain(s) failed; see the table, fix them, then run: orchestrator recover\n"
        )
        raise SystemExit(int(report.exit_code))


# --- evacuate --------------------------------------------------------------------------------


@app.command("evacuate")
def evacuate_cmd(
    to: Annotated[
        list[str], typer.Option("--to", metavar="URI", help="A destination URI; repeat for several.")
    ],
    connect: ConnectOpt = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-j", metavar="N", help="Migrations at once.")
    ] = 2,
    per_destination: Annotated[
        int,
        typer.Option("--per-destination", metavar="N", help="Incoming migrations at once per destination."),
    ] = 2,
    include: Annotated[
        list[str] | None, typer.Option("--include", metavar="GLOB", help="Only VMs matching this glob.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Not the VMs matching this glob.")
    ] = None,
    policy: PolicyOpt = None,
    drain: DrainOpt = None,
    bandwidth: BandwidthOpt = None,
    max_downtime: MaxDowntimeOpt = None,
    timeout: TimeoutOpt = None,
    auto_converge: AutoConvergeOpt = None,
    compressed: CompressedOpt = None,
    comp_methods: CompMethodsOpt = None,
    parallel: ParallelOpt = False,
    parallel_connections: ParallelConnectionsOpt = None,
    tls: TlsOpt = False,
    inactive: Annotated[
        bool, typer.Option("--inactive", help="Also move persistent shut-off VMs (by definition only).")
    ] = False,
    reserve: Annotated[
        int, typer.Option("--reserve", metavar="MIB", help="MiB to keep free on every destination.")
    ] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Move what fits even if some VMs fit nowhere.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan and run each VM's pre-flight; move nothing.")
    ] = False,
    journal: JournalOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move every running VM off the source host (-c) to the --to hosts; exit 0 when it is empty."""
    if not dry_run:
        start_supervisor()  # forked already by the program's entry; here for in-process callers
    # reads the whole journal while the rest starts up (a dry run does not open it: it writes nothing)
    checked = None if dry_run else check_journal(journal)
    from orchestrator.commands.render import LiveEvacuation
    from orchestrator.core.policy import DrainMode, resolve_policy
    from orchestrator.edges.locks import lock_dir
    from orchestrator.flows.evacuation import Evacuation, EvacuationRequest

    chosen = resolve_policy(policy)
    request = EvacuationRequest(
        source_uri=source_uri(connect),
        destination_uris=tuple(to),
        policy=chosen,
        concurrency=concurrency,
        per_destination=per_destination,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        inactive=inactive,
        force=force,
        reserve_mib=reserve,
        dry_run=dry_run,
        settings=chosen.migration.overridden(
            bandwidth_mib=bandwidth,
            max_downtime_ms=max_downtime,
            completion_timeout_s=timeout,
            compressed=compressed,
            auto_converge=auto_converge,
        ),
        drain=DrainMode(drain.value) if drain else None,
        job=job_options(
            tls=tls, parallel=parallel, parallel_connections=parallel_connections, comp_methods=comp_methods
        ),
    )
    request.validate()
    outlast_the_terminal()
    live = LiveEvacuation()
    with open_journal(journal, checked, writing=not dry_run) as jour:
        evacuation = Evacuation(
            request,
            journal=jour,
            on_status=live.status,
            on_line=live.line,
            lock_dir=None if dry_run else lock_dir(),
            reconcile=None
            if dry_run
            else (lambda hosts, name: reconcile(jour, list(hosts), name, live.line)),
        )
        signals = on_signals(lambda _name: evacuation.stop())  # until the report is out, the journal closed
        try:
            report = evacuation.run()
        finally:
            signals.ended()  # later signals are recorded and ignored
            live.close()
    if as_json:
        emit_json(report.to_json())
    else:
        show_evacuation(report)
    if report.exit_code:
        sys.stderr.write(f"{priority(3)}orchestrator: error: {evacuation_failure_line(report)}\n")
        raise SystemExit(int(report.exit_code))


# --- events ----------------------------------------------------------------------------------


def yes_no(value: bool | None) -> str:
    """A table cell for a tri-state."""
    return "-" if value is None else ("yes" if value else "no")


@events_app.command("status")
def events_status_cmd(
    domain: DomainArg,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One row per VFIO device: events on in the definition and in the running VM, and what QEMU knows."""
    from orchestrator.edges.virt import Host
    from orchestrator.flows import events

    with Host.open(source_uri(connect)) as host:
        report = events.status(host, domain)
    if as_json:
        emit_json(report.to_json())
        return
    sys.stdout.write(
        f"{report.domain} ({report.state}) on {report.uri}\n"
        f"libvirt {report.libvirt_version}, QEMU {report.qemu_version}; modes: {', '.join(report.modes)}\n"
        f"running QEMU knows VFIO_MIGRATION: {yes_no(report.qemu_knows_event)}, "
        f"pre-copy-p2p-prepare: {yes_no(report.qemu_knows_prepare)}\n"
        f"-global vfio-pci.migration-events=on: defined {yes_no(report.global_defined)}, "
        f"running {yes_no(report.global_running)}\n\n"
    )
    if not report.devices:
        raise events.no_vfio_device(report.domain)
    table(
        ["ALIAS", "KIND", "HOST ADDRESS", "EVENTS DEFINED", "EVENTS RUNNING"],
        [
            [d.alias or "-", d.kind, d.host_address or "-", yes_no(d.defined_on), yes_no(d.running_on)]
            for d in report.devices
        ],
    )


def _events_change(
    domain: str, connect: str | None, *, enable: bool, mode: str | None, dry_run: bool, as_json: bool
) -> None:
    from orchestrator.edges.virt import Host
    from orchestrator.flows import events

    with Host.open(source_uri(connect)) as host:
        report = events.change(host, domain, enable=enable, mode=mode, dry_run=dry_run)
    if as_json:
        emit_json(report.to_json())
        return
    if dry_run and report.diff:
        sys.stdout.write(report.diff)
    info(report.message)


@events_app.command("enable")
def events_enable_cmd(
    domain: DomainArg,
    mode: Annotated[
        EventsMode | None,
        typer.Option(
            "--mode",
            help="override: a <qemu:override> per device (libvirt >= 8.2, the default there); "
            "global: -global vfio-pci.migration-events=on (also reaches command-line devices).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the unified diff; write nothing.")
    ] = False,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make every VFIO device of DOMAIN emit migration events (from its next cold boot)."""
    chosen = None if mode is None else mode.value
    _events_change(domain, connect, enable=True, mode=chosen, dry_run=dry_run, as_json=as_json)


@events_app.command("disable")
def events_disable_cmd(
    domain: DomainArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the unified diff; write nothing.")
    ] = False,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove exactly what `events enable` added to DOMAIN's definition."""
    _events_change(domain, connect, enable=False, mode=None, dry_run=dry_run, as_json=as_json)


# --- watch -----------------------------------------------------------------------------------


@app.command("watch")
def watch_cmd(
    connect: Annotated[
        list[str] | None,
        typer.Option(
            "--connect",
            "-c",
            metavar="URI",
            help="A host's libvirt URI; repeat for several, each is watched once "
            "[default: $LIBVIRT_DEFAULT_URI, else qemu:///system].",
        ),
    ] = None,
    domain: Annotated[
        str | None,
        typer.Option("--domain", "-d", metavar="DOMAIN", help="Only this domain (it may not exist yet)."),
    ] = None,
) -> None:
    """Relay every VFIO_MIGRATION event from the given hosts as NDJSON on stdout, until Ctrl-C.

    A host unreachable at the start is reported and retried every few seconds while the others are
    watched; a host that goes away is reported. Exit 3 when no host can be reached.
    """
    from orchestrator.flows import watch

    default: list[str | None] = [os.environ.get("LIBVIRT_DEFAULT_URI") or None]
    watch.run([source_uri(uri) for uri in connect or default], domain, out=sys.stdout, log=info)


# --- history ---------------------------------------------------------------------------------


@app.command("history")
def history_cmd(
    migration_id: Annotated[
        str | None, typer.Argument(metavar="ID", help="A migration id (or unique prefix) to show.")
    ] = None,
    domain: Annotated[
        str | None,
        typer.Option("--domain", "-d", metavar="DOMAIN", help="Only this domain's migrations."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", metavar="N", help="How many migrations to list.")] = 50,
    journal: JournalOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List recorded migrations, or show one's timeline."""
    from orchestrator.edges.journal import Journal, journal_path

    # Read-only: a missing journal is "no migrations recorded", and nothing is created or marked.
    jour = Journal.open_readonly(journal_path(journal))
    try:
        if migration_id is None:
            rows = jour.list_migrations(limit=limit, domain=domain)
            if as_json:
                emit_json([row.to_json() for row in rows])
                return
            if not rows:
                info("no migrations recorded")
                return
            table(
                ["ID", "KIND", "STARTED", "DOMAIN", "OUTCOME", "SECONDS", "DESTINATION"],
                [
                    [
                        row.id,
                        # An evacuation's VMs show its id: `history EVACUATION_ID` lists them together.
                        f"item of {row.parent}" if row.parent else row.kind.value,
                        time_text(row.started),
                        row.domain,
                        row.outcome or "running",
                        f"{row.ended - row.started:.2f}" if row.ended else "-",
                        row.destination_uri,
                    ]
                    for row in rows
                ],
            )
            return
        record = jour.get_migration(migration_id)
        items = jour.children(record.migration.id)
        if as_json:
            emit_json({**record.to_json(), "items": [row.to_json() for row in items]})
            return
        show_record(record, items)
    finally:
        jour.close()


# --- entry point -----------------------------------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr and the exit code; never a traceback."""
    sys.stderr.write(f"{priority(3)}orchestrator: error: {message}\n")
    raise SystemExit(code)


def _click_exceptions() -> Any:
    """Click's exception classes: Typer >= 0.22 vendors Click, older Typer depends on it."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - depends on the installed Typer
        from click import exceptions  # type: ignore[no-redef,import-not-found,unused-ignore]
    return exceptions


def _in_our_words(exc: Any) -> None:
    """Typer converts option values with Pydantic, whose wording ("Input should be a valid integer,
    unable to parse string as an integer", "Value error, ...") is not ours: say what was wrong with
    the value given, in the CLI's words. Leaves any other error as it is."""
    cause = exc.__cause__
    if type(cause).__name__ != "ValidationError" or not hasattr(exc, "message"):
        return
    try:
        error = cause.errors()[0]
    except (AttributeError, IndexError, TypeError):  # pragma: no cover - another Pydantic
        return
    kind = str(error.get("type", ""))
    value = error.get("input")
    limits = error.get("ctx") or {}
    given = repr(value) if isinstance(value, str) else str(value)
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("more than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind.startswith("int_"):
        exc.message = f"{given} is not a whole number"
    elif kind.startswith(("float_", "decimal_")):
        exc.message = f"{given} is not a number"
    elif kind in bounds:
        words, key = bounds[kind]
        exc.message = f"must be {words} {limits.get(key)}, not {given}"
    elif kind == "value_error":
        exc.message = str(error.get("msg", "")).removeprefix("Value error, ").rstrip(".")
    elif kind.startswith("bool_"):
        exc.message = f"{given} is not a yes/no value (true, false, 1, 0, yes, no)"


def _command_for(argv: Sequence[str]) -> Any:
    """The Click command tree, built for the command being run only.

    Typer builds the Click command of every function in the app (~12 ms of each start); when the
    first argument names a command or group, a copy of the app holding just that one is built
    instead (Click's "lazily loading subcommands"): the same command, options, help and errors.
    Anything else (options first, no or an unknown command) gets the whole tree.
    """
    first = argv[0] if argv else ""
    if first and not first.startswith("-"):
        commands = [info for info in app.registered_commands if info.name == first]
        groups = [info for info in app.registered_groups if info.name == first]
        if len(commands) + len(groups) == 1:
            one = copy.copy(app)
            one.registered_commands, one.registered_groups = commands, groups
            return typer.main.get_command(one)
    return typer.main.get_command(app)


def entry() -> NoReturn:
    """The `orchestrator` program: `main`, then leave without the interpreter's ~14 ms teardown.

    Only once nothing is left to finish: stdout and stderr flushed, and no thread but daemon ones
    (libvirt's event loop) still running; otherwise the normal exit, which waits for them.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # output piped into a closed reader: nothing more to say
        pass
    except OSError:
        raise SystemExit(code) from None
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning every failure into one line and a documented exit code."""
    command = _command_for(sys.argv[1:] if argv is None else argv)
    click_exc = _click_exceptions()
    try:
        code = command.main(args=argv, prog_name="orchestrator", standalone_mode=False)
    except NothingToDo as exc:
        # Not an error (exit 6 is a success for the systemd unit and Ansible): a notice.
        sys.stderr.write(f"{priority(5)}orchestrator: nothing to do: {exc.line()}\n")
        raise SystemExit(int(exc.code)) from None
    except OrchestratorError as exc:
        fail(exc.line(), int(exc.code))
    except (KeyboardInterrupt, typer.Abort):
        fail("interrupted", ExitCode.INTERRUPTED)
    except click_exc.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            # A bare group: its help on stdout, like `--help`. (Typer's rich help printed it itself
            # while building this error, leaving the message empty.)
            help_text = exc.format_message()
            if help_text:
                sys.stdout.write(help_text.rstrip("\n") + "\n")
            raise SystemExit(ExitCode.OK) from None
        _in_our_words(exc)
        hint = f"; see: {exc.ctx.command_path} --help" if exc.ctx else ""
        fail(f"{exc.format_message().rstrip('.')}{hint}", ExitCode.BAD_INPUT)
    except click_exc.ClickException as exc:
        fail(exc.format_message(), ExitCode.BAD_INPUT)
    except BrokenPipeError:
        # Output piped into a closed reader (e.g. `| head`): quietly stop.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(ExitCode.OK) from None
    except Exception as exc:
        if os.environ.get("ORCH_DEBUG"):
            raise
        fail(
            f"internal error: {exc!r} (set ORCH_DEBUG=1 for a traceback, and please report it)",
            ExitCode.ERROR,
        )
    if code == ExitCode.INTERRUPTED:
        # Typer turns a KeyboardInterrupt (Ctrl-C, or a signal a command made one) into exit 130, which
        # it returns instead of raising when not standalone: that was an exit 0 without a word.
        fail("interrupted", ExitCode.INTERRUPTED)
