"""`orchestrator migrate`: one VM live-migrated, its VFIO devices' workloads drained around the switchover."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.commands import groundwork
from orchestrator.commands.app import (
    AutoConvergeOpt,
    BandwidthOpt,
    CompMethodsOpt,
    CompressedOpt,
    ConnectOpt,
    DomainArg,
    DrainOpt,
    JournalOpt,
    JsonOpt,
    MaxDowntimeOpt,
    ParallelConnectionsOpt,
    ParallelOpt,
    PolicyOpt,
    TimeoutOpt,
    TlsOpt,
    app,
)
from orchestrator.commands.inputs import check_lock_wait, job_options, plain_argument, raise_bad, source_uri
from orchestrator.commands.render import emit_json, info, outlast_the_terminal, priority, show_report
from orchestrator.commands.signals import on_signals


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

    check_lock_wait(lock_wait, "the VM")
    if not dry_run:
        groundwork.start_supervisor()  # forked already by the program's entry; here for in-process callers
    # reads the whole journal while the rest starts up (a dry run does not open it: it writes nothing)
    checked = None if dry_run else groundwork.check_journal(journal)
    from orchestrator.commands.render import LiveMigration, failure_line
    from orchestrator.core.policy import DrainMode
    from orchestrator.core.request import Request
    from orchestrator.edges.locks import lock_dir
    from orchestrator.edges.policy_files import resolve_policy
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
    request = Request(
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
        groundwork.open_journal(journal, checked, writing=not dry_run) as jour,
        open_hosts(request.source_uri, request.destination_uri) as (src, dst),
    ):
        if not dry_run:  # a dry run changes nothing, undrains included
            groundwork.reconcile(jour, [src, dst], domain, info)
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
