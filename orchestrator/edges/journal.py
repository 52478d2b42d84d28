"""The journal: every migration's record, kept in SQLite once it has ended. `Journal` opens it (creating
it if needed), writes each run, and closes it.

While a migration runs, its truth is its run log (orchestrator.edges.runlog): each record is one write() on
the thread that acts, and the hook supervisor adds each hook's start and end. No writer thread, no
SQLite on the way to a hook. When the migration ends, its run log is imported into the journal in ONE
transaction (orchestrator.edges.journal_import) and removed; a run log that could not be imported then
(the journal locked, damaged, replaced, or its disk full) stays whole on disk and is imported by the next
open of the journal, or by `recover`, which also finishes the run logs of migrations whose process died
(`unfinished`).

Reads (`history`, `recover`) see the journal and the run logs not imported yet
(orchestrator.edges.journal_reads: `Journal`'s read methods are its reader's). `Journal.open_readonly`
creates and writes nothing; it refuses, without letting SQLite touch it, a file that is not a journal.

Migrations recorded by orchestrators before the run log (rows left 'running', or 'interrupted' with no
exit code, by a process that died) are listed by `unfinished` too; `recover` finishes them from their
device actions, and its records are added after theirs.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from orchestrator.core.errors import BadInput, EnvironmentProblem, OrchestratorError
from orchestrator.core.records import (
    ActionStatus,
    DeviceAction,
    DeviceActionRow,
    EventKind,
    MigrationKind,
    MigrationRecord,
    MigrationRow,
)
from orchestrator.core.report import Outcome
from orchestrator.edges import procfs, runlog
from orchestrator.edges.journal_db import (
    PATH_HINT,
    SCHEMA_VERSION,
    connect,
    connect_existing,
    create_schema,
    db_error,
    newer_schema,
    quick_check,
    require_sqlite,
)
from orchestrator.edges.journal_import import RunRows, import_run_log, rows_of
from orchestrator.edges.journal_reads import JournalReader
from orchestrator.edges.runlog import RunLog

_VITAL: Final = frozenset({"begin", "action", "hook", "hook-end", "end", "recovered", "owner"})
_BEGIN_FIELDS: Final = tuple("id kind domain source_uri destination_uri policy started parent".split())  # noqa: SIM905


class Journal:
    """The journal of migrations. Open with `Journal.open(path)` (or `Journal.open_readonly(path)` to
    read only); use as a context manager or `close()`. Thread-safe."""

    def __init__(
        self,
        path: Path,
        reader: sqlite3.Connection | None,
        *,
        readonly: bool,
        version: int = SCHEMA_VERSION,
    ) -> None:
        """Use `Journal.open` or `Journal.open_readonly` (`version`: of the file as read)."""
        self.path = path
        self.runs = runlog.directory_of(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._logs: dict[str, RunLog] = {}
        self._merge: set[str] = set()  # migrations of an older orchestrator that recover writes for
        self._failures: list[str] = []
        self._closed = False
        self._pid = os.getpid()
        me = procfs.proc(self._pid)
        self._pid_start = me.start if me is not None else None
        self._host = os.uname().nodename  # = socket.gethostname()
        self._reads = JournalReader(
            path, self.runs, reader, readonly=readonly, version=version, host=self._host
        )

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
        if version > SCHEMA_VERSION:
            reader.close()
            raise newer_schema(path, version)
        if version < 1:
            reader.close()
            reader = None
        return cls(path, reader, readonly=True, version=version)

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

    # --- importing: run logs into the journal (orchestrator.edges.journal_import) ------------------
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

    def _import(self, path: Path, rows: RunRows | None = None, *, merge: bool = False) -> bool:
        """Import one run log (its `rows`, read from it when None) in one transaction; False (and a line
        in `failures`) when it cannot be."""
        if rows is None:
            records = runlog.read(path)
            if not records:
                return False
            rows = rows_of(records)
        try:
            import_run_log(self.path, path, rows, merge=merge)
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
            if rows.finished and not procfs.same_process(*rows.owner) and self._import(path, rows):
                path.unlink(missing_ok=True)
                done.append(path.stem)
        with contextlib.suppress(OSError):  # empty now (or not there): no directory left behind
            self.runs.rmdir()
        return done

    # --- reading (orchestrator.edges.journal_reads) ------------------------------------------------
    def check(self) -> None:
        """Verify the journal's file (`PRAGMA quick_check(1)`: reads the whole file once); raises the
        one-line EnvironmentProblem naming it and how to move it aside or salvage it."""
        self._reads.check()

    def list_migrations(self, limit: int = 50, domain: str | None = None) -> list[MigrationRow]:
        """The latest `limit` migrations, of `domain` if given, newest first (running ones included)."""
        return self._reads.list_migrations(limit, domain)

    def children(self, parent: str) -> list[MigrationRow]:
        """The migrations of an evacuation (its items), in the order they started."""
        return self._reads.children(parent)

    def get_migration(self, id_or_prefix: str) -> MigrationRecord:
        """The migration with this id, or the only one whose id starts with it, with its events, hook
        runs and device actions in sequence order. Raises BadInput if none matches, or several do."""
        return self._reads.get_migration(id_or_prefix)

    def device_actions(self, migration_id: str) -> tuple[DeviceActionRow, ...]:
        """A migration's drain and undrain steps in sequence order (from its run log while it has one)."""
        return self._reads.device_actions(migration_id)

    def records(self, migration_id: str) -> list[dict[str, Any]]:
        """The records of a migration's run log (none once it is imported)."""
        return self._reads.records(migration_id)

    def unfinished(self, host: str | None = None) -> list[MigrationRow]:
        """Migrations of `host` (default: this host) whose process died before they ended and that
        `recover` has not finished (see JournalReader.unfinished). Oldest first."""
        return self._reads.unfinished(host)

    def supervisors(self, migration_id: str) -> list[tuple[int, Any]]:
        """The hook supervisors that recorded into a migration's run log: (pid, start) each."""
        return self._reads.supervisors(migration_id)

    def close(self) -> None:
        """Close the journal (idempotent). A run log still open (a migration that did not finish) stays
        on disk for `recover`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            logs, self._logs = list(self._logs.values()), {}
        for log in logs:
            log.close()
        self._reads.close()
