"""Intents: the records that must be durable at once, appended to a file of the migration's own.

The invariant (phases.py, recovery.py): a drain or an undrain is written down as `starting` BEFORE
any of its hooks starts, so that a process killed at any instant after that leaves something
`recover` finds. The journal queues that record like any other; this file makes it durable at once,
with one write() of one line (a few microseconds) where a synchronous SQLite commit took ~20 us alone
and up to ~2 ms behind the journal's writer thread (measured on the lab's drain path: p50 56 us, p99
1.9 ms). Both survive the process being killed the same way (the page cache keeps a write() as it
keeps SQLite's WAL, which at synchronous=NORMAL does no more against power loss either). An undrain's
`spawned` record (its hook processes are under way: `recover` must not run it again) goes the same way.

Layout: next to the journal `J`, a directory `J.intents/` holding one file per migration, named by its
id, created when the migration begins and removed once every record of it is committed in the
journal (or, for a migration whose process died, once `recover` has copied the records into the
journal). A line is one JSON array: [seq, device_id, action, status, at, detail], with the sequence
number the journal gave the same record, so a record found in both is one record. What cannot be
parsed (a line cut by a full disk) is skipped. Anything that stops the file from being written makes
the journal commit the record synchronously instead, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import NamedTuple

# One encoder for every line: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
_NAME_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


class Intent(NamedTuple):
    """One line of an intents file: a device action as the journal numbered it."""

    seq: int
    device_id: str
    action: str
    status: str
    at: float
    detail: str | None


def directory_of(journal: Path) -> Path:
    """Where the intents of the journal at `journal` are kept."""
    return journal.with_name(journal.name + ".intents")


def _safe(migration_id: str) -> bool:
    return bool(migration_id) and len(migration_id) <= 64 and set(migration_id) <= _NAME_CHARS


class IntentLog:
    """The intents files of one writable journal: opened per migration, appended to, removed."""

    def __init__(self, journal: Path) -> None:
        self.directory = directory_of(journal)
        self._lock = threading.Lock()
        self._files: dict[str, int] = {}  # migration id -> its open file (O_APPEND)

    def open(self, migration_id: str) -> bool:
        """Create the migration's file; False (and the journal commits synchronously) if it cannot."""
        if not _safe(migration_id):
            return False
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _attempt in range(3):  # another process may remove the directory, emptied, in between
            try:
                self.directory.mkdir(mode=0o700, exist_ok=True)
                if not _ours(self.directory):
                    return False
                fd = os.open(self.directory / migration_id, flags, 0o600)
                break
            except FileNotFoundError:
                continue
            except OSError:
                return False
        else:
            return False
        with self._lock:
            old = self._files.pop(migration_id, None)
            self._files[migration_id] = fd
        if old is not None:  # pragma: no cover - an id is begun once
            os.close(old)
        return True

    def append(self, migration_id: str, intent: Intent) -> bool:
        """Write one record, whole, before returning; False if it could not be (not open, disk full)."""
        line = (_encode(intent) + "\n").encode()
        with self._lock:
            fd = self._files.get(migration_id)
            if fd is None:
                return False
            try:
                return os.write(fd, line) == len(line)
            except OSError:
                return False

    def forget(self, migration_id: str, *, remove: bool) -> None:
        """Close the migration's file; remove it if `remove` (all its records are in the journal)."""
        with self._lock:
            fd = self._files.pop(migration_id, None)
        if fd is not None:
            os.close(fd)
        if remove:
            remove_file(self.directory, migration_id)

    def close(self, keep: Collection[str]) -> None:
        """Close every file still open, removing all but those of the migrations in `keep` (the
        journal, closed, has committed every record of the others)."""
        with self._lock:
            files, self._files = self._files, {}
        for migration_id, fd in files.items():
            os.close(fd)
            if migration_id not in keep:
                remove_file(self.directory, migration_id)


def _ours(directory: Path) -> bool:
    """A real directory (not a link to one) of this user that nobody else may write to: what a
    drain's only durable record may be written into."""
    try:
        info = directory.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def remove_file(directory: Path, migration_id: str) -> None:
    """Remove a migration's intents file, if there is one, and the directory once it is empty."""
    if _safe(migration_id):
        with contextlib.suppress(OSError):
            (directory / migration_id).unlink()
        with contextlib.suppress(OSError):  # not empty (other migrations): it stays
            directory.rmdir()


def read(directory: Path, migration_id: str) -> list[Intent]:
    """The records of a migration's intents file (none if it has none); unreadable lines skipped."""
    if not _safe(migration_id):
        return []
    try:
        with open(directory / migration_id, "rb") as handle:  # noqa: PTH123 - bounded read below
            text = handle.read(16 * 1024 * 1024)
    except OSError:
        return []
    return list(_parse(text))


def _parse(text: bytes) -> Iterator[Intent]:
    for raw in text.splitlines():
        try:
            seq, device, action, status, at, detail = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if (
            isinstance(seq, int)
            and isinstance(device, str)
            and isinstance(action, str)
            and isinstance(status, str)
            and isinstance(at, int | float)
            and (detail is None or isinstance(detail, str))
        ):
            yield Intent(seq, device, action, status, float(at), detail)
