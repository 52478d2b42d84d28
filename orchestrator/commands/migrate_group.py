"""`orchestrator migrate-group`: several VMs migrated as one switchover group, drained once."""

from __future__ import annotations

import math
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
from orchestrator.commands.render import emit_json, outlast_the_terminal, priority, show_group
from orchestrator.commands.signals import on_signals

MAX_GROUP_TIMEOUT_S = 86400.0


def parse_members(members: list[str], to: str | None) -> list[tuple[str, str]]:
    """`DOMAIN[=DESTURI]` arguments as (domain, destination URI) pairs; `to` for those without one."""
    pairs = []
    for text in members:
        domain, sep, dest = text.partition("=")
        plain_argument("a member", domain)
        if not domain.strip():
            raise_bad(f"member {text!r} has no domain name", "give DOMAIN or DOMAIN=DESTURI")
        if sep and not dest.strip():
            raise_bad(
                f"member {text!r} has an empty destination URI", "give DOMAIN=DESTURI, or DOMAIN and --to"
            )
        if not sep:
            if to is None:
                raise_bad(f"member {domain} has no destination", "give --to DESTURI, or DOMAIN=DESTURI")
            dest = to
        plain_argument("the destination URI", dest)
        pairs.append((domain, dest))
    return pairs


def _seconds(option: str, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= MAX_GROUP_TIMEOUT_S):
        raise_bad(
            f"{option} must be a number of seconds above 0, at most {MAX_GROUP_TIMEOUT_S:g}, not {value:g}",
            f"give {option} SECONDS",
        )


@app.command("migrate-group")
def migrate_group_cmd(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="The group's name (in the journal and reports).")
    ],
    members: Annotated[
        list[str],
        typer.Argument(
            metavar="DOMAIN[=DESTURI]...",
            help="The group's VMs (at least two), each to its DESTURI or to --to.",
        ),
    ],
    to: Annotated[
        str | None, typer.Option("--to", metavar="DESTURI", help="The destination of members without one.")
    ] = None,
    connect: ConnectOpt = None,
    policy: PolicyOpt = None,
    bandwidth: BandwidthOpt = None,
    max_downtime: MaxDowntimeOpt = None,
    timeout: TimeoutOpt = None,
    auto_converge: AutoConvergeOpt = None,
    compressed: CompressedOpt = None,
    comp_methods: CompMethodsOpt = None,
    parallel: ParallelOpt = False,
    parallel_connections: ParallelConnectionsOpt = None,
    tls: TlsOpt = False,
    hold_timeout: Annotated[
        float,
        typer.Option(
            "--hold-timeout",
            metavar="SECONDS",
            help="Abort every member when they have not all been ready to switch over at once by then.",
        ),
    ] = 300.0,
    release_timeout: Annotated[
        float,
        typer.Option(
            "--release-timeout",
            metavar="SECONDS",
            help="After the release, abort a member that has not switched over within this.",
        ),
    ] = 30.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Every member's pre-flight and plan; change nothing.")
    ] = False,
    lock_wait: Annotated[
        float,
        typer.Option(
            "--lock-wait", metavar="SECONDS", help="Wait this long for another migration of a member."
        ),
    ] = 0.0,
    journal: JournalOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Live-migrate several VMs as one switchover group: each is held at its gate until every one would
    switch over within its downtime limit; then every device is drained once, every VM released at
    once, and every device undrained once when all run again."""
    plain_argument("the group's name", name)
    if not name.strip():
        raise_bad("the group's name is empty", "give the group a name, e.g. the job the VMs serve")
    pairs = parse_members(members, to)
    _seconds("--hold-timeout", hold_timeout)
    _seconds("--release-timeout", release_timeout)
    check_lock_wait(lock_wait, "a member")
    if not dry_run:
        groundwork.start_supervisor()
    checked = None if dry_run else groundwork.check_journal(journal)
    from orchestrator.commands.render import LiveEvacuation
    from orchestrator.core.policy import DrainMode
    from orchestrator.core.request import Request
    from orchestrator.edges.locks import lock_dir
    from orchestrator.edges.policy_files import resolve_policy
    from orchestrator.edges.virt import Host
    from orchestrator.flows.group import GroupMigration, GroupOptions

    chosen = resolve_policy(policy)
    settings = chosen.migration.overridden(
        bandwidth_mib=bandwidth,
        max_downtime_ms=max_downtime,
        completion_timeout_s=timeout,
        compressed=compressed,
        auto_converge=auto_converge,
    )
    job = job_options(
        tls=tls, parallel=parallel, parallel_connections=parallel_connections, comp_methods=comp_methods
    )
    source = source_uri(connect)
    requests = []
    for domain, dest in pairs:
        if dest == source:
            raise_bad(
                f"{domain}: source and destination are the same URI ({dest})", "give a different destination"
            )
        requests.append(
            Request(
                domain=domain,
                source_uri=source,
                destination_uri=dest,
                policy=chosen,
                settings=settings,
                drain=DrainMode.GATED,
                dry_run=dry_run,
                job=job,
            )
        )
    outlast_the_terminal()
    live = LiveEvacuation()
    with groundwork.open_journal(journal, checked, writing=not dry_run) as jour:
        group = GroupMigration(
            name,
            requests,
            Host.open,
            GroupOptions(hold_timeout_s=hold_timeout, release_timeout_s=release_timeout),
            journal=jour,
            on_line=live.line,
            lock_dir=None if dry_run else lock_dir(),
            lock_wait_s=lock_wait,
            dry_run=dry_run,
        )
        if not dry_run:
            with Host.open(source) as src:
                for request in requests:
                    with Host.open(request.destination_uri) as dst:
                        groundwork.reconcile(jour, [src, dst], request.domain, live.line)
        signals = on_signals(group.interrupt, group.hung_up)
        try:
            report = group.run()
        finally:
            signals.ended()
            live.close()
    if as_json:
        emit_json(report.to_json())
    else:
        show_group(report)
    if report.exit_code:
        sys.stderr.write(
            f"{priority(3)}orchestrator: error: group {name} {report.outcome.value}: {report.error}\n"
        )
        raise SystemExit(int(report.exit_code))
