"""The run log: one append-only file per migration, the truth while it runs.

Every step that changes the world is written down before it is taken, as one line of JSON written
with ONE write() by the thread that acts; the hook supervisor (orchestrator.edges.supervisor) writes each
hook's start and end into the same file itself. A killed orchestrator therefore leaves a complete
record of what it did and of every hook, and `recover` reads it instead of guessing. When the run
ends (or `recover` finishes it) the journal imports the file into SQLite in one transaction and
removes it (orchestrator.edges.journal).

Layout: `<journal>.runs/<migration id>.log`, in a directory of our own that nobody else may write to.
Room is reserved when the run begins: RESERVE bytes of zeros (posix_fallocate), written from the
start through ONE open file description that the orchestrator and its supervisor share (passed by
SCM_RIGHTS): Linux serialises the write()s of one description to a regular file, so records never
overlap and each lands after the one before. Where the records end, the zeros begin. A run that
cannot reserve its room is refused before it acts (EnvironmentProblem, exit 7, with the real cause).

A filling disk: while less than MARGIN is left, the writer reserves another CHUNK; when it cannot,
the records that only tell the story (events, notes, phases, the report) are dropped and counted,
while the ones that carry the safety promise (device actions, hook starts and ends, the outcome)
still fit in the margin.

Records (`k` is the kind; times are epoch seconds):
  begin       the migration: id, kind, domain, source_uri, destination_uri, policy, policy_text,
              policy_sha256, drain_mode, parent, pid, host, started, supervisor (its pid)
  phase       phase, at
  event       host, role, kind, name, device_id, state, qemu_time, received, data
  action      device_id, action (drain|undrain), status (starting|done|failed|ended), at, detail
  hook        a hook's result the orchestrator saw itself (an armed hook's arming, answer, exit)
  hook-start  the supervisor started a process: run, hook, label, trigger, device_id, argv, attempt,
              pid, start (clock ticks after boot), tag (ORCH_HOOK_RUN), started, timeout_ms, armed
  hook-end    ... and it ended: run, ended, duration_ms, exit_code, timed_out, error, output_tail
  supervised  the supervisor has nothing of this run left running, and will start nothing more in it
  summary     the report, as `--json` prints it
  end         outcome, changed, error, exit_code, ended, dropped (records dropped for lack of room)
  recovered   recover's verdict on a run whose process died: outcome, error, at, summary
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from orchestrator.core.errors import EnvironmentProblem

RESERVE: Final = 256 * 1024  # reserved when a run begins
CHUNK: Final = 256 * 1024  # reserved again while the room left is below MARGIN
MARGIN: Final = 64 * 1024  # kept for the vital records once nothing more can be reserved
MAX_READ: Final = 64 * 1024 * 1024
_NAME_CHARS: Final = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
# ensure_ascii: a lone surrogate (an odd event's JSON) is written escaped, never fails the write
_encode: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str).encode


def directory_of(journal: Path) -> Path:
    """Where the run logs of the journal at `journal` are kept."""
    return journal.with_name(journal.name + ".runs")


def path_of(directory: Path, migration_id: str) -> Path:
    """The run log of a migration in `directory`."""
    return directory / f"{migration_id}.log"


def valid_id(migration_id: str) -> bool:
    """Whether `migration_id` can name a run log (it becomes a file name)."""
    return bool(migration_id) and len(migration_id) <= 64 and set(migration_id) <= _NAME_CHARS


def _ours(directory: Path) -> bool:
    """A real directory (not a link to one) of this user that nobody else may write to."""
    try:
        info = directory.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def _room_error(path: Path, exc: OSError) -> EnvironmentProblem:
    reason = exc.strerror or str(exc)
    return EnvironmentProblem(
        f"cannot reserve room for the run log {path}: {reason}",
        "free some space on that disk (or use --journal PATH elsewhere); nothing was changed",
    )


class RunLog:
    """One migration's run log, open for writing. Thread-safe: each record is one write()."""

    def __init__(self, path: Path, fd: int, reserved: int) -> None:
        self.path = path
        self._fd = fd
        self._reserved = reserved
        self._lock = threading.Lock()  # the room check and a reservation, not the write itself
        self.dropped = 0  # story records dropped for lack of room
        self.failed: str | None = None  # the first vital record that could not be written, and why

    @classmethod
    def create(cls, directory: Path, migration_id: str, reserve: int = RESERVE) -> RunLog:
        """A new run log with `reserve` bytes of room. Raises EnvironmentProblem (nothing created)
        when the directory is not ours or the room cannot be reserved."""
        if not valid_id(migration_id):
            raise ValueError(f"invalid migration id {migration_id!r}")
        path = path_of(directory, migration_id)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot create the run log directory {directory}: {exc.strerror or exc}",
                "run as root, or use --journal PATH (run logs are kept next to the journal)",
            ) from None
        if not _ours(directory):
            raise EnvironmentProblem(
                f"the run log directory {directory} is not a directory of this user's that only it may "
                "write to",
                f"remove it or fix it: chown {os.geteuid()} {directory} && chmod 0700 {directory}",
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for attempt in range(3):  # another process may remove the directory, emptied, in between
            try:
                fd = os.open(path, flags, 0o600)
                break
            except FileNotFoundError as exc:
                if attempt == 2:
                    raise _room_error(path, exc) from None
                with contextlib.suppress(OSError):
                    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise _room_error(path, exc) from None
        try:
            os.posix_fallocate(fd, 0, reserve)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise _room_error(path, exc) from None
        return cls(path, fd, reserve)

    @classmethod
    def reopen(cls, path: Path) -> RunLog:
        """The run log of a run whose process died, to go on writing after its last record (`recover`).
        Raises OSError when it cannot be opened."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(fd, MAX_READ, 0)
            end = _records_end(data)
            size = os.fstat(fd).st_size
            os.lseek(fd, end, os.SEEK_SET)
        except OSError:
            os.close(fd)
            raise
        log = cls(path, fd, size)
        log._reserve_more()  # room for recovery's records, if there is any
        return log

    @property
    def fd(self) -> int:
        """The open file description, for the supervisor (it writes its records through it)."""
        return self._fd

    def write(self, record: dict[str, Any], *, vital: bool = False) -> bool:
        """Append one record with one write(); True when it is written whole. A `vital` record (a
        device action, the outcome) is written even when the room is short; another one is dropped
        (and counted) rather than take the margin the vital ones need."""
        line = (_encode(record) + "\n").encode()
        if not vital and not self._room_for(len(line)):
            self.dropped += 1
            return False
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            written, error = 0, exc.strerror or str(exc)
        else:
            error = "written in part" if written != len(line) else ""
        if not error:
            return True
        if vital and self.failed is None:
            self.failed = f"the run log {self.path} could not record a {record.get('k')} record: {error}"
        if not vital:
            self.dropped += 1
        return False

    def _room_for(self, size: int) -> bool:
        with self._lock:
            try:
                offset = os.lseek(self._fd, 0, os.SEEK_CUR)
            except OSError:
                return False
            if offset + size + MARGIN <= self._reserved:
                return True
            return self._reserve_more() and offset + size + MARGIN <= self._reserved

    def _reserve_more(self) -> bool:
        try:
            os.posix_fallocate(self._fd, self._reserved, CHUNK)
        except OSError:
            return False
        self._reserved += CHUNK
        return True

    def close(self) -> None:
        """Close the file (the supervisor may still hold the description: it writes on)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def remove(self) -> None:
        """Close and delete it (its records are in the journal), and the directory once it is empty."""
        self.close()
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: other runs' logs
            self.path.parent.rmdir()


def _records_end(data: bytes) -> int:
    """Where the records of a run log's bytes end (the zeros after them, or the end of the file)."""
    zero = data.find(b"\0")
    end = len(data) if zero < 0 else zero
    newline = data.rfind(b"\n", 0, end)
    return 0 if newline < 0 else newline + 1


def parse(data: bytes) -> Iterator[dict[str, Any]]:
    """The records of a run log's bytes, in order; a line that is not a whole record is skipped."""
    for raw in data[: _records_end(data)].splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("k"), str):
            yield record


def read(path: Path) -> list[dict[str, Any]]:
    """The records of the run log at `path`; none when it cannot be read."""
    try:
        with open(path, "rb") as handle:  # noqa: PTH123 - a bounded read
            data = handle.read(MAX_READ)
    except OSError:
        return []
    return list(parse(data))


def pending(directory: Path) -> list[Path]:
    """The run logs in `directory` that no journal has imported yet, oldest first."""
    try:
        found = [p for p in directory.glob("*.log") if valid_id(p.stem)]
    except OSError:
        return []

    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=lambda p: (mtime(p), p.name))
