"""The journal: every migration's record, kept in SQLite once it has ended.

While a migration runs, its truth is its run log (orchestrator.edges.runlog): each record is one write() on
the thread that acts, and the hook supervisor adds each hook's start and end. No writer thread, no
SQLite on the way to a hook. When the migration ends, its run log is imported into the journal in ONE
transaction and removed; a run log that could not be imported then (the journal locked, damaged,
replaced, or its disk full) stays whole on disk and is imported by the next open of the journal, or
by `recover`, which also finishes the run logs of migrations whose process died (`unfinished`).

Reads (`history`) see the journal and the run logs not imported yet: a migration still running, or
one whose process died and that `recover` has not finished, reads from its run log through the very
same rows (it is imported into an in-memory database first). `Journal.open_readonly` creates and
writes nothing; it refuses, without letting SQLite touch it, a file that is not a journal.

Migrations recorded by orchestrators before the run log (rows left 'running', or 'interrupted' with no
exit code, by a process that died) are listed by `unfinished` too; `recover` finishes them from their
device actions, and its records are added after theirs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from orchestrator.core.errors import BadInput, EnvironmentProblem, OrchestratorError
from orchestrator.core.records import (
    ActionStatus,
    DeviceAction,
    DeviceActionRow,
    EventKind,
    EventRow,
    HookRunRow,
    MigrationKind,
    MigrationRecord,
    MigrationRow,
)
from orchestrator.core.report import Outcome
from orchestrator.edges import procfs, runlog
from orchestrator.edges.journal_db import (
    ENV_VAR,
    PATH_HINT,
    connect,
    connect_existing,
    create_schema,
    db_error,
    quick_check,
    require_sqlite,
    upgrade,
)
from orchestrator.edges.runlog import RunLog

DEFAULT_PATH: Final = Path("/var/lib/orchestrator/journal.sqlite")
_CANDIDATES_SHOWN: Final = 10
_VITAL: Final = frozenset({"begin", "action", "hook", "hook-end", "end", "recovered", "owner"})
_MIGRATION_COLUMNS: Final = tuple(
    [
        "id",
        "kind",
        "domain",
        "source_uri",
        "destination_uri",
        "policy",
        "started",
        "ended",
        "outcome",
        "changed",
        "error",
        "exit_code",
        "summary",
        "parent",
        "pid",
        "host",
        "drain_mode",
        "policy_text",
        "policy_sha256",
        "phase",
        "recovered",
    ]
)
_BEGIN_FIELDS: Final = tuple("id kind domain source_uri destination_uri policy started parent".split())  # noqa: SIM905
_INSERT_MIGRATION: Final = (
    f"INSERT OR REPLACE INTO migrations ({', '.join(_MIGRATION_COLUMNS)}) "  # noqa: S608 - constants
    f"VALUES ({', '.join('?' for _ in _MIGRATION_COLUMNS)})"
)
_EVENT_FIELDS: Final = ("host", "role", "kind", "name", "device_id", "state", "qemu_time", "received")
_ACTION_FIELDS: Final = ("device_id", "action", "status", "at", "detail")
_LEGACY_UNFINISHED: Final = (
    "SELECT * FROM migrations WHERE host = ? AND recovered IS NULL AND exit_code IS NULL "
    "AND outcome IN ('running', 'interrupted') ORDER BY started, id"
)


def journal_path(explicit: Path | None = None) -> Path:
    """The journal to use: `explicit` if given, else $ORCH_JOURNAL if set, else DEFAULT_PATH."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(ENV_VAR)
    return Path(from_env) if from_env else DEFAULT_PATH


def _text(value: Any) -> Any:
    """A string SQLite can store (a lone surrogate from an odd event's JSON is replaced)."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _json(value: Any) -> str | None:
    return None if value is None else runlog._encode(value)


def _alive(pid: Any, start: Any) -> bool:
    """Whether the process `pid`, started at `start` (clock ticks after boot), still runs here."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    found = procfs.proc(pid)
    return found is not None and not found.dead and (start is None or found.start == start)


@dataclass
class _Rows:
    """A run log's records as the journal's rows (each a tuple of its table's columns, in order)."""

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


def rows_of(records: Iterable[Mapping[str, Any]], first_seq: int = 0) -> _Rows:
    """The journal's rows for a run log's records, numbered in their order from `first_seq` + 1."""
    rows = _Rows(seq=first_seq)
    starts: dict[str, Mapping[str, Any]] = {}
    m = rows.migration
    for r in records:
        k, mid = r.get("k"), m.get("id")
        if k == "begin":
            m.update({c: r.get(c) for c in _MIGRATION_COLUMNS if c in r})
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


def _insert(conn: sqlite3.Connection, rows: _Rows, *, merge: bool = False) -> None:
    """Write a run log's rows (in the caller's transaction). A migration imported before is replaced
    whole; `merge` (recover's records for a migration of an older orchestrator, which has no run log of
    its own) keeps its rows and updates only what the new records say."""
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
        conn.execute(_INSERT_MIGRATION, tuple(m.get(c) for c in _MIGRATION_COLUMNS))
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
            [(mid, *(_text(v) for v in row[1:])) for row in values],
        )


def _memory(rows: _Rows) -> sqlite3.Connection:
    """An in-memory journal holding one run log's rows: read with the journal's own queries."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.row_factory = sqlite3.Row
    for statement in upgrade(0):
        conn.execute(statement)
    _insert(conn, rows)
    return conn


class Journal:
    """The journal of migrations. Open with `Journal.open(path)` (or `Journal.open_readonly(path)` to
    read only); use as a context manager or `close()`. Thread-safe."""

    def __init__(self, path: Path, reader: sqlite3.Connection | None, *, readonly: bool) -> None:
        """Use `Journal.open` or `Journal.open_readonly`."""
        self.path = path
        self.runs = runlog.directory_of(path)
        self.readonly = readonly
        self._reader = reader
        self._lock = threading.Lock()
        self._logs: dict[str, RunLog] = {}
        self._merge: set[str] = set()  # migrations of an older orchestrator that recover writes for
        self._failures: list[str] = []
        self._closed = False
        self._version = 3  # of the file as read (a read-only journal is not upgraded)
        self._pid = os.getpid()
        me = procfs.proc(self._pid)
        self._pid_start = me.start if me is not None else None
        self._host = os.uname().nodename  # = socket.gethostname()

    @classmethod
    def open(cls, path: Path, *, check: bool = False) -> Journal:
        """Open (creating if needed) the journal at `path`, and import the run logs of migrations that
        ended but were not imported. With `check`, first verify the file (`quick_check`): what is about
        to change the world opens so, and learns of a damaged journal before anything happens.

        Raises BadInput or EnvironmentProblem, in one line naming the path and the cause."""
        path = path.expanduser().absolute()
        if path.is_dir():
            raise BadInput(f"cannot use {path} as the journal: it is a directory", PATH_HINT)
        reader = None
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            require_sqlite(path)
            with contextlib.closing(connect(path)) as writer:
                create_schema(writer, path)
            reader = connect_existing(path)
            if check:
                quick_check(reader, path)
        except (sqlite3.Error, OSError) as exc:
            if reader is not None:
                reader.close()
            raise db_error(path, exc) from None
        except OrchestratorError:
            if reader is not None:
                reader.close()
            raise
        journal = cls(path, reader, readonly=False)
        journal.import_finished()
        return journal

    @classmethod
    def open_readonly(cls, path: Path) -> Journal:
        """Open the journal at `path` for reading only: nothing is created and nothing is written. A
        missing journal reads as one without migrations (but for run logs not imported yet)."""
        path = path.expanduser().absolute()
        if path.is_dir():
            raise BadInput(f"cannot use {path} as the journal: it is a directory", PATH_HINT)
        if not path.exists() or path.stat().st_size == 0:
            return cls(path, None, readonly=True)
        reader = None
        try:
            reader = connect_existing(path)
            version = reader.execute("PRAGMA user_version").fetchone()[0]
            if version < 1:  # SQLite reads a damaged header as an empty database: only an intact one is
                quick_check(reader, path)
        except (sqlite3.Error, OSError) as exc:
            if reader is not None:
                reader.close()
            raise db_error(path, exc, reading=True) from None
        except OrchestratorError:
            if reader is not None:
                reader.close()
            raise
        if version > 3:
            reader.close()
            raise EnvironmentProblem(
                f"the journal {path} has schema version {version}, newer than this orchestrator's 3",
                f"upgrade the orchestrator or {PATH_HINT}",
            )
        if version < 1:
            reader.close()
            reader = None
        journal = cls(path, reader, readonly=True)
        journal._version = version
        return journal

    def check(self) -> None:
        """Verify the journal's file (`PRAGMA quick_check(1)`: reads the whole file once); raises the
        one-line EnvironmentProblem naming it and how to move it aside or salvage it."""
        with self._lock:
            if self._reader is None:
                return
            try:
                quick_check(self._reader, self.path)
            except sqlite3.Error as exc:
                raise db_error(self.path, exc, reading=True) from None

    @property
    def failures(self) -> list[str]:
        """Every record that could not be written or imported, one line each, oldest first."""
        with self._lock:
            return list(self._failures)

    def _failed(self, line: str) -> None:
        with self._lock:
            if line not in self._failures:
                self._failures.append(line)

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    # --- writing: into the run log ----------------------------------------------------------------
    def begin_migration(
        self,
        id: str,
        kind: MigrationKind | str,
        domain: str,
        source_uri: str,
        destination_uri: str,
        policy: str,
        started: float,
        parent: str | None = None,
        *,
        drain_mode: str = "prepare",
        policy_text: str | None = None,
        policy_sha256: str | None = None,
        supervisor: int | None = None,
    ) -> None:
        """Start the migration's run log, its room reserved, with its first record. Raises
        EnvironmentProblem (nothing written) when the room cannot be reserved."""
        if self.readonly or self._closed:
            raise OrchestratorError(f"the journal {self.path} is not open for writing")
        values = (id, MigrationKind(kind).value, domain, source_uri, destination_uri, policy, started, parent)
        record = {"k": "begin", **dict(zip(_BEGIN_FIELDS, values, strict=True)), "host": self._host}
        record |= {"pid": self._pid, "pid_start": self._pid_start, "drain_mode": drain_mode}
        record |= {"policy_text": policy_text, "policy_sha256": policy_sha256, **self._supervisor(supervisor)}
        log = RunLog.create(self.runs, id)
        if not log.write(record, vital=True):  # a run log without its begin would be read by nobody
            log.remove()
            raise EnvironmentProblem(f"{log.failed}; nothing was changed", "check the disk the journal is on")
        with self._lock:
            self._logs[id] = log

    @staticmethod
    def _supervisor(pid: int | None) -> dict[str, Any]:
        if pid is None:
            return {}
        found = procfs.proc(pid)
        return {"supervisor": pid, "supervisor_start": found.start if found is not None else None}

    def run_log(self, migration_id: str) -> RunLog | None:
        """The migration's open run log (for the hook supervisor), None if it has none open here."""
        with self._lock:
            return self._logs.get(migration_id)

    def _write(self, migration_id: str, record: dict[str, Any]) -> bool:
        log = self.run_log(migration_id)
        if log is None:
            self._failed(
                f"the journal has no run log open for migration {migration_id}: a {record['k']} record"
            )
            return False
        return log.write(record, vital=record["k"] in _VITAL)

    def record_phase(self, migration_id: str, phase: str, at: float) -> None:
        """Record that a migration entered `phase`."""
        self._write(migration_id, {"k": "phase", "phase": phase, "at": at})

    def record_device_action(
        self,
        migration_id: str,
        device_id: str,
        action: DeviceAction | str,
        status: ActionStatus | str,
        at: float,
        detail: str | None = None,
    ) -> str | None:
        """Record a device's drain or undrain step (`starting` before any of its hooks starts); durable
        when it returns. None, or why it could not be written."""
        record = {
            "k": "action",
            "device_id": device_id,
            "action": DeviceAction(action).value,
            "status": ActionStatus(status).value,
            "at": at,
            "detail": detail,
        }
        if self._write(migration_id, record):
            return None
        log = self.run_log(migration_id)
        return (log.failed if log is not None else None) or f"the {action} of {device_id} was not recorded"

    def record_event(
        self,
        migration_id: str,
        host: str,
        role: str | None,
        kind: EventKind | str,
        name: str,
        device_id: str | None,
        state: str | None,
        qemu_time: float | None,
        received: float,
        data: object = None,
    ) -> None:
        """Record an event (or a note: `kind='note'`, its text as `name`)."""
        if kind not in EventKind.__members__.values():
            raise ValueError(f"event kind {kind!r} is not one of {', '.join(EventKind)}")
        self._write(
            migration_id,
            {
                "k": "event",
                "host": host,
                "role": role,
                "kind": str(kind),
                "name": name,
                "device_id": device_id,
                "state": state,
                "qemu_time": qemu_time,
                "received": received,
                "data": data,
            },
        )

    def record_hook(self, migration_id: str, result: Mapping[str, Any]) -> None:
        """Record one hook run (`HookResult.to_json()`): only the orchestrator's own results; a run of
        the supervisor's (`run` set) is in the run log already, written by the supervisor."""
        if result.get("run") is None:
            self._write(migration_id, {"k": "hook", **result, "trigger": str(result["trigger"])})

    def finish_migration(
        self,
        id: str,
        outcome: Outcome | str,
        changed: bool | None,
        error: str | None,
        exit_code: int | None,
        ended: float,
        summary: Mapping[str, object] | None = None,
    ) -> None:
        """Record how the migration ended, then import its run log into the journal (one transaction)
        and remove it. An import that fails leaves the run log whole (see `failures`)."""
        outcome = Outcome(outcome)
        if outcome is Outcome.RUNNING:
            raise ValueError("a finished migration cannot be 'running'")
        if summary is not None:
            self._write(id, {"k": "summary", "report": summary})
        log = self.run_log(id)
        dropped = log.dropped if log is not None else 0
        end = {
            "k": "end",
            "outcome": outcome.value,
            "changed": changed,
            "error": error,
            "exit_code": exit_code,
            "ended": ended,
            "dropped": dropped,
        }
        self._write(id, end)
        if dropped:
            self._failed(f"the run log of migration {id} dropped {dropped} records: its disk was full")
        if log is not None and log.failed:
            self._failed(log.failed)
        self._import_open(id)

    def mark_recovered(
        self,
        migration_id: str,
        outcome: Outcome | str,
        error: str | None,
        at: float,
        summary: Mapping[str, object] | None = None,
    ) -> bool:
        """Record what `recover` concluded for a migration whose process died (it `resume`d it), and
        import it. Raises OrchestratorError if it cannot be recorded."""
        outcome = Outcome(outcome)
        if outcome is Outcome.RUNNING:
            raise ValueError("a recovered migration cannot be 'running'")
        record = {"k": "recovered", "outcome": outcome.value, "error": error, "at": at, "summary": summary}
        if not self._write(migration_id, record):
            raise OrchestratorError(f"the journal could not record the recovery of migration {migration_id}")
        if not self._import_open(migration_id):
            raise EnvironmentProblem(
                f"the recovery of migration {migration_id} is in its run log, not yet in the journal: "
                + "; ".join(self.failures[-1:]),
                "fix the journal, then run orchestrator recover again (it imports the run log)",
            )
        return True

    def resume(self, migration_id: str) -> RunLog:
        """Take over the run log of a migration whose process died (`recover`): records from now on go
        after its own. A migration of an older orchestrator gets a run log for recover's records."""
        path = runlog.path_of(self.runs, migration_id)
        if path.exists():
            log = RunLog.reopen(path)
        else:
            log = RunLog.create(self.runs, migration_id)
            self._merge.add(migration_id)
        with self._lock:
            self._logs[migration_id] = log
        self._write(
            migration_id, {"k": "owner", "pid": self._pid, "pid_start": self._pid_start, "at": time.time()}
        )
        return log

    def claim(self, migration_id: str, supervisor: int | None) -> None:
        """Say in a resumed run log which supervisor records recover's hooks."""
        self._write(
            migration_id,
            {
                "k": "owner",
                "pid": self._pid,
                "pid_start": self._pid_start,
                "at": time.time(),
                **self._supervisor(supervisor),
            },
        )

    def record_supervised_end(self, migration_id: str, run: str, error: str, *, unknown: bool) -> None:
        """Write down, in recover's words, the end of a hook whose supervisor died before it could
        (`unknown`: it ended by itself, with an exit status nobody saw)."""
        record = {"k": "hook-end", "run": run, "ended": time.time(), "error": error, "unknown": unknown}
        self._write(migration_id, record)

    # --- importing ----------------------------------------------------------------------------------
    def _import_open(self, migration_id: str) -> bool:
        with self._lock:
            log = self._logs.pop(migration_id, None)
            merge = migration_id in self._merge
            self._merge.discard(migration_id)
        if log is None:
            return False
        done = self._import(log.path, merge=merge)
        if done:
            log.remove()
        else:
            log.close()
        return done

    def _import(self, path: Path, *, merge: bool = False) -> bool:
        """Import one run log in one transaction; False (and a line in `failures`) when it cannot be."""
        records = runlog.read(path)
        if not records:
            return False
        try:
            with open(path, "rb") as handle:  # noqa: PTH123 - a lock on the file while it is imported
                fcntl.flock(handle, fcntl.LOCK_EX)
                if not path.exists():  # another process imported it meanwhile
                    return True
                require_sqlite(self.path)
                with contextlib.closing(connect(self.path)) as conn:
                    first = 0
                    if merge:
                        row = conn.execute(
                            "SELECT max(seq) FROM (SELECT seq FROM events WHERE migration_id = ?1 UNION ALL "
                            "SELECT seq FROM hook_runs WHERE migration_id = ?1 UNION ALL "
                            "SELECT seq FROM device_actions WHERE migration_id = ?1)",
                            (path.stem,),
                        ).fetchone()
                        first = int(row[0] or 0)
                    rows = rows_of(records, first)
                    rows.migration.setdefault("id", path.stem)
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        _insert(conn, rows, merge=merge)
                        conn.execute("COMMIT")
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                        raise
        except (sqlite3.Error, OSError, OrchestratorError) as exc:
            problem = exc.line() if isinstance(exc, OrchestratorError) else db_error(self.path, exc).line()
            self._failed(
                f"{problem} (its run log {path} keeps every record; the next orchestrator command imports it)"
            )
            return False
        return True

    def import_finished(self) -> list[str]:
        """Import every run log of a migration that ended (or was recovered) whose process is gone: the
        ones whose import failed when they ended. The ids imported."""
        done = []
        for path in runlog.pending(self.runs):
            rows = rows_of(runlog.read(path))
            if rows.finished and not _alive(*rows.owner) and self._import(path):
                path.unlink(missing_ok=True)
                done.append(path.stem)
        with contextlib.suppress(OSError):  # empty now (or not there): no directory left behind
            self.runs.rmdir()
        return done

    # --- reading -------------------------------------------------------------------------------------
    def _select(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._closed:
                raise OrchestratorError(f"the journal {self.path} is closed; it cannot be read")
            if self._reader is None:
                return []
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                if str(exc).startswith("no such table"):
                    return []
                raise db_error(self.path, exc, reading=True) from None

    def _pending(self) -> dict[str, tuple[_Rows, list[dict[str, Any]]]]:
        """The run logs not imported yet, by migration id: their rows and records."""
        found = {}
        for path in runlog.pending(self.runs):
            records = runlog.read(path)
            rows = rows_of(records)
            if rows.migration.get("id") == path.stem:
                found[path.stem] = (rows, records)
        return found

    def _read_row(self, rows: _Rows) -> MigrationRow:
        """A run log's migration row as it reads now: running while its process lives, else interrupted
        (its process died; `recover` finishes it)."""
        with contextlib.closing(_memory(rows)) as conn:
            row = MigrationRow.of(conn.execute("SELECT * FROM migrations").fetchone())
        if rows.finished or row.outcome is not Outcome.RUNNING or _alive(*rows.owner):
            return row
        pid = rows.owner[0]
        return replace(
            row,
            outcome=Outcome.INTERRUPTED,
            error=f"the orchestrator (process {pid}) died in phase {row.phase}: run orchestrator recover",
        )

    def _legacy(self, row: MigrationRow) -> MigrationRow:
        """A row an older orchestrator left running, as it reads now (its process died: interrupted)."""
        if row.outcome is Outcome.RUNNING and row.host == self._host and not _alive(row.pid, None):
            return replace(row, outcome=Outcome.INTERRUPTED, error="orchestrator process died")
        return row

    def list_migrations(self, limit: int = 50, domain: str | None = None) -> list[MigrationRow]:
        """The latest `limit` migrations, of `domain` if given, newest first (running ones included)."""
        where, params = ("WHERE domain = ? ", (domain,)) if domain is not None else ("", ())
        rows = self._select(
            f"SELECT * FROM migrations {where}ORDER BY started DESC, id DESC LIMIT ?",  # noqa: S608
            (*params, limit),
        )
        found = {row["id"]: self._legacy(MigrationRow.of(row)) for row in rows}
        for mid, (pending, _records) in self._pending().items():
            if domain is None or pending.migration.get("domain") == domain:
                found[mid] = self._read_row(pending)
        return sorted(found.values(), key=lambda r: (r.started, r.id), reverse=True)[:limit]

    def children(self, parent: str) -> list[MigrationRow]:
        """The migrations of an evacuation (its items), in the order they started."""
        rows = self._select("SELECT * FROM migrations WHERE parent = ? ORDER BY started, id", (parent,))
        found = {row["id"]: self._legacy(MigrationRow.of(row)) for row in rows}
        for mid, (pending, _records) in self._pending().items():
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
            missing = " (there is no journal there yet)" if self.readonly and self._reader is None else ""
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
            rows_of_log = pending[mid][0]
            with contextlib.closing(_memory(rows_of_log)) as conn:
                return _record(
                    lambda sql, params: conn.execute(sql, params).fetchall(), mid, self._read_row(rows_of_log)
                )
        found = self._select("SELECT * FROM migrations WHERE id = ?", (mid,))
        return _record(self._select, mid, self._legacy(MigrationRow.of(found[0])))

    def device_actions(self, migration_id: str) -> tuple[DeviceActionRow, ...]:
        """A migration's drain and undrain steps in sequence order (from its run log while it has one)."""
        path = runlog.path_of(self.runs, migration_id)
        if path.exists():
            with contextlib.closing(_memory(rows_of(runlog.read(path)))) as conn:
                rows = conn.execute("SELECT * FROM device_actions ORDER BY seq").fetchall()
        else:
            rows = self._select(
                "SELECT * FROM device_actions WHERE migration_id = ? ORDER BY seq", (migration_id,)
            )
        return tuple(DeviceActionRow.of(row) for row in rows)

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
            for rows, _records in self._pending().values()
            if not rows.finished and rows.migration.get("host") == host and not _alive(*rows.owner)
        ]
        query = _LEGACY_UNFINISHED  # a schema-1 journal read as it is has no `recovered`: nothing was
        if self._version < 2:
            query = query.replace("recovered IS NULL AND ", "")
        for row in self._select(query, (host,)):
            legacy = MigrationRow.of(row)
            if not _alive(legacy.pid, None):
                found.append(replace(legacy, outcome=Outcome.INTERRUPTED))
        return sorted(found, key=lambda r: (r.started, r.id))

    def supervisors(self, migration_id: str) -> list[tuple[int, Any]]:
        """The hook supervisors that recorded into a migration's run log: (pid, start) each."""
        return rows_of(self.records(migration_id)).supervisors

    def close(self) -> None:
        """Close the journal (idempotent). A run log still open (a migration that did not finish) stays
        on disk for `recover`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            logs, self._logs = list(self._logs.values()), {}
            reader, self._reader = self._reader, None
        for log in logs:
            log.close()
        if reader is not None:
            reader.close()


def _record(select: Any, mid: str, migration: MigrationRow) -> MigrationRecord:
    events = select("SELECT * FROM events WHERE migration_id = ? ORDER BY seq", (mid,))
    runs = select("SELECT * FROM hook_runs WHERE migration_id = ? ORDER BY seq", (mid,))
    actions = select("SELECT * FROM device_actions WHERE migration_id = ? ORDER BY seq", (mid,))
    return MigrationRecord(
        migration,
        tuple(EventRow.of(row) for row in events),
        tuple(HookRunRow.of(row) for row in runs),
        tuple(DeviceActionRow.of(row) for row in actions),
    )
