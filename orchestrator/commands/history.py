"""`orchestrator history`: the recorded migrations, or one's timeline, read from the journal."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.commands.app import JournalOpt, JsonOpt, app
from orchestrator.commands.render import emit_json, info, show_record, table, time_text


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
    from orchestrator.edges.journal import Journal
    from orchestrator.edges.journal_db import journal_path

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
                        # An evacuation's VMs and a group's members show its id: `history ID` lists them.
                        f"{'member' if row.kind.value == 'group-member' else 'item'} of {row.parent}"
                        if row.parent
                        else row.kind.value,
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
