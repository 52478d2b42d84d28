"""One migration per VM at a time: an exclusive lock per (source host, domain UUID).

A migration takes `MigrationLock.acquire(lock_dir(journal), source_uri, domain_uuid, migration_id)`
before it changes anything, and releases it when it has finished (undrained what it drained). A
second run for the same VM from the same source fails at once with MigrationBusy (exit 2), naming the
migration that holds the lock, its PID and since when; with `wait_s` it waits that long first.

Decisions:

- The lock is `flock(LOCK_EX | LOCK_NB)` on `<journal's directory>/locks/<sha256(source NUL uuid)[:24]>
  .lock`. The kernel drops it when the holder's process dies, however it dies (SIGKILL, OOM): a
  killed orchestrator never leaves a stale lock, and nothing has to guess whether a PID is still
  the holder. flock conflicts between two open file descriptions even in one process.
- The name is a hash: a hostile URI or UUID (slashes, "..", NUL) cannot name a path outside the
  directory. Lock files are never deleted (deleting a flock'ed file races with its next opener);
  there is one small file per (source, VM) ever migrated.
- After locking, the holder writes one JSON line (migration_id, pid, domain_uuid, source, started)
  so that a second run can name it; releasing empties the file, then closes it.
- The descriptor is close-on-exec: hooks started while the lock is held do not inherit it (a hook
  outliving the orchestrator must not keep the VM locked). A child made by fork() without exec
  shares it, and the lock lasts until both have closed it.
- The source is the URI as given: two spellings of the same host (`qemu:///system` and
  `qemu+ssh://a/system`) are different locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from orchestrator.digest import sha256_hex
from orchestrator.errors import BadInput, EnvironmentProblem, shell_uri

LOCKS_DIRNAME: Final = "locks"
_POLL_FIRST_S: Final = 0.01  # waiting for a lock: first sleep, doubling to ...
_POLL_MAX_S: Final = 0.2
_HOLDER_READ_S: Final = 0.2  # how long a second run waits for the holder's line to be written
_HOLDER_MAX_BYTES: Final = 4096
_SHOWN_CHARS: Final = 200
_DIR_HINT: Final = "run as root, or use --journal PATH (the locks are kept next to the journal)"


def _shown(text: str) -> str:
    """`text` for a one-line message: control characters as '?', bounded."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= _SHOWN_CHARS else clean[: _SHOWN_CHARS - 3] + "..."


def lock_dir(journal_path: Path) -> Path:
    """The directory of migration locks: `<the journal's directory>/locks`, created (0700) if missing.

    Raises EnvironmentProblem, in one line naming it, if it cannot be created or is not a directory.
    """
    directory = journal_path.expanduser().absolute().parent / LOCKS_DIRNAME
    try:
        directory.parent.mkdir(mode=0o750, parents=True, exist_ok=True)  # as Journal.open makes it
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.filename is not None and Path(exc.filename) != directory:
            reason = f"{exc.filename}: {reason}"
        raise EnvironmentProblem(
            f"cannot create the migration lock directory {directory}: {reason}", _DIR_HINT
        ) from None
    if not directory.is_dir():
        raise EnvironmentProblem(f"the migration lock directory {directory} is not a directory", _DIR_HINT)
    return directory


def lock_path(directory: Path, source: str, domain_uuid: str) -> Path:
    """The lock file of a VM (`domain_uuid`) on a source host (`source`, its URI) in `directory`."""
    key = f"{source}\0{domain_uuid}".encode("utf-8", "surrogatepass")
    return directory / f"{sha256_hex(key)[:24]}.lock"


@dataclass(frozen=True)
class LockHolder:
    """What the holder of a migration lock wrote into it."""

    migration_id: str
    pid: int
    domain_uuid: str
    source: str
    started: float

    def line(self) -> bytes:
        """The record as written into the lock file: one JSON line."""
        return (json.dumps(asdict(self), separators=(",", ":")) + "\n").encode("utf-8", "surrogatepass")

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        """The record in `data`, or None if it is not (yet) a whole one."""
        try:
            fields = json.loads(data.decode("utf-8", "surrogatepass"))
            holder = cls(
                migration_id=str(fields["migration_id"]),
                pid=int(fields["pid"]),
                domain_uuid=str(fields["domain_uuid"]),
                source=str(fields["source"]),
                started=float(fields["started"]),
            )
        except (ValueError, TypeError, KeyError):
            return None
        return holder if holder.pid > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


class MigrationBusy(BadInput):
    """Another migration of the same VM from the same source holds its lock (exit 2)."""

    def __init__(self, domain_uuid: str, source: str, holder: LockHolder | None) -> None:
        self.holder = holder
        vm = f"VM {_shown(domain_uuid)} is already being migrated from {_shown(source)}"
        if holder is None:
            super().__init__(
                f"{vm} by another orchestrator (it has not written its record yet)",
                "wait for it, or see: orchestrator history",
            )
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started))
        migration_id = _shown(holder.migration_id)
        super().__init__(
            f"{vm} by migration {migration_id} (pid {holder.pid}, since {since})",
            f"wait for it, or see: orchestrator history {migration_id}",
        )


def _read_holder(fd: int) -> LockHolder | None:
    """The holder's record, read through our own descriptor of the lock file. Waits briefly for a
    holder that has locked but not written yet (or whose file still holds a killed predecessor's)."""
    deadline = time.monotonic() + _HOLDER_READ_S
    while True:
        holder = LockHolder.parse(os.pread(fd, _HOLDER_MAX_BYTES, 0))
        if (holder is not None and _alive(holder.pid)) or time.monotonic() >= deadline:
            return holder if holder is not None and _alive(holder.pid) else None
        time.sleep(_POLL_FIRST_S)


class MigrationLock:
    """The lock of one VM's migrations from one source, held by this process until `release()`.
    A context manager (releasing on exit)."""

    def __init__(self, path: Path, fd: int, holder: LockHolder) -> None:
        """Use `MigrationLock.acquire`."""
        self.path = path
        self.holder = holder
        self._fd: int | None = fd
        self._release_lock = threading.Lock()

    @classmethod
    def acquire(
        cls, directory: Path, source: str, domain_uuid: str, migration_id: str, *, wait_s: float = 0.0
    ) -> MigrationLock:
        """Lock the VM `domain_uuid` of the source host `source` (its URI) in `directory` (see
        `lock_dir`) for `migration_id`; if another holds it, wait up to `wait_s` seconds.

        Raises MigrationBusy naming the holder if it is still held then, EnvironmentProblem if the
        lock file cannot be opened or locked.
        """
        path = lock_path(directory, source, domain_uuid)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot open the migration lock {path}: {exc.strerror or exc}", _DIR_HINT
            ) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise EnvironmentProblem(
                    f"the migration lock {path} is not a regular file",
                    f"remove it: rm {shell_uri(str(path))}",
                )
            cls._lock(fd, path, source, domain_uuid, wait_s)
            holder = LockHolder(migration_id, os.getpid(), domain_uuid, source, time.time())
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.line(), 0)
        except OSError as exc:
            os.close(fd)
            raise EnvironmentProblem(
                f"cannot lock the migration lock {path}: {exc.strerror or exc}",
                "check the file system the journal is on (flock must work there)",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, holder)

    @staticmethod
    def _lock(fd: int, path: Path, source: str, domain_uuid: str, wait_s: float) -> None:
        deadline = time.monotonic() + max(wait_s, 0.0)
        delay = _POLL_FIRST_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MigrationBusy(domain_uuid, source, _read_holder(fd)) from None
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, _POLL_MAX_S)
            else:
                return

    @property
    def held(self) -> bool:
        """True until released."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (idempotent): its record is emptied, then its descriptor closed."""
        with self._release_lock:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):  # no stale record for the next reader
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # the kernel drops the flock with this open file description's last descriptor

    def __enter__(self) -> MigrationLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
