"""`orchestrator recover`: finish what an orchestrator that died left undone."""

from __future__ import annotations

import enum
import math
import sys
from typing import Annotated

import typer

from orchestrator.commands import groundwork
from orchestrator.commands.app import JournalOpt, JsonOpt, app
from orchestrator.commands.inputs import MAX_LOCK_WAIT_S, raise_bad
from orchestrator.commands.render import emit_json, info, outlast_the_terminal, priority, table
from orchestrator.commands.signals import on_signals


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
    from orchestrator.edges.journal import Journal
    from orchestrator.edges.journal_db import journal_path
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
        groundwork.start_supervisor()  # before any thread exists: it runs recover's undrain hooks
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
