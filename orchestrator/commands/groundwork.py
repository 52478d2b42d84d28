"""The groundwork of a command that changes hosts: the hook supervisor forked first, the journal verified
while the rest starts up and then opened, and what a dead run left undone for a VM finished before it
moves again."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.core.errors import ExitCode


def start_supervisor() -> None:
    """Fork the hook supervisor now, unless the program's entry has (orchestrator.entry): a command that
    may run hooks calls it first, before any thread of its own exists."""
    from orchestrator.edges import supervisor

    supervisor.shared()


def check_journal(path: Path | None) -> Callable[[], bool]:
    """Start verifying the journal now, in the background (see journal_db.check_in_background), for
    `open_journal`: call first thing in a command, so that reading the whole file overlaps the imports."""
    from orchestrator.edges.journal_db import check_in_background, journal_path

    return check_in_background(journal_path(path))


@contextlib.contextmanager
def open_journal(
    path: Path | None, checked: Callable[[], bool] | None = None, *, writing: bool = True
) -> Any:
    """The journal, verified before anything changes (by `checked`, started with `check_journal`, if
    given), closed on the way out; None when not `writing` (a dry run, Ansible's check mode, writes
    nothing, the journal included: not even a new journal file)."""
    from orchestrator.edges.journal import Journal
    from orchestrator.edges.journal_db import journal_path

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
