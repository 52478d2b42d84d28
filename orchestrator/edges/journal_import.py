"""A run log as the journal's rows: its records converted once (`rows_of`), then written into the
journal's SQLite file in ONE transaction (`import_run_log`), or into an in-memory journal (`in_memory`)
so that a run log not imported yet reads through the very same queries and rows."""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from orchestrator.core.report import Outcome
from orchestrator.edges import runlog
from orchestrator.edges.journal_db import MIGRATION_COLUMNS, connect, require_sqlite, upgrade

_INSERT_MIGRATION: Final = (
    f"INSERT OR REPLACE INTO migrations ({', '.join(MIGRATION_COLUMNS)}) "  # noqa: S608 - constants
    f"VALUES ({', '.join('?' for _ in MIGRATION_COLUMNS)})"
)
_EVENT_FIELDS: Final = ("host", "role", "kind", "name", "device_id", "state", "qemu_time", "received")
_ACTION_FIELDS: Final = ("device_id", "action", "status", "at", "detail")


def _text(value: Any) -> Any:
    """A string SQLite can store (a lone surrogate from an odd event's JSON is replaced)."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _json(value: Any) -> str | None:
    return None if value is None else runlog._encode(value)


@dataclass
class RunRows:
    """A run log's records as the journal's rows (each a tuple of its table's columns, in order; the
    sequence numbers count from 1 in the run log's order)."""

    migration: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    hook_runs: list[tuple[Any, ...]] = field(default_factory=list)
    actions: list[tuple[Any, ...]] = field(default_factory=list)
    owner: tuple[Any, Any] = (None, None)  # the process writing it now: pid, start
    supervisors: list[tuple[int, Any]] = field(default_factory=list)
    finished: bool = False  # an end or a recovered record
    seq: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def rows_of(records: Iterable[Mapping[str, Any]]) -> RunRows:
    """The journal's rows for a run log's records, numbered in their order from 1."""
    rows = RunRows()
    starts: dict[str, Mapping[str, Any]] = {}
    m = rows.migration
    for r in records:
        k, mid = r.get("k"), m.get("id")
        if k == "begin":
            m.update({c: r.get(c) for c in MIGRATION_COLUMNS if c in r})
            m.update(outcome=Outcome.RUNNING.value, phase="pre-flight")
            rows.owner = (r.get("pid"), r.get("pid_start"))
        elif k == "owner":
            rows.owner = (r.get("pid"), r.get("pid_start"))
        elif k == "phase":
            m["phase"] = r.get("phase")
            note = {
                "host": "orchestrator",
                "kind": "note",
                "name": f"phase {r.get('phase')}",
                "received": r.get("at"),
            }
            rows.events.append((mid, rows.next_seq(), *(note.get(c) for c in _EVENT_FIELDS), None))
        elif k == "event":
            rows.events.append(
                (mid, rows.next_seq(), *(r.get(c) for c in _EVENT_FIELDS), _json(r.get("data")))
            )
        elif k == "action":
            rows.actions.append((mid, rows.next_seq(), *(r.get(c) for c in _ACTION_FIELDS)))
        elif k == "hook":
            label = f"{r.get('label')} (armed process)" if r.get("arming") else r.get("label")
            rows.hook_runs.append(_hook_run(mid, rows.next_seq(), {**r, "label": label}, r))
        elif k == "hook-start":
            starts[str(r.get("run"))] = r
        elif k == "hook-end":
            start = starts.pop(str(r.get("run")), {})
            if not start.get("armed"):  # an armed hook's results are the orchestrator's `hook` records
                rows.hook_runs.append(_hook_run(mid, rows.next_seq(), start, r))
        elif k == "summary":
            m["summary"] = _json(r.get("report"))
        elif k == "end":
            m.update({c: r.get(c) for c in ("outcome", "changed", "error", "exit_code", "ended")})
            rows.finished = True
        elif k == "recovered":
            m.update(outcome=r.get("outcome"), error=r.get("error"), recovered=r.get("at"))
            m["ended"] = m.get("ended") or r.get("at")
            if r.get("summary") is not None:
                m["summary"] = _json(r.get("summary"))
            rows.finished = True
        if k in ("begin", "owner") and r.get("supervisor"):
            rows.supervisors.append((r["supervisor"], r.get("supervisor_start")))
    for run in starts.values():  # still running (or its end was never recorded)
        if not run.get("armed"):
            rows.hook_runs.append(_hook_run(mid, rows.next_seq(), run, {}))
    return rows


def _hook_run(mid: Any, seq: int, start: Mapping[str, Any], end: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        mid,
        seq,
        start.get("trigger") or "?",
        start.get("device_id"),
        start.get("label") or "?",
        runlog._encode(list(start.get("argv") or [])),
        start.get("attempt") or 1,
        end.get("started") or start.get("started") or 0.0,
        end.get("ended") or None,
        end.get("duration_ms"),
        end.get("exit_code"),
        int(bool(end.get("timed_out"))),
        end.get("error"),
        end.get("output_tail"),
    )


def _insert(conn: sqlite3.Connection, rows: RunRows, *, merge: bool = False, first_seq: int = 0) -> None:
    """Write a run log's rows (in the caller's transaction), their sequence numbers after `first_seq`.
    A migration imported before is replaced whole; `merge` (recover's records for a migration of an
    older orchestrator, which has no run log of its own) keeps its rows and updates only what the new
    records say."""
    m = {c: _text(v) for c, v in rows.migration.items()}
    mid = m["id"]
    if merge:
        sets = {c: m[c] for c in ("outcome", "error", "ended", "summary", "recovered", "phase") if c in m}
        if sets:
            assignments = ", ".join(f"{c} = coalesce(?, {c})" for c in sets)
            conn.execute(f"UPDATE migrations SET {assignments} WHERE id = ?", (*sets.values(), mid))  # noqa: S608
    else:
        if m.get("changed") is not None:
            m["changed"] = int(bool(m["changed"]))
        conn.execute(_INSERT_MIGRATION, tuple(m.get(c) for c in MIGRATION_COLUMNS))
        for table in ("events", "hook_runs", "device_actions"):
            conn.execute(f"DELETE FROM {table} WHERE migration_id = ?", (mid,))  # noqa: S608 - constants
    for table, values, width in (
        ("events", rows.events, 11),
        ("hook_runs", rows.hook_runs, 14),
        ("device_actions", rows.actions, 7),
    ):
        marks = ", ".join("?" for _ in range(width))
        conn.executemany(
            f"INSERT INTO {table} VALUES ({marks})",  # noqa: S608 - constants
            [(mid, first_seq + row[1], *(_text(v) for v in row[2:])) for row in values],
        )


def in_memory(rows: RunRows) -> sqlite3.Connection:
    """An in-memory journal holding one run log's rows: read with the journal's own queries."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.row_factory = sqlite3.Row
    for statement in upgrade(0):
        conn.execute(statement)
    _insert(conn, rows)
    return conn


def import_run_log(journal: Path, path: Path, rows: RunRows, *, merge: bool = False) -> None:
    """Import the run log at `path` (its `rows`) into the journal's file in one transaction, under a
    lock on the run log's file (another process that imported it meanwhile has removed it: then there
    is nothing to do). `merge`: see `_insert`; recover's rows then go after the migration's own.
    Raises sqlite3.Error, OSError or OrchestratorError; nothing is written then."""
    with open(path, "rb") as handle:  # noqa: PTH123 - a lock on the file while it is imported
        fcntl.flock(handle, fcntl.LOCK_EX)
        if not path.exists():  # another process imported it meanwhile
            return
        require_sqlite(journal)
        with contextlib.closing(connect(journal)) as conn:
            first = 0
            if merge:
                row = conn.execute(
                    "SELECT max(seq) FROM (SELECT seq FROM events WHERE migration_id = ?1 UNION ALL "
                    "SELECT seq FROM hook_runs WHERE migration_id = ?1 UNION ALL "
                    "SELECT seq FROM device_actions WHERE migration_id = ?1)",
                    (path.stem,),
                ).fetchone()
                first = int(row[0] or 0)
            rows.migration.setdefault("id", path.stem)
            conn.execute("BEGIN IMMEDIATE")
            try:
                _insert(conn, rows, merge=merge, first_seq=first)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
