"""`orchestrator evacuate`: every running VM moved off a host, several at once."""

from __future__ import annotations

import enum
import sys
from typing import Annotated

import typer

from orchestrator.commands import groundwork
from orchestrator.commands.app import (
    AutoConvergeOpt,
    BandwidthOpt,
    CompMethodsOpt,
    CompressedOpt,
    ConnectOpt,
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
from orchestrator.commands.inputs import job_options, source_uri
from orchestrator.commands.render import (
    emit_json,
    evacuation_failure_line,
    outlast_the_terminal,
    priority,
    show_evacuation,
)
from orchestrator.commands.signals import on_signals


class GroupByChoice(enum.StrEnum):
    """`--group-by`: where switchover groups come from (the policy's `evacuate.group_by`)."""

    METADATA = "metadata"
    NONE = "none"


@app.command("evacuate")
def evacuate_cmd(
    to: Annotated[
        list[str], typer.Option("--to", metavar="URI", help="A destination URI; repeat for several.")
    ],
    connect: ConnectOpt = None,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency",
            "-j",
            metavar="N",
            help="Migrations at once (a switchover group: one per member).",
        ),
    ] = 2,
    per_destination: Annotated[
        int,
        typer.Option(
            "--per-destination",
            metavar="N",
            help="Incoming migrations at once per destination (a switchover group's members ignore it).",
        ),
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
    group_by: Annotated[
        GroupByChoice | None,
        typer.Option(
            "--group-by",
            help="Switchover groups: metadata (running VMs sharing the label that virsh metadata VM --uri "
            "urn:orchestrator:group:1 --key orch --set '<group>NAME</group>' sets, and the policy's "
            "[[evacuate.groups]]) or none (every VM alone) [default: the policy's evacuate.group_by]. A "
            "group moves as one (as migrate-group does: drain gated, once, switchover at once), to one or "
            "more destinations; it starts when a --concurrency slot per member is free (with nothing else "
            "running if it has more members), ignores --per-destination, is never retried, and stays "
            "whole on the source when one of its VMs fits nowhere.",
        ),
    ] = None,
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
        groundwork.start_supervisor()  # forked already by the program's entry; here for in-process callers
    # reads the whole journal while the rest starts up (a dry run does not open it: it writes nothing)
    checked = None if dry_run else groundwork.check_journal(journal)
    from orchestrator.commands.render import LiveEvacuation
    from orchestrator.core.policy import DrainMode, GroupBy
    from orchestrator.edges.locks import lock_dir
    from orchestrator.edges.policy_files import resolve_policy
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
        group_by=GroupBy(group_by.value) if group_by else None,
        job=job_options(
            tls=tls, parallel=parallel, parallel_connections=parallel_connections, comp_methods=comp_methods
        ),
    )
    request.validate()
    outlast_the_terminal()
    live = LiveEvacuation()
    with groundwork.open_journal(journal, checked, writing=not dry_run) as jour:
        evacuation = Evacuation(
            request,
            journal=jour,
            on_status=live.status,
            on_line=live.line,
            lock_dir=None if dry_run else lock_dir(),
            reconcile=None
            if dry_run
            else (lambda hosts, name: groundwork.reconcile(jour, list(hosts), name, live.line)),
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
