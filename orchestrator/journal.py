"""The journal: an embedded SQLite record of every migration, its events and its hook runs.

Writes never touch the disk on the caller's thread: each write call assigns the record its sequence
number, puts it on a queue and returns (a few microseconds), and ONE writer thread commits each record
as its own transaction. A crash therefore leaves every record committed so far, and no half record.
Reads use a second connection; in WAL mode they see committed records while any process writes.
A journal left with migrations 'running' by a process that died is corrected on the next open.
`Journal.open_readonly` (what `orchestrator history` uses) creates nothing and writes nothing: a
missing journal reads as empty, and such migrations only read as interrupted.

No record is lost silently, and nothing is claimed that was not checked:

- Another process holding the write lock (another orchestrator commits in microseconds; an admin's
  `sqlite3` shell inside a transaction may hold it for minutes; readers take no lock in WAL mode):
  the writer thread retries the record with backoff, 5 ms doubling to 1 s, for up to
  `_RETRY_BUDGET_S` (60 s) in all, in order (the records queued after it wait). An attempt waits at
  most `_WRITER_BUSY_MS` inside SQLite and holds the connection only that long. The `starting` record
  of a drain or undrain, and an undrain's `spawned` (`record_device_action`), is durable before the
  call returns without SQLite:
  one write() to the migration's intents file (orchestrator.intents), removed once the writer has
  committed the migration's records; where that file cannot be written, it is committed on the
  caller's thread, waiting at most about `_SYNC_BUSY_MS` more: if it cannot commit, it is queued and
  its reason returned to the caller. After a give-up,
  every later record gets one attempt, until one lands (a lock held for an hour must not make the
  queue wait a minute per record).
- Every record the writer gives up on, and every other failed write, is a failure: one line in
  `Journal.failures` (read without raising: the migration puts it into its report and exit code),
  and the first one since the last report is raised by `flush()` and `close()`. `flush()`'s timeout
  does not count the time the writer waits for another process's lock (bounded by the budget).
- A corrupt journal: `Journal.check()` runs `PRAGMA quick_check(1)` and raises EnvironmentProblem
  (exit 7) in one line naming the file and how to move it aside or salvage it. `Journal.open(path,
  check=True)` runs it before anything is written (the migrate and evacuate paths open so: no
  migration runs with a journal that cannot record it); a read-only open does not (it would read the
  whole file for `history`), but every read turns an SQLite error into the same one-line problem,
  never a traceback.
- Crash recovery: `unfinished()` lists this host's migrations whose process died before they ended
  and that `recover` has not finished (`recovered` NULL); `mark_recovered()` records what `recover`
  did, and nothing rewrites such a row afterwards (neither the stale marking at open nor a second
  `mark_recovered`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple

from orchestrator import intents, procfs
from orchestrator.errors import BadInput, EnvironmentProblem, OrchestratorError, shell_uri
from orchestrator.report import Outcome

DEFAULT_PATH: Final = Path("/var/lib/orchestrator/journal.sqlite")
ENV_VAR: Final = "ORCH_JOURNAL"
SCHEMA_VERSION: Final = 3
FLUSH_TIMEOUT_S: Final = 10.0
# Opening (creating the schema) and reading wait this long for another process's lock.
_BUSY_TIMEOUT_S: Final = 5.0
# A record written before a hook starts (`record_device_action(..., "starting")`) waits at most this
# long for another process's write lock: the hook must not wait on the journal.
_SYNC_BUSY_MS: Final = 50
# One attempt of the writer thread waits this long inside SQLite for another process's write lock (and
# holds the connection, which a `starting` record then waits for, no longer); then it backs off.
_WRITER_BUSY_MS: Final = 10
_RETRY_FIRST_S: Final = 0.005
_RETRY_MAX_S: Final = 1.0
_RETRY_BUDGET_S = 60.0  # in all, per record, before the writer gives up on it (tests shorten it)
_WAIT_SLICE_S: Final = 0.05
_FAILURES_KEPT: Final = 20  # lines kept in Journal.failures; beyond, a count
_DETAIL_CHARS: Final = 200
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_BUSY_CODES: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})  # another connection's lock
# SQLite result codes that say nothing about the file's contents (permissions, resources, I/O)
_NOT_CORRUPTION: Final = frozenset(
    {
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_AUTH,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
    }
)
# The writer lets a burst of records gather this long before it commits them: the events of a
# switchover come in bursts (a device's P2P state, the next device's prepare ~60 us later), and a
# writer taking the interpreter's lock to commit in the middle of one delayed the next event's
# callback, and its drain. Anything that waits for the writer (flush, close) cuts this short.
_GATHER_S: Final = 0.01
_BATCH_MAX: Final = 256  # records committed in one transaction at most
_CHECKPOINT_IDLE_S: Final = 1.0  # the writer checkpoints the WAL when idle this long (not on a hot write)
_PATH_HINT: Final = f"use --journal PATH (or set {ENV_VAR})"
_STALE_ERROR: Final = "orchestrator process died"
_CANDIDATES_SHOWN: Final = 10

_log = logging.getLogger(__name__)


class MigrationKind(StrEnum):
    """What a migrations row records."""

    MIGRATE = "migrate"  # one `orchestrator migrate`
    EVACUATE_ITEM = "evacuate-item"  # one VM of an evacuation; `parent` is the evacuation's id
    EVACUATION = "evacuation"  # one `orchestrator evacuate`: its items point to it (domain: the selection)


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
    """A device action's progress. `starting` is committed before any of its hooks starts; for an
    undrain, `spawned` is committed once every hook has been started (its detail names their processes,
    `ProcessToken`s), so that `recover` knows whether an undrain it finds unfinished may be under way.
    `ended` is recover's word for an undrain whose hooks it saw end without seeing their result."""

    STARTING = "starting"
    SPAWNED = "spawned"
    DONE = "done"
    FAILED = "failed"
    ENDED = "ended"


_ENDS: Final = frozenset({ActionStatus.DONE, ActionStatus.FAILED, ActionStatus.ENDED})
_SYNC_STATUSES: Final = frozenset({ActionStatus.STARTING, ActionStatus.SPAWNED})


_EVENT_KINDS: Final = frozenset(EventKind)

# Version 1 as it was (its CHECK lists are frozen: version 3 drops them).
_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('migrate', 'evacuate-item')),
    domain TEXT NOT NULL,
    source_uri TEXT NOT NULL,
    destination_uri TEXT NOT NULL,
    policy TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT CHECK (outcome IN ('running', 'succeeded', 'failed', 'rolled-back', 'aborted',
        'interrupted', 'unchanged')),
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
# Schema versions: statements of _SCHEMA up to this marker made version 1; the rest upgrade it to 2.
_V2_MARKER: Final = "ALTER TABLE migrations ADD COLUMN drain_mode TEXT"
# Version 3 rebuilds `migrations` without its CHECKs (SQLite cannot drop one otherwise): kinds and
# outcomes are checked in Python, so that new ones (evacuations, planned and refused runs) fit old files.
_MIGRATION_COLUMNS: Final = (
    "id, kind, domain, source_uri, destination_uri, policy, started, ended, outcome, changed, error, "
    "exit_code, summary, parent, pid, host, drain_mode, policy_text, policy_sha256, phase, recovered"
)
_V3_COPY: Final = (
    f"INSERT INTO migrations_v3 ({_MIGRATION_COLUMNS}) SELECT {_MIGRATION_COLUMNS} FROM migrations"  # noqa: S608 - constants
)
_V3: Final = (
    """
CREATE TABLE migrations_v3 (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    domain TEXT NOT NULL,
    source_uri TEXT NOT NULL,
    destination_uri TEXT NOT NULL,
    policy TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT,
    changed INTEGER,
    error TEXT,
    exit_code INTEGER,
    summary TEXT,
    parent TEXT,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    drain_mode TEXT,
    policy_text TEXT,
    policy_sha256 TEXT,
    phase TEXT,
    recovered REAL
);
"""
    + _V3_COPY
    + """;
DROP TABLE migrations;
ALTER TABLE migrations_v3 RENAME TO migrations;
CREATE INDEX IF NOT EXISTS migrations_by_started ON migrations (started);
CREATE INDEX IF NOT EXISTS migrations_by_parent ON migrations (parent);
"""
)

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
    "UPDATE migrations SET outcome = ?, error = ?, ended = ? WHERE id = ? AND outcome = ? "
    "AND recovered IS NULL"
)
_MARK_RECOVERED: Final = (
    "UPDATE migrations SET outcome = ?, error = ?, ended = coalesce(ended, ?), recovered = ?, "
    "summary = coalesce(?, summary) WHERE id = ? AND recovered IS NULL"
)
_SELECT_LAST_SEQ: Final = (
    "SELECT max(seq) FROM (SELECT seq FROM events WHERE migration_id = ? "
    "UNION ALL SELECT seq FROM hook_runs WHERE migration_id = ? "
    "UNION ALL SELECT seq FROM device_actions WHERE migration_id = ?)"
)
_SELECT_UNFINISHED: Final = (
    "SELECT * FROM migrations WHERE host = ? AND outcome IN (?, ?) AND recovered IS NULL ORDER BY started, id"
)
_SELECT_UNFINISHED_V1: Final = (  # a schema-1 journal read as it is: nothing was ever recovered
    "SELECT * FROM migrations WHERE host = ? AND outcome IN (?, ?) ORDER BY started, id"
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
    undrain that ended after it (a started or spawned, unfinished undrain may not have restored
    anything). Maps each device to the detail of its last drain."""
    drained: dict[str, str | None] = {}
    for row in sorted(actions, key=lambda r: r.seq):
        if row.action is DeviceAction.DRAIN and row.status is ActionStatus.STARTING:
            drained[row.device_id] = row.detail
        elif row.action is DeviceAction.UNDRAIN and row.status in _ENDS:
            drained.pop(row.device_id, None)
    return drained


def undrains_spawned(actions: Iterable[DeviceActionRow]) -> dict[str, DeviceActionRow]:
    """Devices whose last undrain had all its hooks started and never ended (the process that started
    them died): each device's `spawned` row, whose detail names the hook processes."""
    spawned: dict[str, DeviceActionRow] = {}
    for row in sorted(actions, key=lambda r: r.seq):
        if row.action is not DeviceAction.UNDRAIN:
            continue
        if row.status is ActionStatus.SPAWNED:
            spawned[row.device_id] = row
        else:
            spawned.pop(row.device_id, None)
    return spawned


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


class _Ticket:
    """What the writer thread tells the caller waiting for one record: how many rows it changed."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.rowcount = 0
        self.error: OrchestratorError | None = None


class _Write(NamedTuple):
    """One record for the writer: one statement, committed as one transaction."""

    what: str  # for the error report: "event 7 of migration 3f2a..."
    sql: str
    params: tuple[object, ...]
    ticket: _Ticket | None = None  # set for a caller that waits for this very record
    migration: str | None = None  # a device action that is also in the migration's intents file


class _Committed(NamedTuple):
    """A marker: every record of `migration` queued before this one is committed (or failed)."""

    migration: str


# An Event is a flush marker; None stops the writer
_Item = _Write | _Committed | threading.Event | None
_NOTHING: Final = _Committed("")  # the writer holds no item back


def _process_alive(pid: int) -> bool:
    """True if `pid` is a live (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    found = procfs.proc(pid)
    return found is None or not found.dead  # None: no /proc, and kill(0) is all we know


def _sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of `exc` (SQLITE_BUSY for SQLITE_BUSY_SNAPSHOT...), if any."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_busy(exc: BaseException) -> bool:
    """True if `exc` says another connection holds a lock this one needs (retrying may succeed)."""
    return isinstance(exc, sqlite3.Error) and _sqlite_code(exc) in _BUSY_CODES


def _is_sqlite_file(path: Path) -> bool:
    """True if `path` begins with SQLite's header: a database, damaged or not (not some other file)."""
    try:
        with path.open("rb") as file:
            return file.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError:
        return False


def _one_line(text: str) -> str:
    """SQLite's text as one bounded line (quick_check reports "*** in database main ***\nPage 9: ...")."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("***")]
    joined = "; ".join(lines) or text.strip()
    return joined if len(joined) <= _DETAIL_CHARS else joined[: _DETAIL_CHARS - 3] + "..."


def _corruption_hint(path: Path) -> str:
    """How to get going again with a corrupt journal: a command to paste, for each way."""
    aside = f"mv {shell_uri(str(path))} {shell_uri(f'{path}.corrupt')}"
    wal = Path(f"{path}-wal")
    with contextlib.suppress(OSError):
        if wal.stat().st_size > 0:  # records not yet in the file itself: they move with it
            aside += f" && mv {shell_uri(str(wal))} {shell_uri(f'{path}.corrupt-wal')}"
    return (
        f"move it aside: {aside} (a new journal is created on the next run), or salvage it with: "
        f"sqlite3 {shell_uri(str(path))} .recover | sqlite3 {shell_uri(f'{path}.recovered')}"
    )


def _action_write(  # the record's own columns, no row object: it is built on the hot path
    migration_id: str,
    seq: int,
    device_id: str,
    action: DeviceAction,
    status: ActionStatus,
    at: float,
    detail: str | None,
    source: str = "",
) -> _Write:
    """The journal's record of one device action (a drain or undrain step) of a migration."""
    return _Write(
        f"the {action} of {device_id} ({status}) in migration {migration_id}{source}",
        _INSERT_DEVICE_ACTION,
        (migration_id, seq, device_id, action.value, status.value, at, detail),
        migration=migration_id,
    )


class _Holding:
    """Journal.holding's block (a plain class: entered on the hot path, where a generator costs more)."""

    __slots__ = ("_journal", "_me", "_outer")

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._outer: list[_Write] | None = None  # set for the outermost block of its thread

    def __enter__(self) -> None:
        self._me = me = threading.get_ident()
        journal = self._journal
        with journal._hold_lock:
            if me not in journal._held:  # nested: the outer block hands them over
                self._outer = journal._held[me] = []

    def __exit__(self, *exc: object) -> None:
        if self._outer is not None:
            self._journal._release(self._me)


class JournalCorrupt(EnvironmentProblem):
    """The journal's file is damaged: one line naming it and how to move it aside or salvage it."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = _one_line(detail)
        super().__init__(f"the journal {path} is corrupt: {self.detail}", _corruption_hint(path))

    def again(self) -> JournalCorrupt:
        """The same error, its hint made anew (after closing: the -wal file may be gone)."""
        return JournalCorrupt(self.path, self.detail)


def _corrupt(path: Path, detail: str) -> JournalCorrupt:
    """The one-line error for a journal whose file is damaged."""
    return JournalCorrupt(path, detail)


def _is_corruption(path: Path, exc: BaseException, *, reading: bool) -> bool:
    """True if `exc` says the journal file is damaged: SQLite says so, or an SQLite file cannot be read
    as a journal (reading), or has a valid header but the rest is not a database."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = _sqlite_code(exc)
    if code == sqlite3.SQLITE_CORRUPT:
        return True
    if code in _NOT_CORRUPTION or _is_busy(exc):
        return False
    return (reading or code == sqlite3.SQLITE_NOTADB) and _is_sqlite_file(path)


def _db_error(path: Path, exc: BaseException, *, reading: bool = False) -> OrchestratorError:
    """The one-line error for an SQLite (or OS) error met opening or reading the journal: never a
    traceback. A damaged file says how to move it aside; a lock names the way to find its holder."""
    if _is_busy(exc):
        return EnvironmentProblem(
            f"the journal {path} is locked by another process: {exc}",
            f"retry when it is done; see which processes have it open with: fuser -v {shell_uri(str(path))}",
        )
    if _is_corruption(path, exc, reading=reading):
        return _corrupt(path, str(exc))
    if reading and _sqlite_code(exc) == sqlite3.SQLITE_IOERR:
        return EnvironmentProblem(f"cannot read the journal {path}: {exc}", "check the disk it is on")
    return _open_error(path, exc, reading=reading)


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
    text = (first if version < 1 else "") + (_V2_MARKER + rest if version < 2 else "") + _V3
    return [statement for statement in text.split(";") if statement.strip()]


def _quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """Raise the one-line EnvironmentProblem if `PRAGMA quick_check(1)` finds damage (and
    sqlite3.Error if SQLite cannot even run it)."""
    detail = "; ".join(str(row[0]) for row in conn.execute("PRAGMA quick_check(1)").fetchall())
    if detail != "ok":
        raise _corrupt(path, detail)


def check_in_background(path: Path) -> Callable[[], bool]:
    """Start verifying the journal at `path` as `Journal.check` does, in a thread of its own, and return
    the function that waits for the verdict: True when the file was verified (or there is none yet:
    nothing is created), False when it could not be checked there (then open with `check=True`, which
    says why), and it raises the same one-line EnvironmentProblem as `check` for a damaged file.

    For a command with other work to do before it opens the journal: `PRAGMA quick_check` reads the
    whole file (~55 ms for a journal of 3000 migrations), and SQLite does that without the interpreter's
    lock, next to the imports and the set-up that come first."""
    path = path.expanduser().absolute()
    verdict: list[JournalCorrupt | bool] = []

    def run() -> None:
        try:
            if not path.is_file():
                verdict.append(True)
                return
            conn = _connect_existing(path)
            try:
                _quick_check(conn, path)
            finally:
                conn.close()
            verdict.append(True)
        except JournalCorrupt as damaged:
            verdict.append(damaged)
        except Exception:  # the caller checks the usual way, which says what is wrong
            verdict.append(False)

    thread = threading.Thread(target=run, name="journal-check", daemon=True)
    thread.start()

    def wait() -> bool:
        thread.join()
        result = verdict[0] if verdict else False
        if isinstance(result, JournalCorrupt):
            raise result.again() from None
        return result is True

    return wait


def _create_schema(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # in WAL: durable at checkpoints, never corrupt
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return  # nothing to create: no write lock needed (another process may hold it for a while)
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
    written is committed (and to learn of a write that failed), or read `failures`. Reads see
    committed records only.
    """

    def __init__(
        self,
        path: Path,
        writer: sqlite3.Connection | None,
        reader: sqlite3.Connection | None,
        version: int = SCHEMA_VERSION,
    ) -> None:
        """Use `Journal.open` or `Journal.open_readonly` (no writer; no reader: no journal yet)."""
        self.path = path
        self._writer_conn = writer
        self._reader = reader
        self._version = version  # of the file as it is read (a read-only journal is not upgraded)
        self.readonly = writer is None
        # the hot path's `starting` records (see orchestrator/intents.py), for a writable journal
        self._intents = None if writer is None else intents.IntentLog(path)
        self._intents_lost: set[str] = set()  # migrations with a device action the journal lost
        self._failures_lock = threading.Lock()
        self._failures: list[str] = []  # every write that failed, one line each (the first few)
        self._failures_more = 0  # ... and how many more
        self._blocked = False  # the writer thread is waiting for another process's write lock
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()  # the writer connection: the writer thread and sync writes
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._held: dict[int, list[_Write]] = {}  # per thread, while it is `holding`
        self._commits_waiting: set[str] = set()  # migrations whose _Committed waits for a block's end
        # `_held`, `_commits_waiting`, and queueing a record with `_closed` read: close() sets it (and
        # queues the writer's end) under it, so nothing is queued after the writer's end
        self._hold_lock = threading.Lock()
        self._urgent = threading.Event()  # someone waits for the writer: no gathering
        self._logged = False  # the writer logged its first failure
        self._seq_lock = threading.Lock()
        self._seqs: dict[str, int] = {}  # last sequence number given per migration
        self._error: OrchestratorError | None = None  # the writer's first failure, until reported
        self._closed = False
        self._pid = os.getpid()
        self._host = os.uname().nodename  # = socket.gethostname()
        self._thread: threading.Thread | None = None
        if writer is not None:
            self._thread = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
            self._thread.start()

    @classmethod
    def open(cls, path: Path, *, check: bool = False) -> Journal:
        """Open (creating if needed) the journal at `path`, and mark migrations left running by a
        dead process as interrupted. With `check`, first verify the file (`check()`): what is about
        to change the world opens so, and learns of a corrupt journal before anything happens.

        Raises BadInput or EnvironmentProblem, naming the path, if it cannot be opened or created,
        and EnvironmentProblem if it is corrupt.
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
            # Each attempt of the writer thread is short; it retries (see the module's docstring).
            writer.execute(f"PRAGMA busy_timeout = {_WRITER_BUSY_MS}")
            reader = _connect(path)
            reader.execute("PRAGMA query_only = ON")
        except (sqlite3.Error, OSError) as exc:
            for conn in (writer, reader):
                if conn is not None:
                    conn.close()
            error = _db_error(path, exc)
            raise error.again() if isinstance(error, JournalCorrupt) else error from None
        journal = cls(path, writer, reader)
        try:
            if check:
                journal.check()
            journal.mark_stale(time.time())
        except JournalCorrupt as corrupt:
            with contextlib.suppress(OrchestratorError):
                journal.close()
            raise corrupt.again() from None
        except BaseException:
            with contextlib.suppress(OrchestratorError):  # the error on its way says what matters
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
            if version < 1 and path.stat().st_size > 0:
                # SQLite reads a damaged header as an empty database: only an intact one is empty
                _quick_check(reader, path)
        except (sqlite3.Error, OSError, OrchestratorError) as exc:
            if reader is not None:
                reader.close()
            error = exc if isinstance(exc, OrchestratorError) else _db_error(path, exc, reading=True)
            raise error.again() if isinstance(error, JournalCorrupt) else error from None
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
        return cls(path, None, reader, version)

    def check(self) -> None:
        """Verify the journal's file (`PRAGMA quick_check(1)`: every page, no index contents; reads the
        whole file once). Nothing to verify in a read-only journal that does not exist.

        Raises EnvironmentProblem, in one line naming the file and how to move it aside or salvage it,
        if it is damaged.
        """
        with self._read_lock:
            if self._reader is None:
                return
            try:
                _quick_check(self._reader, self.path)
            except sqlite3.Error as exc:
                raise _db_error(self.path, exc, reading=True) from None

    @property
    def failures(self) -> list[str]:
        """Every write that failed since the journal was opened (a record the writer gave up on, or
        could not insert), one line each, oldest first: the first 20, then a line counting the others.
        Reading it raises nothing and reports nothing (`flush()` and `close()` still raise the first).
        """
        with self._failures_lock:
            lines = list(self._failures)
            if self._failures_more:
                lines.append(f"the journal {self.path} failed {self._failures_more} more writes")
        return lines

    def _failed(self, error: OrchestratorError) -> None:
        """Note a write that failed (the writer thread): in `failures`, and for the next report."""
        with self._failures_lock:
            if len(self._failures) < _FAILURES_KEPT:
                self._failures.append(error.line())
            else:
                self._failures_more += 1
            if self._error is None:
                self._error = error

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
            last = self._seqs.get(migration_id)
            if last is None:  # another process's migration (`recover`): go on after its records
                last = self._last_seq(migration_id)
            seq = self._seqs[migration_id] = last + 1
        return seq

    def _last_seq(self, migration_id: str) -> int:
        """The highest sequence number a migration's records have in the file (0: none)."""
        written = max((i.seq for i in intents.read(intents.directory_of(self.path), migration_id)), default=0)
        try:
            rows = self._select(_SELECT_LAST_SEQ, (migration_id,) * 3, table_may_be_missing=True)
        except OrchestratorError:
            return written  # the write will fail and say why
        return max(written, int(rows[0][0] or 0) if rows else 0)

    def _put(self, write: _Write) -> None:
        if self.readonly:
            raise OrchestratorError(f"the journal {self.path} is open read-only; {write.what} not recorded")
        with self._hold_lock:
            if self._closed:
                raise OrchestratorError(f"the journal {self.path} is closed; {write.what} not recorded")
            held = self._held.get(threading.get_ident()) if self._held else None
            if held is not None:
                if write.ticket is None:
                    held.append(write)
                    return
                self._hand_over(held)  # its caller waits for it: what the block holds goes first
            self._queue.put(write)

    def _hand_over(self, held: list[_Write]) -> None:
        """Queue what a block holds, in order, and the markers that waited for it (`_hold_lock` held)."""
        for write in held:
            if self._closed:  # closed meanwhile: the writer is gone (close() kept the intents file)
                if write.migration is not None:
                    self._intents_lost.add(write.migration)
                self._failed(
                    OrchestratorError(f"the journal {self.path} closed before {write.what} was recorded")
                )
            else:
                self._queue.put(write)
        held.clear()
        for migration in list(self._commits_waiting):
            if not self._holds(migration):
                self._commits_waiting.discard(migration)
                if not self._closed:
                    self._queue.put(_Committed(migration))

    def _holds(self, migration: str) -> bool:
        """Whether a block holds a device action of `migration` (`_hold_lock` held)."""
        return any(write.migration == migration for held in self._held.values() for write in held)

    def holding(self) -> _Holding:
        """A block whose records, made on this thread, reach the writer when it ends, in their order: the
        hot path tells a drain's hooks before it wakes the writer thread, which would otherwise compete
        with it for the interpreter's lock and the CPU right then. What the block writes synchronously
        (the `starting` of a device action, in its intents file or the journal) is written at once."""
        return _Holding(self)

    def _release(self, me: int) -> None:
        with self._hold_lock:
            self._hand_over(self._held.pop(me))

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
        with self._seq_lock:
            self._seqs.setdefault(id, 0)  # a new migration: no records to go on after
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
        if self._intents is not None:
            self._intents.open(id)  # if it cannot: `starting` records are committed synchronously

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
        """Record a device's drain or undrain. `starting` and `spawned` are committed before this returns
        (`starting` precedes the hooks: a process killed at any instant after it leaves a recoverable
        journal; `spawned` says an undrain's hooks are under way, not to be run twice); the others are
        queued like other records. Returns None, or the one-line reason a committed status could not be
        committed (it is then queued, and the caller must say so: the hooks still run).
        """
        action, status = DeviceAction(action), ActionStatus(status)
        seq = self._next_seq(migration_id)
        durable = (  # first: on the hot path, only this precedes the hooks
            status in _SYNC_STATUSES
            and not self._closed
            and self._intents is not None
            and self._intents.append(
                migration_id, intents.Intent(seq, device_id, action.value, status.value, at, detail)
            )
        )
        write = _action_write(migration_id, seq, device_id, action, status, at, detail)
        if durable or status not in _SYNC_STATUSES:
            self._put(write)  # durable already, or need not be: the journal gets it like any other record
            return None
        return self._write_now(
            write, "before its hooks started" if status is ActionStatus.STARTING else "at once"
        )

    def _write_now(self, write: _Write, when: str) -> str | None:
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
                    conn.execute(f"PRAGMA busy_timeout = {_WRITER_BUSY_MS}")
            except sqlite3.Error as exc:
                failure = f"the journal {self.path} could not record {write.what} {when}: {exc}"
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
        if self._intents is not None:  # its file goes once everything of it is committed
            with self._hold_lock:
                if self._holds(id):  # another thread's block still holds some: after them
                    self._commits_waiting.add(id)
                elif not self._closed:
                    self._queue.put(_Committed(id))

    def mark_stale(self, now: float) -> list[str]:
        """Mark migrations left 'running' by a process of this host that no longer exists as
        'interrupted', ended at `now`; return their ids. Waits until the marks are committed.

        A PID reused since by an unrelated process keeps its migration 'running' until that process ends.
        A migration `recover` has finished (`recovered` set) is never touched.
        """
        if self.readonly:
            raise OrchestratorError(f"the journal {self.path} is open read-only: nothing can be marked")
        running = self._select(
            "SELECT id, pid FROM migrations WHERE outcome = ? AND host = ? AND recovered IS NULL",
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

    def unfinished(self, host: str | None = None) -> list[MigrationRow]:
        """Migrations of `host` (default: this host) that `recover` has to finish: 'running' or
        'interrupted', not recovered yet, and whose process is gone (its PID is looked up on this
        machine; a migration whose process still lives is not unfinished). Oldest first.

        An interrupted migration that cleaned up before it ended is listed too: its device actions
        (`device_actions`, `still_drained`) say there is nothing left to undo.
        """
        sql = _SELECT_UNFINISHED if self._version >= 2 else _SELECT_UNFINISHED_V1
        rows = self._select(
            sql, (self._host if host is None else host, Outcome.RUNNING.value, Outcome.INTERRUPTED.value)
        )
        migrations = [MigrationRow._from_row(row) for row in rows]
        return [self._as_read(row) for row in migrations if not _process_alive(row.pid)]

    def mark_recovered(
        self,
        migration_id: str,
        outcome: Outcome | str,
        error: str | None,
        at: float,
        summary: Mapping[str, object] | None = None,
    ) -> bool:
        """Record that `recover` finished what a migration's process left undone: its outcome and
        error, `ended` (if it was not set), `recovered` = `at`, and `summary` if given. Committed
        before it returns.

        Returns False, changing nothing, if the migration does not exist or was already recovered.
        Raises OrchestratorError if it cannot be recorded.
        """
        outcome = Outcome(outcome)
        if outcome is Outcome.RUNNING:
            raise ValueError("a recovered migration cannot be 'running'")
        ticket = _Ticket()
        self._put(
            _Write(
                f"the recovery of migration {migration_id}",
                _MARK_RECOVERED,
                (outcome.value, error, at, at, None if summary is None else _json(summary), migration_id),
                ticket,
            )
        )
        self._wait(ticket.done, FLUSH_TIMEOUT_S)
        if ticket.error is not None:
            with self._failures_lock:
                if self._error is ticket.error:  # reported here, not again by flush()
                    self._error = None
            raise ticket.error
        if migration_id not in self._intents_lost:  # its records are all in the journal now
            intents.remove_file(intents.directory_of(self.path), migration_id)
        return ticket.rowcount > 0

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until everything written so far is committed.

        Raises OrchestratorError if the writer does not catch up within `timeout` seconds (not
        counting the time it waits for another process's write lock: at most `_RETRY_BUDGET_S` per
        record), or if a write failed since the last report (the first failure; it is then reported).
        """
        if not self._closed and not self.readonly:
            done = threading.Event()
            with self._hold_lock:
                held = self._held.get(threading.get_ident())
                if held:  # "everything written so far": this thread's block included
                    self._hand_over(held)
                self._queue.put(done)
            self._wait(done, timeout)
        self._report_error()

    def _wait(self, done: threading.Event, timeout: float) -> None:
        """Wait for the writer thread to reach `done`: up to `timeout` seconds, plus the time it spends
        waiting for another process's write lock (bounded by its retry budget)."""
        waited = 0.0
        while True:
            self._urgent.set()  # again each slice: another waiter's marker may have cleared it
            start = time.monotonic()
            if done.wait(min(_WAIT_SLICE_S, max(timeout - waited, 0.0))):
                return
            if not self._blocked:
                waited += time.monotonic() - start
            if waited >= timeout:
                raise EnvironmentProblem(
                    f"the journal {self.path} did not commit within {timeout:g} s",
                    "check the disk it is on, or whether another process holds it locked",
                )

    def close(self) -> None:
        """Commit everything written, stop the writer and close the journal (idempotent).

        Raises OrchestratorError if a write failed and was not yet reported.
        """
        if not self._closed:
            with self._hold_lock:  # nothing is queued after the writer's end
                self._closed = True
                # what blocks still hold never reaches the journal: their intents files stay
                held = {w.migration for ws in self._held.values() for w in ws if w.migration is not None}
                held |= self._commits_waiting
                if self._thread is not None:
                    self._queue.put(None)
            if self._thread is not None:
                self._urgent.set()
                self._thread.join()
            if self._intents is not None:  # after the writer: what it committed needs no file
                self._intents.close(keep=self._intents_lost | held)
            if self._writer_conn is not None:
                self._writer_conn.close()
            with self._read_lock:
                if self._reader is not None:
                    self._reader.close()
        self._report_error()

    def _report_error(self) -> None:
        with self._failures_lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_loop(self) -> None:
        conn = self._writer_conn
        assert conn is not None  # the thread only runs for a writable journal
        dirty = False  # written since the last checkpoint
        patient = True  # False after giving up on another process's lock: one attempt until one lands
        caught_up = True  # the queue was empty after the last item
        held: _Item = _NOTHING  # an item taken from the queue while gathering a batch
        while True:
            if held is not _NOTHING:
                item, held = held, _NOTHING
            else:
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
                self._urgent.clear()
                item.set()
                continue
            if isinstance(item, _Committed):
                if self._intents is not None:
                    self._intents.forget(item.migration, remove=item.migration not in self._intents_lost)
                continue
            if caught_up:
                self._urgent.wait(_GATHER_S)  # the first record after a pause: let its burst end
            batch = [item]
            while len(batch) < _BATCH_MAX:  # what is queued already, up to the next marker
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(more, _Write):
                    held = more
                    break
                batch.append(more)
            caught_up = held is _NOTHING and self._queue.empty()
            dirty = True
            if len(batch) > 1 and self._commit_together(conn, batch):
                continue
            for write in batch:  # one by one: a failed record must not take the others with it
                patient = self._commit_alone(conn, write, patient)

    def _commit_together(self, conn: sqlite3.Connection, batch: list[_Write]) -> bool:
        """Commit a batch of records as one transaction, in one hold of the interpreter's lock rather
        than one per record; False, having committed none of them, if any statement fails (the caller
        then commits them one by one, with the retries and failure reports of each)."""
        try:
            with self._write_lock:
                conn.execute("BEGIN")
                try:
                    counts = [conn.execute(write.sql, write.params).rowcount for write in batch]
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
        except Exception:  # sqlite3.Error, or a value SQLite cannot take (a lone surrogate): one by one
            return False
        for write, count in zip(batch, counts, strict=True):
            if write.ticket is not None:
                write.ticket.rowcount = count
                write.ticket.done.set()
        return True

    def _commit_alone(self, conn: sqlite3.Connection, write: _Write, patient: bool) -> bool:
        """Commit one record (see `_commit`), reporting its failure; whether the next one may wait."""
        error, locked_out = self._commit(conn, write, patient=patient)
        if error is not None:  # a failed write must not stop the ones after it
            self._failed(error)
            if write.migration is not None:  # keep its intents file: the only record left
                self._intents_lost.add(write.migration)
            if write.ticket is not None:
                write.ticket.error = error
            if not self._logged:
                self._logged = True
                _log.error("%s", error.line())
        if write.ticket is not None:
            write.ticket.done.set()
        return error is None or not locked_out

    def _commit(
        self, conn: sqlite3.Connection, write: _Write, *, patient: bool
    ) -> tuple[OrchestratorError | None, bool]:
        """Commit one record, retrying while another process holds the write lock (if `patient`: with
        backoff, up to the budget; else once). Returns the failure, if any, and whether it was that lock.
        """
        start = time.monotonic()
        delay = _RETRY_FIRST_S
        try:
            while True:
                try:
                    with self._write_lock:  # held for one attempt: a `starting` record waits no longer
                        cursor = conn.execute(write.sql, write.params)
                except sqlite3.Error as exc:
                    waited, budget = time.monotonic() - start, _RETRY_BUDGET_S
                    if not _is_busy(exc):
                        raise
                    if not patient or waited >= budget:
                        return self._locked_out(write, exc, waited if patient else None), True
                    self._blocked = True
                    time.sleep(min(delay, budget - waited))
                    delay = min(2 * delay, _RETRY_MAX_S)
                else:
                    if write.ticket is not None:
                        write.ticket.rowcount = cursor.rowcount
                    return None, False
        except Exception as exc:  # anything else: this record is lost, the next ones are tried
            hint = (
                _corruption_hint(self.path)
                if _is_corruption(self.path, exc, reading=False)
                else "check the free space and permissions of its directory"
            )
            lost = EnvironmentProblem(f"the journal {self.path} did not record {write.what}: {exc}", hint)
            return lost, False
        finally:
            self._blocked = False

    def _locked_out(self, write: _Write, exc: sqlite3.Error, waited: float | None) -> EnvironmentProblem:
        """The failure of a record the writer gave up on: another process held the lock too long
        (`waited` seconds), or still holds it after an earlier give-up (`waited` None)."""
        how = (
            f"another process held its write lock for {waited:.1f} s"
            if waited is not None
            else "another process still holds its write lock"
        )
        return EnvironmentProblem(
            f"the journal {self.path} did not record {write.what}: {how} ({exc})",
            f"see which processes have it open with: fuser -v {shell_uri(str(self.path))}",
        )

    # Reads: on their own connection, committed records only.

    def _select(
        self, sql: str, params: tuple[object, ...] = (), *, table_may_be_missing: bool = False
    ) -> list[sqlite3.Row]:
        """The rows of a query; any SQLite error is a one-line OrchestratorError naming the journal."""
        with self._read_lock:
            if self._closed:
                raise OrchestratorError(f"the journal {self.path} is closed; it cannot be read")
            if self._reader is None:  # a read-only journal that does not exist (yet): no rows
                return []
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                missing = isinstance(exc, sqlite3.OperationalError) and str(exc).startswith("no such table")
                if table_may_be_missing and missing:
                    return []
                raise _db_error(self.path, exc, reading=True) from None

    def _as_read(self, row: MigrationRow) -> MigrationRow:
        """The row as `open` would have left it: read-only, a dead process's migration is not marked
        in the file, but it reads as interrupted all the same."""
        if (
            self.readonly
            and row.outcome is Outcome.RUNNING
            and row.recovered is None
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

    def children(self, parent: str) -> list[MigrationRow]:
        """The migrations of an evacuation (its items), in the order they started."""
        rows = self._select("SELECT * FROM migrations WHERE parent = ? ORDER BY started, id", (parent,))
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
        actions = self.device_actions(migration.id)
        return MigrationRecord(
            migration,
            tuple(EventRow._from_row(row) for row in events),
            tuple(HookRunRow._from_row(row) for row in runs),
            actions,
        )

    def device_actions(self, migration_id: str) -> tuple[DeviceActionRow, ...]:
        """A migration's drain and undrain steps in sequence order (committed ones; none for an unknown
        id, or in a schema-1 journal read as it is: none were recorded then)."""
        committed = self._committed_actions(migration_id)
        return tuple(sorted([*committed, *self._uncommitted(migration_id, committed)], key=lambda r: r.seq))

    def _committed_actions(self, migration_id: str) -> list[DeviceActionRow]:
        rows = self._select(
            "SELECT * FROM device_actions WHERE migration_id = ? ORDER BY seq",
            (migration_id,),
            table_may_be_missing=True,
        )
        return [DeviceActionRow._from_row(row) for row in rows]

    def _uncommitted(self, migration_id: str, committed: Iterable[DeviceActionRow]) -> list[DeviceActionRow]:
        """The records of a migration's intents file that the journal does not have (its process died
        before its writer committed them)."""
        seqs = {row.seq for row in committed}
        found = []
        for intent in intents.read(intents.directory_of(self.path), migration_id):
            if intent.seq in seqs:
                continue
            try:
                action, status = DeviceAction(intent.action), ActionStatus(intent.status)
            except ValueError:
                continue
            seqs.add(intent.seq)
            found.append(
                DeviceActionRow(intent.seq, intent.device_id, action, status, intent.at, intent.detail)
            )
        return found

    def adopt_intents(self, migration_id: str) -> int:
        """Commit into the journal the records of a dead migration that only its intents file has (what
        `recover` does first, so the journal tells the truth); how many. Raises OrchestratorError if
        they cannot be committed."""
        missing = self._uncommitted(migration_id, self._committed_actions(migration_id))
        for row in missing:
            self._put(
                _action_write(
                    migration_id,
                    row.seq,
                    row.device_id,
                    row.action,
                    row.status,
                    row.at,
                    row.detail,
                    ", from its intents file",
                )
            )
        if missing:
            self.flush()
        return len(missing)
