"""The journal's SQLite file: where it is, its schema and upgrades, connections, the check for damage,
and the one-line errors for everything that can go wrong with it (never a traceback).

- A damaged file: `quick_check` raises EnvironmentProblem (exit 7) naming the file and how to move it
  aside or salvage it; `check_in_background` runs the same check next to a command's start-up.
- A full disk, a file we may not write, another process's lock: each its own line, with its cause
  (SQLite's "cannot rollback - no transaction is active" hides a full disk: the cause is looked up).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Final

from orchestrator.core.errors import EnvironmentProblem, OrchestratorError, shell_uri
from orchestrator.core.records import EventKind

SCHEMA_VERSION: Final = 3
DEFAULT_PATH: Final = Path("/var/lib/orchestrator/journal.sqlite")
ENV_VAR: Final = "ORCH_JOURNAL"
PATH_HINT: Final = f"use --journal PATH (or set {ENV_VAR})"
BUSY_TIMEOUT_S: Final = 5.0  # opening, importing and reading wait this long for another process's lock
_DETAIL_CHARS: Final = 200
FULL_BELOW_BYTES: Final = 256 * 1024  # a disk with less room than this counts as full
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
MIGRATION_COLUMNS: Final = tuple(
    "id kind domain source_uri destination_uri policy started ended outcome changed error exit_code summary "  # noqa: SIM905
    "parent pid host drain_mode policy_text policy_sha256 phase recovered".split()
)
_COLUMN_LIST: Final = ", ".join(MIGRATION_COLUMNS)
_V3_COPY: Final = f"INSERT INTO migrations_v3 ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM migrations"  # noqa: S608 - constants
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


def journal_path(explicit: Path | None = None) -> Path:
    """The journal to use: `explicit` if given, else $ORCH_JOURNAL if set, else DEFAULT_PATH."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(ENV_VAR)
    return Path(from_env) if from_env else DEFAULT_PATH


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


def db_error(path: Path, exc: BaseException, *, reading: bool = False) -> OrchestratorError:
    """The one-line error for an SQLite (or OS) error met opening or reading the journal: never a
    traceback. A damaged file says how to move it aside; a lock names the way to find its holder."""
    if _is_busy(exc):
        return EnvironmentProblem(
            f"the journal {path} is locked by another process: {exc}",
            f"retry when it is done; see which processes have it open with: fuser -v {shell_uri(str(path))}",
        )
    if _is_corruption(path, exc, reading=reading):
        return _corrupt(path, str(exc))
    full = disk_full(path, exc)
    if full is not None:
        return full
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
        return EnvironmentProblem(f"cannot open the journal {path}: {reason}", f"run as root or {PATH_HINT}")
    return EnvironmentProblem(f"cannot use {path} as the journal: {reason}", PATH_HINT)


def disk_full(path: Path, exc: BaseException) -> EnvironmentProblem | None:
    """The one-line error when the journal's disk is full: SQLite says so, the OS does, or SQLite
    failed in a way that hides it (its rollback of a write the disk refused fails with "cannot
    rollback - no transaction is active") while the disk has no room."""
    full = _sqlite_code(exc) == sqlite3.SQLITE_FULL
    full = full or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
    if not full and isinstance(exc, sqlite3.Error):
        with contextlib.suppress(OSError):
            disk = os.statvfs(path.parent)
            full = disk.f_bavail * disk.f_frsize < FULL_BELOW_BYTES
    if not full:
        return None
    return EnvironmentProblem(
        f"the disk of the journal {path} is full (SQLite: {exc})",
        f"free some space there, or {PATH_HINT} on another disk",
    )


def require_sqlite(path: Path) -> None:
    """Refuse, without letting SQLite touch it, a non-empty file that is not an SQLite database (a file
    moved over the journal, say): SQLite could apply a left-over -wal file to it."""
    with contextlib.suppress(OSError):
        if path.stat().st_size > 0 and not _is_sqlite_file(path):
            raise EnvironmentProblem(
                f"the journal {path} is not an SQLite database (was another file put in its place?)",
                f"move it aside: mv {shell_uri(str(path))} {shell_uri(f'{path}.not-a-journal')} (a new "
                f"journal is created on the next run), or {PATH_HINT}",
            )


def connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: every statement commits on its own, so one record is one transaction
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def connect_existing(path: Path) -> sqlite3.Connection:
    """A query-only connection to a journal that must already exist: never creates the file.

    `mode=rw` when we may write there, so that closing it cleans SQLite's -wal/-shm side files
    like any last connection does (nothing else is written: query_only); `mode=ro` otherwise.
    """
    require_sqlite(path)
    mode = "rw" if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK) else "ro"
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"
    conn = sqlite3.connect(
        uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def upgrade(version: int) -> list[str]:
    """The statements that bring a journal of schema `version` (0: a new file) to SCHEMA_VERSION."""
    first, rest = _SCHEMA.split(_V2_MARKER, 1)
    text = (first if version < 1 else "") + (_V2_MARKER + rest if version < 2 else "") + _V3
    return [statement for statement in text.split(";") if statement.strip()]


def quick_check(conn: sqlite3.Connection, path: Path) -> None:
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
    whole file, which takes longer as the journal grows, and SQLite does that without the
    interpreter's lock, next to the imports and the set-up that come first."""
    path = path.expanduser().absolute()
    verdict: list[JournalCorrupt | bool] = []

    def run() -> None:
        try:
            if not path.is_file():
                verdict.append(True)
                return
            conn = connect_existing(path)
            try:
                quick_check(conn, path)
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


def newer_schema(path: Path, version: int) -> EnvironmentProblem:
    """The one-line error for a journal whose schema is newer than this orchestrator's."""
    return EnvironmentProblem(
        f"the journal {path} has schema version {version}, newer than this orchestrator's {SCHEMA_VERSION}",
        f"upgrade the orchestrator or {PATH_HINT}",
    )


def create_schema(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # in WAL: durable at checkpoints, never corrupt
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return  # nothing to create: no write lock needed (another process may hold it for a while)
    conn.execute("BEGIN IMMEDIATE")  # two processes creating a new journal at once: one waits
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise newer_schema(path, version)
        if version < SCHEMA_VERSION:
            for statement in upgrade(version):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
