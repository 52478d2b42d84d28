"""The journal's read side (`history`, `recover`): its SQLite file and the run logs not imported yet,
read as one. A run log still being written, or left by a process that died, reads through the very same
rows (it is imported into an in-memory journal first); it reads as running while its process lives, and
as interrupted once it died (`recover` finishes it).

Migrations recorded by orchestrators before the run log (rows left 'running', or 'interrupted' with no
exit code, by a process that died) are listed by `unfinished` too.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from orchestrator.core.errors import BadInput, OrchestratorError
from orchestrator.core.records import DeviceActionRow, EventRow, HookRunRow, MigrationRecord, MigrationRow
from orchestrator.core.report import Outcome
from orchestrator.edges import procfs, runlog
from orchestrator.edges.journal_db import db_error, journal_path, quick_check
from orchestrator.edges.journal_import import RunRows, in_memory, rows_of

_CANDIDATES_SHOWN: Final = 10
_LEGACY_UNFINISHED: Final = (
    "SELECT * FROM migrations WHERE host = ? AND recovered IS NULL AND exit_code IS NULL "
    "AND outcome IN ('running', 'interrupted') ORDER BY started, id"
)
Select = Callable[[str, tuple[object, ...]], Sequence[sqlite3.Row]]


class JournalReader:
    """Reads the journal at `path` (its file through `conn`, None when there is none yet) and the run
    logs in `runs`; `Journal`'s read methods are these. Thread-safe."""

    def __init__(
        self,
        path: Path,
        runs: Path,
        conn: sqlite3.Connection | None,
        *,
        readonly: bool,
        version: int,
        host: str,
    ) -> None:
        self.path = path
        self.runs = runs
        self.readonly = readonly
        self._version = version  # of the file as read (a read-only journal is not upgraded)
        self._conn = conn
        self._host = host
        self._lock = threading.Lock()
        self._closed = False

    def check(self) -> None:
        """Verify the journal's file (`PRAGMA quick_check(1)`: reads the whole file once); raises the
        one-line EnvironmentProblem naming it and how to move it aside or salvage it."""
        with self._lock:
            if self._conn is None:
                return
            try:
                quick_check(self._conn, self.path)
            except sqlite3.Error as exc:
                raise db_error(self.path, exc, reading=True) from None

    def close(self) -> None:
        """Close the connection (idempotent); reading then raises OrchestratorError."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _select(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._closed:
                raise OrchestratorError(f"the journal {self.path} is closed; it cannot be read")
            if self._conn is None:
                return []
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                if str(exc).startswith("no such table"):
                    return []
                raise db_error(self.path, exc, reading=True) from None

    def _pending(self) -> dict[str, RunRows]:
        """The run logs not imported yet, by migration id: their rows."""
        found = {}
        for path in runlog.pending(self.runs):
            rows = rows_of(runlog.read(path))
            if rows.migration.get("id") == path.stem:
                found[path.stem] = rows
        return found

    @staticmethod
    def _now(rows: RunRows, row: MigrationRow) -> MigrationRow:
        """A run log's migration row as it reads now: running while its process lives, else interrupted
        (its process died; `recover` finishes it)."""
        if rows.finished or row.outcome is not Outcome.RUNNING or procfs.same_process(*rows.owner):
            return row
        pid = rows.owner[0]
        return replace(
            row,
            outcome=Outcome.INTERRUPTED,
            error=f"the orchestrator (process {pid}) died in phase {row.phase}: run orchestrator recover",
        )

    def _read_row(self, rows: RunRows) -> MigrationRow:
        """A run log's migration row as it reads now (`_now`)."""
        with contextlib.closing(in_memory(rows)) as conn:
            return self._now(rows, MigrationRow.of(conn.execute("SELECT * FROM migrations").fetchone()))

    def _legacy(self, row: sqlite3.Row) -> MigrationRow:
        """A migrations row as it reads now: one an older orchestrator left running reads as interrupted
        when its process died."""
        found = MigrationRow.of(row)
        if (
            found.outcome is Outcome.RUNNING
            and found.host == self._host
            and not procfs.same_process(found.pid, None)
        ):
            return replace(found, outcome=Outcome.INTERRUPTED, error="orchestrator process died")
        return found

    def list_migrations(self, limit: int = 50, domain: str | None = None) -> list[MigrationRow]:
        """The latest `limit` migrations, of `domain` if given, newest first (running ones included)."""
        where, params = ("WHERE domain = ? ", (domain,)) if domain is not None else ("", ())
        rows = self._select(
            f"SELECT * FROM migrations {where}ORDER BY started DESC, id DESC LIMIT ?",  # noqa: S608
            (*params, limit),
        )
        found = {row["id"]: self._legacy(row) for row in rows}
        for mid, pending in self._pending().items():
            if domain is None or pending.migration.get("domain") == domain:
                found[mid] = self._read_row(pending)
        return sorted(found.values(), key=lambda r: (r.started, r.id), reverse=True)[:limit]

    def children(self, parent: str) -> list[MigrationRow]:
        """The migrations of an evacuation (its items), in the order they started."""
        rows = self._select("SELECT * FROM migrations WHERE parent = ? ORDER BY started, id", (parent,))
        found = {row["id"]: self._legacy(row) for row in rows}
        for mid, pending in self._pending().items():
            if pending.migration.get("parent") == parent:
                found[mid] = self._read_row(pending)
        return sorted(found.values(), key=lambda r: (r.started, r.id))

    def get_migration(self, id_or_prefix: str) -> MigrationRecord:
        """The migration with this id, or the only one whose id starts with it, with its events, hook
        runs and device actions in sequence order. Raises BadInput if none matches, or several do."""
        pending = self._pending()
        ids = [mid for mid in pending if mid == id_or_prefix] or [
            mid for mid in pending if id_or_prefix and mid.startswith(id_or_prefix)
        ]
        rows = self._select("SELECT id FROM migrations WHERE id = ?", (id_or_prefix,))
        if not rows and id_or_prefix and not (ids and ids[0] == id_or_prefix):
            rows = self._select(
                "SELECT id FROM migrations WHERE substr(id, 1, ?) = ? ORDER BY started DESC LIMIT ?",
                (len(id_or_prefix), id_or_prefix, _CANDIDATES_SHOWN + 1),
            )
        candidates = list(dict.fromkeys([*ids, *(row["id"] for row in rows)]))
        if not candidates:
            missing = " (there is no journal there yet)" if self.readonly and self._conn is None else ""
            raise BadInput(
                f"no migration {id_or_prefix} in {self.path}{missing}",
                f"list them with: orchestrator history --journal '{self.path}'"
                if self.path != journal_path().expanduser().absolute()
                else "list them with: orchestrator history",
            )
        if len(candidates) > 1 and id_or_prefix not in candidates:
            shown = ", ".join(candidates[:_CANDIDATES_SHOWN])
            more = ", ..." if len(candidates) > _CANDIDATES_SHOWN else ""
            raise BadInput(
                f"migration id {id_or_prefix} is ambiguous: it begins {shown}{more}", "give more of the id"
            )
        mid = id_or_prefix if id_or_prefix in candidates else candidates[0]
        if mid in pending:
            with contextlib.closing(in_memory(pending[mid])) as conn:

                def select(sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
                    return conn.execute(sql, params).fetchall()

                migration = MigrationRow.of(select("SELECT * FROM migrations", ())[0])
                return _record(select, mid, self._now(pending[mid], migration))
        found = self._select("SELECT * FROM migrations WHERE id = ?", (mid,))
        return _record(self._select, mid, self._legacy(found[0]))

    def device_actions(self, migration_id: str) -> tuple[DeviceActionRow, ...]:
        """A migration's drain and undrain steps in sequence order (from its run log while it has one)."""
        path = runlog.path_of(self.runs, migration_id)
        if path.exists():
            rows = rows_of(runlog.read(path))
            with contextlib.closing(in_memory(rows)) as conn:  # holds this run log's rows only
                return _actions(
                    lambda sql, params: conn.execute(sql, params).fetchall(), rows.migration["id"]
                )
        return _actions(self._select, migration_id)

    def records(self, migration_id: str) -> list[dict[str, Any]]:
        """The records of a migration's run log (none once it is imported)."""
        return runlog.read(runlog.path_of(self.runs, migration_id))

    def unfinished(self, host: str | None = None) -> list[MigrationRow]:
        """Migrations of `host` (default: this host) whose process died before they ended and that
        `recover` has not finished: run logs without an end, and rows an older orchestrator left. Oldest
        first; a migration whose process (or whoever took it over) still runs is not unfinished."""
        host = self._host if host is None else host
        found = [
            self._read_row(rows)
            for rows in self._pending().values()
            if not rows.finished
            and rows.migration.get("host") == host
            and not procfs.same_process(*rows.owner)
        ]
        query = _LEGACY_UNFINISHED  # a schema-1 journal read as it is has no `recovered`: nothing was
        if self._version < 2:
            query = query.replace("recovered IS NULL AND ", "")
        for row in self._select(query, (host,)):
            legacy = MigrationRow.of(row)
            if not procfs.same_process(legacy.pid, None):
                found.append(replace(legacy, outcome=Outcome.INTERRUPTED))
        return sorted(found, key=lambda r: (r.started, r.id))

    def supervisors(self, migration_id: str) -> list[tuple[int, Any]]:
        """The hook supervisors that recorded into a migration's run log: (pid, start) each."""
        return rows_of(self.records(migration_id)).supervisors


def _actions(select: Select, mid: str) -> tuple[DeviceActionRow, ...]:
    rows = select("SELECT * FROM device_actions WHERE migration_id = ? ORDER BY seq", (mid,))
    return tuple(DeviceActionRow.of(row) for row in rows)


def _record(select: Select, mid: str, migration: MigrationRow) -> MigrationRecord:
    events = select("SELECT * FROM events WHERE migration_id = ? ORDER BY seq", (mid,))
    runs = select("SELECT * FROM hook_runs WHERE migration_id = ? ORDER BY seq", (mid,))
    return MigrationRecord(
        migration,
        tuple(EventRow.of(row) for row in events),
        tuple(HookRunRow.of(row) for row in runs),
        _actions(select, mid),
    )
