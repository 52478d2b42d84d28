"""The journal: an embedded SQLite record of every migration, its events and its hook runs.

Writes never touch the disk on the caller's thread: each write call assigns the record its sequence
number, puts it on a queue and returns (a few microseconds), and ONE writer thread commits each record
as its own transaction. A crash therefore leaves every record committed so far, and no half record.
Reads use a second connection; in WAL mode they see committed records while any process writes.
A journal left with migrations 'running' by a process that died is corrected on the next open.
`Journal.open_readonly` (what `orchestrator history` uses) creates nothing and writes nothing: a
missing journal reads as empty, and such migrations only read as interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple

from orchestrator.errors import BadInput, EnvironmentProblem, OrchestratorError
from orchestrator.report import Outcome

DEFAULT_PATH: Final = Path("/var/lib/orchestrator/journal.sqlite")
ENV_VAR: Final = "ORCH_JOURNAL"
SCHEMA_VERSION: Final = 2
FLUSH_TIMEOUT_S: Final = 10.0
_BUSY_TIMEOUT_S: Final = 5.0  # another process holding the write lock (its commits take microseconds)
# A record written before a hook starts (`record_device_action(..., "starting")`) waits at most this
# long for another process's write lock: the hook must not wait on the journal.
_SYNC_BUSY_MS: Final = 50
_CHECKPOINT_IDLE_S: Final = 1.0  # the writer checkpoints the WAL when idle this long (not on a hot write)
_PATH_HINT: Final = f"use --journal PATH (or set {ENV_VAR})"
_STALE_ERROR: Final = "orchestrator process died"
_CANDIDATES_SHOWN: Final = 10

_log = logging.getLogger(__name__)


class MigrationKind(StrEnum):
    """What a migrations row records."""

    MIGRATE = "migrate"  # one `orchestrator migrate`
    EVACUATE_ITEM = "evacuate-item"  # one VM of an evacuation; `parent` is the evacuation's id


class EventKind(StrEnum):
    """What an events row records."""

    VFIO = "vfio"  # a VFIO_MIGRATION event
    QEMU = "qemu"  # another QEMU monitor event
    NOTE = "note"  # the orchestrator's own remark (an unexpected transition, a decision, a phase)


class DeviceAction(StrEnum):
    """What a device_actions row records: a drain or an undrain of one device."""

    DRAIN = "drain"
    UNDRAIN = "undrain"


class ActionStatus(StrEnum):
    """A device action's progress: `starting` is committed before any of its hooks starts."""

    STARTING = "starting"
    DONE = "done"
    FAILED = "failed"


_EVENT_KINDS: Final = frozenset(EventKind)

_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(f"'{k}'" for k in MigrationKind)})),
    domain TEXT NOT NULL,
    source_uri TEXT NOT NULL,
    destination_uri TEXT NOT NULL,
    policy TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT CHECK (outcome IN ({", ".join(f"'{o}'" for o in Outcome)})),
    changed INTEGER,
    error TEXT,
    exit_code INTEGER,
    summary TEXT,
    parent TEXT,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS migrations_by_started ON migrations (started);
ALTER TABLE migrations ADD COLUMN drain_mode TEXT;
ALTER TABLE migrations ADD COLUMN policy_text TEXT;
ALTER TABLE migrations ADD COLUMN policy_sha256 TEXT;
ALTER TABLE migrations ADD COLUMN phase TEXT;
ALTER TABLE migrations ADD COLUMN recovered REAL;
CREATE TABLE IF NOT EXISTS events (
    migration_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    host TEXT NOT NULL,
    role TEXT,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(f"'{k}'" for k in EventKind)})),
    name TEXT NOT NULL,
    device_id TEXT,
    state TEXT,
    qemu_time REAL,
    received REAL NOT NULL,
    data TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_migration ON events (migration_id, seq);
CREATE TABLE IF NOT EXISTS hook_runs (
    migration_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    device_id TEXT,
    label TEXT NOT NULL,
    argv TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    duration_ms REAL,
    exit_code INTEGER,
    timed_out INTEGER NOT NULL,
    error TEXT,
    output_tail TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS hook_runs_by_migration ON hook_runs (migration_id, seq);
CREATE TABLE IF NOT EXISTS device_actions (
    migration_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    action TEXT NOT NULL,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS device_actions_by_migration ON device_actions (migration_id, seq);
"""
# Schema versions: statements of _SCHEMA up to this marker made version 1; the rest upgrade it to 2
# (outcome and kind values are checked in Python: SQLite cannot change a CHECK without a rebuild).
_V2_MARKER: Final = "ALTER TABLE migrations ADD COLUMN drain_mode TEXT"

_INSERT_MIGRATION: Final = (
    "INSERT INTO migrations (id, kind, domain, source_uri, destination_uri, policy, started, outcome, "
    "parent, pid, host, drain_mode, policy_text, policy_sha256, phase) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DEVICE_ACTION: Final = "INSERT INTO device_actions VALUES (?, ?, ?, ?, ?, ?, ?)"
_SET_PHASE: Final = "UPDATE migrations SET phase = ? WHERE id = ?"
_INSERT_EVENT: Final = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_HOOK_RUN: Final = "INSERT INTO hook_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_FINISH_MIGRATION: Final = (
    "UPDATE migrations SET outcome = ?, changed = ?, error = ?, exit_code = ?, ended = ?, summary = ? "
    "WHERE id = ?"
)
_MARK_INTERRUPTED: Final = (
    "UPDATE migrations SET outcome = ?, error = ?, ended = ? WHERE id = ? AND outcome = ?"
)


def journal_path(explicit: Path | None = None) -> Path:
    """The journal to use: `explicit` if given, else $ORCH_JOURNAL if set, else DEFAULT_PATH."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(ENV_VAR)
    return Path(from_env) if from_env else DEFAULT_PATH


def _json(value: object) -> str:
    # default=str: a value JSON cannot hold is recorded as its text rather than losing the record
    return json.dumps(value, default=str, separators=(",", ":"))


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class MigrationRow:
    """One migrations row: what was migrated, where, and how it ended."""

    id: str
    kind: MigrationKind
    domain: str
    source_uri: str
    destination_uri: str
    policy: str
    started: float
    ended: float | None
    outcome: Outcome | None
    changed: bool | None
    error: str | None
    exit_code: int | None
    summary: Any  # the JSON summary given to finish_migration, None until then
    parent: str | None  # the evacuation this is one item of
    pid: int  # the orchestrator process that recorded it
    host: str  # ... and its host name
    drain_mode: str | None = None
    policy_sha256: str | None = None
    policy_text: str | None = None  # the policy file as the migration began (what `recover` runs)
    phase: str | None = None  # the last phase the migration entered
    recovered: float | None = None  # when `recover` finished what its process left undone

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end, None while running."""
        return None if self.ended is None else self.ended - self.started

    def to_json(self) -> dict[str, object]:
        """The row as one JSON object."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "domain": self.domain,
            "source_uri": self.source_uri,
            "destination_uri": self.destination_uri,
            "policy": self.policy,
            "started": self.started,
            "ended": self.ended,
            "duration_s": self.duration_s,
            "outcome": None if self.outcome is None else self.outcome.value,
            "changed": self.changed,
            "error": self.error,
            "exit_code": self.exit_code,
            "summary": self.summary,
            "parent": self.parent,
            "pid": self.pid,
            "host": self.host,
            "drain_mode": self.drain_mode,
            "policy_sha256": self.policy_sha256,
            "phase": self.phase,
            "recovered": self.recovered,
        }

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> MigrationRow:
        newer = set(row.keys())  # a schema-1 journal read as it is has none of the later columns
        return cls(
            id=row["id"],
            kind=MigrationKind(row["kind"]),
            domain=row["domain"],
            source_uri=row["source_uri"],
            destination_uri=row["destination_uri"],
            policy=row["policy"],
            started=row["started"],
            ended=row["ended"],
            outcome=None if row["outcome"] is None else Outcome(row["outcome"]),
            changed=None if row["changed"] is None else bool(row["changed"]),
            error=row["error"],
            exit_code=row["exit_code"],
            summary=_from_json(row["summary"]),
            parent=row["parent"],
            pid=row["pid"],
            host=row["host"],
            drain_mode=row["drain_mode"] if "drain_mode" in newer else None,
            policy_sha256=row["policy_sha256"] if "policy_sha256" in newer else None,
            policy_text=row["policy_text"] if "policy_text" in newer else None,
            phase=row["phase"] if "phase" in newer else None,
            recovered=row["recovered"] if "recovered" in newer else None,
        )


@dataclass(frozen=True)
class EventRow:
    """One recorded event or note, in the migration's sequence."""

    seq: int
    host: str
    role: str | None  # 'source' or 'destination'; None for a note about the whole migration
    kind: EventKind
    name: str  # the QEMU event's name, or the note's text
    device_id: str | None
    state: str | None
    qemu_time: float | None
    received: float
    data: Any

    def to_json(self) -> dict[str, object]:
        """The event as one JSON object."""
        return {
            "seq": self.seq,
            "host": self.host,
            "role": self.role,
            "kind": self.kind.value,
            "name": self.name,
            "device_id": self.device_id,
            "state": self.state,
            "qemu_time": self.qemu_time,
            "received": self.received,
            "data": self.data,
        }

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> EventRow:
        return cls(
            seq=row["seq"],
            host=row["host"],
            role=row["role"],
            kind=EventKind(row["kind"]),
            name=row["name"],
            device_id=row["device_id"],
            state=row["state"],
            qemu_time=row["qemu_time"],
            received=row["received"],
            data=_from_json(row["data"]),
        )


@dataclass(frozen=True)
class HookRunRow:
    """One recorded hook run, in the migration's sequence."""

    seq: int
    trigger: str
    device_id: str | None
    label: str
    argv: tuple[str, ...]
    attempt: int
    started: float
    ended: float | None
    duration_ms: float | None
    exit_code: int | None
    timed_out: bool
    error: str | None
    output_tail: str | None

    @property
    def ok(self) -> bool:
        """True if the hook exited with status 0 before its deadline (as HookResult.ok)."""
        return self.error is None and self.exit_code == 0 and not self.timed_out

    def to_json(self) -> dict[str, object]:
        """The hook run as one JSON object."""
        return {
            "seq": self.seq,
            "trigger": self.trigger,
            "device_id": self.device_id,
            "label": self.label,
            "argv": list(self.argv),
            "attempt": self.attempt,
            "started": self.started,
            "ended": self.ended,
            "duration_ms": self.duration_ms,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "error": self.error,
            "output_tail": self.output_tail,
            "ok": self.ok,
        }

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> HookRunRow:
        return cls(
            seq=row["seq"],
            trigger=row["trigger"],
            device_id=row["device_id"],
            label=row["label"],
            argv=tuple(json.loads(row["argv"])),
            attempt=row["attempt"],
            started=row["started"],
            ended=row["ended"],
            duration_ms=row["duration_ms"],
            exit_code=row["exit_code"],
            timed_out=bool(row["timed_out"]),
            error=row["error"],
            output_tail=row["output_tail"],
        )


@dataclass(frozen=True)
class DeviceActionRow:
    """One recorded drain or undrain step of a device, in the migration's sequence."""

    seq: int
    device_id: str
    action: DeviceAction
    status: ActionStatus
    at: float
    detail: str | None

    def to_json(self) -> dict[str, object]:
        """The step as one JSON object."""
        return {
            "seq": self.seq,
            "device_id": self.device_id,
            "action": self.action.value,
            "status": self.status.value,
            "at": self.at,
            "detail": self.detail,
        }

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> DeviceActionRow:
        return cls(
            seq=row["seq"],
            device_id=row["device_id"],
            action=DeviceAction(row["action"]),
            status=ActionStatus(row["status"]),
            at=row["at"],
            detail=row["detail"],
        )


def still_drained(actions: Iterable[DeviceActionRow]) -> dict[str, str | None]:
    """Devices a migration may have left drained, from its device actions: a drain that started and no
    undrain that ended after it (a started, unfinished undrain may not have restored anything).
    Maps each device to the detail of its last drain."""
    drained: dict[str, str | None] = {}
    for row in sorted(actions, key=lambda r: r.seq):
        if row.action is DeviceAction.DRAIN and row.status is ActionStatus.STARTING:
            drained[row.device_id] = row.detail
        elif row.action is DeviceAction.UNDRAIN and row.status is not ActionStatus.STARTING:
            drained.pop(row.device_id, None)
    return drained


@dataclass(frozen=True)
class MigrationRecord:
    """A migration with its events, hook runs and device actions, each in sequence order."""

    migration: MigrationRow
    events: tuple[EventRow, ...]
    hook_runs: tuple[HookRunRow, ...]
    device_actions: tuple[DeviceActionRow, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The record as one JSON object: the migration's fields plus its events, hook runs and device
        actions."""
        return {
            **self.migration.to_json(),
            "events": [event.to_json() for event in self.events],
            "hook_runs": [run.to_json() for run in self.hook_runs],
            "device_actions": [action.to_json() for action in self.device_actions],
        }


class _Write(NamedTuple):
    """One record for the writer: one statement, committed as one transaction."""

    what: str  # for the error report: "event 7 of migration 3f2a..."
    sql: str
    params: tuple[object, ...]


_Item = _Write | threading.Event | None  # an Event is a flush marker; None stops the writer


def _process_alive(pid: int) -> bool:
    """True if `pid` is a live (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    try:
        # "pid (comm) S ...": the state follows the last ')' (comm may contain one)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) is all we know
    return stat[stat.rfind(")") + 2 :][:1] != "Z"


def _open_error(path: Path, exc: BaseException, *, reading: bool = False) -> OrchestratorError:
    """The one-line error for a journal that cannot be opened or created (or read)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.filename is not None and Path(exc.filename) != path:
        reason = f"{exc.filename}: {reason}"  # the directory it is in, say, could not be created
    needed = os.R_OK if reading else os.R_OK | os.W_OK
    denied = isinstance(exc, sqlite3.Error) and not os.access(path if path.exists() else path.parent, needed)
    if isinstance(exc, PermissionError) or denied:
        return EnvironmentProblem(f"cannot open the journal {path}: {reason}", f"run as root or {_PATH_HINT}")
    return BadInput(f"cannot use {path} as the journal: {reason}", _PATH_HINT)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: every statement commits on its own, so one record is one transaction
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def _connect_existing(path: Path) -> sqlite3.Connection:
    """A query-only connection to a journal that must already exist: never creates the file.

    `mode=rw` when we may write there, so that closing it cleans SQLite's -wal/-shm side files
    like any last connection does (nothing else is written: query_only); `mode=ro` otherwise.
    """
    mode = "rw" if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK) else "ro"
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"
    conn = sqlite3.connect(
        uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _upgrade(version: int) -> list[str]:
    """The statements that bring a journal of schema `version` (0: a new file) to SCHEMA_VERSION."""
    first, rest = _SCHEMA.split(_V2_MARKER, 1)
    text = (first if version < 1 else "") + _V2_MARKER + rest
    return [statement for statement in text.split(";") if statement.strip()]


def _create_schema(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # in WAL: durable at checkpoints, never corrupt
    conn.execute("BEGIN IMMEDIATE")  # two processes creating a new journal at once: one waits
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise EnvironmentProblem(
                f"the journal {path} has schema version {version}, newer than this orchestrator's "
                f"{SCHEMA_VERSION}",
                f"upgrade the orchestrator or {_PATH_HINT}",
            )
        if version < SCHEMA_VERSION:
            for statement in _upgrade(version):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class Journal:
    """The journal of migrations. Open with `Journal.open(path)` (or `Journal.open_readonly(path)` to
    read only); use as a context manager or `close()`.

    Write methods are thread-safe and never block on disk; call `flush()` to wait until what was
    written is committed (and to learn of a write that failed). Reads see committed records only.
    """

    def __init__(
        self, path: Path, writer: sqlite3.Connection | None, reader: sqlite3.Connection | None
    ) -> None:
        """Use `Journal.open` or `Journal.open_readonly` (no writer; no reader: no journal yet)."""
        self.path = path
        self._writer_conn = writer
        self._reader = reader
        self.readonly = writer is None
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()  # the writer connection: the writer thread and sync writes
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._seq_lock = threading.Lock()
        self._seqs: dict[str, int] = {}  # last sequence number given per migration
        self._error: OrchestratorError | None = None  # the writer's first failure, until reported
        self._closed = False
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._thread: threading.Thread | None = None
        if writer is not None:
            self._thread = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
            self._thread.start()

    @classmethod
    def open(cls, path: Path) -> Journal:
        """Open (creating if needed) the journal at `path`, and mark migrations left running by a
        dead process as interrupted.

        Raises BadInput or EnvironmentProblem, naming the path, if it cannot be opened or created.
        """
        path = path.expanduser().absolute()
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise _open_error(path, exc) from None
        if path.is_dir():
            raise BadInput(f"cannot use {path} as the journal: it is a directory", _PATH_HINT)
        writer = reader = None
        try:
            writer = _connect(path)
            _create_schema(writer, path)
            # Checkpoints are the writer thread's, when idle: never inside a write a hook waits for.
            writer.execute("PRAGMA wal_autocheckpoint = 0")
            reader = _connect(path)
            reader.execute("PRAGMA query_only = ON")
        except (sqlite3.Error, OSError) as exc:
            for conn in (writer, reader):
                if conn is not None:
                    conn.close()
            raise _open_error(path, exc) from None
        journal = cls(path, writer, reader)
        try:
            journal.mark_stale(time.time())
        except BaseException:
            journal.close()
            raise
        return journal

    @classmethod
    def open_readonly(cls, path: Path) -> Journal:
        """Open the journal at `path` for reading only: nothing is created (neither the file nor its
        directory) and nothing is written. A missing journal reads as one without migrations.

        Migrations left running by a dead process of this host are not marked (that is a write):
        they read as interrupted. Raises BadInput or EnvironmentProblem, naming the path, if the
        journal exists but cannot be read.
        """
        path = path.expanduser().absolute()
        if path.is_dir():
            raise BadInput(f"cannot use {path} as the journal: it is a directory", _PATH_HINT)
        if not path.exists():
            return cls(path, None, None)
        reader = None
        try:
            reader = _connect_existing(path)
            version = reader.execute("PRAGMA user_version").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            if reader is not None:
                reader.close()
            raise _open_error(path, exc, reading=True) from None
        if version > SCHEMA_VERSION:
            reader.close()
            raise EnvironmentProblem(
                f"the journal {path} has schema version {version}, newer than this orchestrator's "
                f"{SCHEMA_VERSION}",
                f"upgrade the orchestrator or {_PATH_HINT}",
            )
        if version < 1:  # an empty file: no migration was ever recorded in it
            reader.close()
            reader = None
        return cls(path, None, reader)

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except OrchestratorError as close_error:
            # the exception already on its way says more than a journal write that also failed
            _log.debug("journal close after an error: %s", close_error.line())

    # Writes: each assigns its record's place at once and leaves the disk to the writer thread.

    def _next_seq(self, migration_id: str) -> int:
        with self._seq_lock:
            seq = self._seqs.get(migration_id, 0) + 1
            self._seqs[migration_id] = seq
        return seq

    def _put(self, write: _Write) -> None:
        if self.readonly:
            raise OrchestratorError(f"the journal {self.path} is open read-only; {write.what} not recorded")
        if self._closed:
            raise OrchestratorError(f"the journal {self.path} is closed; {write.what} not recorded")
        self._queue.put(write)

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
    ) -> None:
        """Record that a migration started (outcome 'running'), by this process on this host, with the
        policy's text and hash (what `recover` runs its undrain hooks from). Committed before it
        returns: nothing of the migration happens before its row exists.
        """
        kind = MigrationKind(kind)
        self._put(
            _Write(
                f"the start of migration {id}",
                _INSERT_MIGRATION,
                (
                    id,
                    kind.value,
                    domain,
                    source_uri,
                    destination_uri,
                    policy,
                    started,
                    Outcome.RUNNING.value,
                    parent,
                    self._pid,
                    self._host,
                    drain_mode,
                    policy_text,
                    policy_sha256,
                    "pre-flight",
                ),
            )
        )
        self.flush()

    def record_phase(self, migration_id: str, phase: str, at: float) -> None:
        """Record that a migration entered `phase` (the row's phase, and a note on its timeline)."""
        self._put(_Write(f"phase {phase} of migration {migration_id}", _SET_PHASE, (phase, migration_id)))
        self.record_event(
            migration_id, "orchestrator", None, EventKind.NOTE, f"phase {phase}", None, None, None, at
        )

    def record_device_action(
        self,
        migration_id: str,
        device_id: str,
        action: DeviceAction | str,
        status: ActionStatus | str,
        at: float,
        detail: str | None = None,
    ) -> str | None:
        """Record a device's drain or undrain. `starting` is committed before this returns (it precedes
        the hooks: a process killed at any instant after it leaves a recoverable journal); `done` and
        `failed` are queued like other records. Returns None, or the one-line reason `starting` could
        not be committed (it is then queued, and the caller must say so: the hooks still run).
        """
        action, status = DeviceAction(action), ActionStatus(status)
        seq = self._next_seq(migration_id)
        write = _Write(
            f"the {action} of {device_id} ({status}) in migration {migration_id}",
            _INSERT_DEVICE_ACTION,
            (migration_id, seq, device_id, action.value, status.value, at, detail),
        )
        if status is not ActionStatus.STARTING:
            self._put(write)
            return None
        return self._write_now(write)

    def _write_now(self, write: _Write) -> str | None:
        """Commit one record on the caller's thread (microseconds; at most _SYNC_BUSY_MS when another
        process holds the journal's write lock). On failure the record is queued and the reason returned."""
        conn = self._writer_conn
        if conn is None or self._closed:
            self._put(write)  # raises: read-only or closed
            return None
        with self._write_lock:
            try:
                conn.execute(f"PRAGMA busy_timeout = {_SYNC_BUSY_MS}")
                try:
                    conn.execute(write.sql, write.params)
                finally:
                    conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            except sqlite3.Error as exc:
                failure = (
                    f"the journal {self.path} could not record {write.what} before its hooks started: {exc}"
                )
            else:
                return None
        self._queue.put(write)  # still recorded, later, if the journal recovers
        return failure

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
        """Record an event (or a note, `kind='note'` with its text as `name`); takes microseconds.

        `data` is stored as JSON, encoded now: later changes to it are not recorded.
        """
        if kind not in _EVENT_KINDS:
            raise ValueError(f"event kind {kind!r} is not one of {', '.join(EventKind)}")
        seq = self._next_seq(migration_id)
        self._put(
            _Write(
                f"event {seq} of migration {migration_id}",
                _INSERT_EVENT,
                (
                    migration_id,
                    seq,
                    host,
                    role,  # StrEnum members bind as their text
                    kind,
                    name,
                    device_id,
                    state,
                    qemu_time,
                    received,
                    None if data is None else _json(data),
                ),
            )
        )

    def record_hook(self, migration_id: str, result: Mapping[str, Any]) -> None:
        """Record one hook run, given as `HookResult.to_json()`."""
        seq = self._next_seq(migration_id)
        self._put(
            _Write(
                f"hook run {seq} of migration {migration_id}",
                _INSERT_HOOK_RUN,
                (
                    migration_id,
                    seq,
                    str(result["trigger"]),
                    result["device_id"],
                    result["label"],
                    _json(list(result["argv"])),
                    result["attempt"],
                    result["started"],
                    result["ended"] or None,  # HookResult leaves 0.0 until the run ends
                    result["duration_ms"],
                    result["exit_code"],
                    int(result["timed_out"]),
                    result["error"],
                    result["output_tail"],
                ),
            )
        )

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
        """Record how a migration ended."""
        outcome = Outcome(outcome)
        if outcome is Outcome.RUNNING:
            raise ValueError("a finished migration cannot be 'running'")
        self._put(
            _Write(
                f"the end of migration {id}",
                _FINISH_MIGRATION,
                (
                    outcome.value,
                    None if changed is None else int(changed),
                    error,
                    exit_code,
                    ended,
                    None if summary is None else _json(summary),
                    id,
                ),
            )
        )

    def mark_stale(self, now: float) -> list[str]:
        """Mark migrations left 'running' by a process of this host that no longer exists as
        'interrupted', ended at `now`; return their ids. Waits until the marks are committed.

        A PID reused since by an unrelated process keeps its migration 'running' until that process ends.
        """
        if self.readonly:
            raise OrchestratorError(f"the journal {self.path} is open read-only: nothing can be marked")
        running = self._select(
            "SELECT id, pid FROM migrations WHERE outcome = ? AND host = ?",
            (Outcome.RUNNING.value, self._host),
        )
        stale = [row["id"] for row in running if not _process_alive(row["pid"])]
        for migration_id in stale:
            self._put(
                _Write(
                    f"the interruption of migration {migration_id}",
                    _MARK_INTERRUPTED,
                    (Outcome.INTERRUPTED.value, _STALE_ERROR, now, migration_id, Outcome.RUNNING.value),
                )
            )
        if stale:
            self.flush()
        return stale

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until everything written so far is committed.

        Raises OrchestratorError if the writer does not catch up within `timeout` seconds, or if a
        write failed since the last report (the first failure; it is then reported).
        """
        if not self._closed and not self.readonly:
            done = threading.Event()
            self._queue.put(done)
            if not done.wait(timeout):
                raise EnvironmentProblem(
                    f"the journal {self.path} did not commit within {timeout:g} s",
                    "check the disk it is on, or whether another process holds it locked",
                )
        self._report_error()

    def close(self) -> None:
        """Commit everything written, stop the writer and close the journal (idempotent).

        Raises OrchestratorError if a write failed and was not yet reported.
        """
        if not self._closed:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
            if self._writer_conn is not None:
                self._writer_conn.close()
            with self._read_lock:
                if self._reader is not None:
                    self._reader.close()
        self._report_error()

    def _report_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_loop(self) -> None:
        conn = self._writer_conn
        assert conn is not None  # the thread only runs for a writable journal
        logged = False
        dirty = False  # written since the last checkpoint
        while True:
            try:
                item = self._queue.get(timeout=_CHECKPOINT_IDLE_S if dirty else None)
            except queue.Empty:
                with self._write_lock, contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                dirty = False
                continue
            if item is None:
                break
            if isinstance(item, threading.Event):
                item.set()
                continue
            dirty = True
            try:
                with self._write_lock:
                    conn.execute(item.sql, item.params)
            except Exception as exc:  # a failed write must not stop the ones after it
                error = EnvironmentProblem(
                    f"the journal {self.path} did not record {item.what}: {exc}",
                    "check the free space and permissions of its directory",
                )
                if self._error is None:
                    self._error = error
                if not logged:
                    logged = True
                    _log.error("%s", error.line())

    # Reads: on their own connection, committed records only.

    def _select(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            if self._reader is None:  # a read-only journal that does not exist (yet): no rows
                return []
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                if not self.readonly:
                    raise
                raise _open_error(self.path, exc, reading=True) from None

    def _as_read(self, row: MigrationRow) -> MigrationRow:
        """The row as `open` would have left it: read-only, a dead process's migration is not marked
        in the file, but it reads as interrupted all the same."""
        if (
            self.readonly
            and row.outcome is Outcome.RUNNING
            and row.host == self._host
            and not _process_alive(row.pid)
        ):
            return replace(row, outcome=Outcome.INTERRUPTED, error=_STALE_ERROR)
        return row

    def list_migrations(self, limit: int = 50, domain: str | None = None) -> list[MigrationRow]:
        """The latest `limit` migrations, of `domain` if given, newest first."""
        if domain is None:
            rows = self._select("SELECT * FROM migrations ORDER BY started DESC, id DESC LIMIT ?", (limit,))
        else:
            rows = self._select(
                "SELECT * FROM migrations WHERE domain = ? ORDER BY started DESC, id DESC LIMIT ?",
                (domain, limit),
            )
        return [self._as_read(MigrationRow._from_row(row)) for row in rows]

    def get_migration(self, id_or_prefix: str) -> MigrationRecord:
        """The migration with this id, or the only one whose id starts with it, with its events and
        hook runs in sequence order.

        Raises BadInput if no migration matches, or if a prefix matches more than one.
        """
        rows = self._select("SELECT * FROM migrations WHERE id = ?", (id_or_prefix,))
        if not rows and id_or_prefix:
            rows = self._select(
                "SELECT * FROM migrations WHERE substr(id, 1, ?) = ? ORDER BY started DESC LIMIT ?",
                (len(id_or_prefix), id_or_prefix, _CANDIDATES_SHOWN + 1),
            )
        if not rows:
            missing = " (there is no journal there yet)" if self.readonly and self._reader is None else ""
            raise BadInput(
                f"no migration {id_or_prefix} in {self.path}{missing}",
                f"list them with: orchestrator history --journal '{self.path}'"
                if self.path != journal_path().expanduser().absolute()
                else "list them with: orchestrator history",
            )
        if len(rows) > 1:
            shown = ", ".join(row["id"] for row in rows[:_CANDIDATES_SHOWN])
            more = ", ..." if len(rows) > _CANDIDATES_SHOWN else ""
            raise BadInput(
                f"migration id {id_or_prefix} is ambiguous: it begins {shown}{more}",
                "give more of the id",
            )
        migration = self._as_read(MigrationRow._from_row(rows[0]))
        events = self._select("SELECT * FROM events WHERE migration_id = ? ORDER BY seq", (migration.id,))
        runs = self._select("SELECT * FROM hook_runs WHERE migration_id = ? ORDER BY seq", (migration.id,))
        actions = self._device_actions(migration.id)
        return MigrationRecord(
            migration,
            tuple(EventRow._from_row(row) for row in events),
            tuple(HookRunRow._from_row(row) for row in runs),
            actions,
        )

    def _device_actions(self, migration_id: str) -> tuple[DeviceActionRow, ...]:
        try:
            rows = self._select(
                "SELECT * FROM device_actions WHERE migration_id = ? ORDER BY seq", (migration_id,)
            )
        except OrchestratorError:
            return ()  # a schema-1 journal read as it is: no device actions were recorded then
        return tuple(DeviceActionRow._from_row(row) for row in rows)
