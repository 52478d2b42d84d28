"""One migration per VM per host, whatever journal each run uses: an exclusive lock per domain UUID.

A migration takes `MigrationLock.acquire(lock_dir(), domain_uuid, migration_id, ...)` before it
changes anything (before its pre-flight looks for a running job), and releases it when it has
finished (undrained what it drained). A second run for the same VM fails at once with MigrationBusy
(exit 2), naming the VM, the migration that holds the lock, its PID and since when; with `wait_s`
it waits that long first. `recover` takes the same lock.

Decisions:

- The lock is `flock(LOCK_EX | LOCK_NB)` on `<runtime dir>/locks/<sha256(uuid)[:24]>.lock`, the
  runtime directory being fixed for the host (`/run/orchestrator` for root; `$ORCH_RUNTIME_DIR`
  overrides it): two runs with different journals still meet there. The kernel drops the lock when
  the holder's process dies, however it dies (SIGKILL, OOM): a killed orchestrator never leaves a
  stale lock, and nothing has to guess whether a PID is still the holder.
- The key is the UUID alone: the same VM reached through two spellings of its host's URI is one lock.
- The name is a hash: a hostile UUID (slashes, "..", NUL) cannot name a path outside the directory.
  Lock files are never deleted (deleting a flock'ed file races with its next opener).
- After locking, the holder writes one JSON line (migration_id, pid, domain_uuid, domain, source,
  started) so that a second run can name it; releasing empties the file, then closes it.
- The descriptor is close-on-exec, and the hook supervisor is forked before any lock is taken: a
  hook or the supervisor outliving the orchestrator never keeps the VM locked.
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

from orchestrator.core.digest import sha256_hex
from orchestrator.core.errors import BadInput, EnvironmentProblem, shell_uri
from orchestrator.edges import procfs

LOCKS_DIRNAME: Final = "locks"
_POLL_FIRST_S: Final = 0.01  # waiting for a lock: first sleep, doubling to ...
_POLL_MAX_S: Final = 0.2
_HOLDER_READ_S: Final = 0.2  # how long a second run waits for the holder's line to be written
_HOLDER_MAX_BYTES: Final = 65536
_FIELD_CHARS: Final = 1000  # of each text field of a holder's record (escaped: at most 6 bytes a char)
_SHOWN_CHARS: Final = 200
_DIR_HINT: Final = f"run as root, or set {'ORCH_RUNTIME_DIR'} to a directory of your own"


def _shown(text: str) -> str:
    """`text` for a one-line message: control characters as '?', bounded."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= _SHOWN_CHARS else clean[: _SHOWN_CHARS - 3] + "..."


RUNTIME_ENV: Final = "ORCH_RUNTIME_DIR"


def runtime_dir() -> Path:
    """This host's runtime directory of the orchestrator: $ORCH_RUNTIME_DIR, else /run/orchestrator for
    root, else $XDG_RUNTIME_DIR/orchestrator, else /tmp/orchestrator-UID. A relative $ORCH_RUNTIME_DIR
    is refused: runs from two working directories would take two locks of one VM."""
    override = os.environ.get(RUNTIME_ENV)
    if override:
        if not Path(override).is_absolute():
            raise EnvironmentProblem(
                f"{RUNTIME_ENV} must be an absolute path, not {_shown(override)!r}", "give the full path"
            )
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/orchestrator")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "orchestrator" if xdg else Path(f"/tmp/orchestrator-{os.geteuid()}")


def lock_dir() -> Path:
    """The directory of migration locks: `<runtime dir>/locks`, both created (0700) if missing, both
    directories of ours nobody else may write to (another user who could rename `locks` could make two
    runs of one VM take two locks). Raises EnvironmentProblem, in one line naming it, if it cannot."""
    runtime = runtime_dir()
    directory = runtime / LOCKS_DIRNAME
    try:
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        infos = [(runtime, runtime.lstat()), (directory, directory.lstat())]
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.filename is not None and Path(exc.filename) != directory:
            reason = f"{_shown(str(exc.filename))}: {reason}"
        raise EnvironmentProblem(
            f"cannot create the migration lock directory {_shown(str(directory))}: {reason}", _DIR_HINT
        ) from None
    for path, info in infos:
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise EnvironmentProblem(
                f"the migration lock directory {_shown(str(path))} is not a directory of yours only you "
                "may write to",
                f"remove it, or set {RUNTIME_ENV} to a directory of your own",
            )
    return directory


def lock_path(directory: Path, domain_uuid: str) -> Path:
    """The lock file of the VM `domain_uuid` in `directory`."""
    return directory / f"{sha256_hex(domain_uuid.encode('utf-8', 'surrogatepass'))[:24]}.lock"


@dataclass(frozen=True)
class LockHolder:
    """What the holder of a migration lock wrote into it."""

    migration_id: str
    pid: int
    domain_uuid: str
    source: str
    started: float
    domain: str = ""  # its name, for the messages

    def line(self) -> bytes:
        """The record as written into the lock file: one JSON line, its text fields bounded so that it
        is always read back whole."""
        fields = {k: v[:_FIELD_CHARS] if isinstance(v, str) else v for k, v in asdict(self).items()}
        return (json.dumps(fields, separators=(",", ":")) + "\n").encode("utf-8", "surrogatepass")

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
                domain=str(fields.get("domain", "")),
            )
        except (ValueError, TypeError, KeyError):
            return None
        return holder if holder.pid > 0 else None


class MigrationBusy(BadInput):
    """Another migration of the same VM holds its lock (exit 2)."""

    def __init__(self, domain: str, domain_uuid: str, holder: LockHolder | None) -> None:
        self.holder = holder
        vm = f"{_shown(domain)} (UUID {_shown(domain_uuid)})" if domain else f"the VM {_shown(domain_uuid)}"
        if holder is None:
            super().__init__(
                f"{vm} is already being migrated by another orchestrator (it has not written its record yet)",
                "wait for it (--lock-wait SECONDS), or see: orchestrator history",
            )
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started))
        migration_id = _shown(holder.migration_id)
        super().__init__(
            f"{vm} is already being migrated from {_shown(holder.source)} by migration {migration_id} "
            f"(pid {holder.pid}, since {since})",
            f"wait for it (--lock-wait SECONDS), or see: orchestrator history {migration_id}",
        )


def _read_holder(fd: int) -> LockHolder | None:
    """The holder's record, read through our own descriptor of the lock file. Waits briefly for a
    holder that has locked but not written yet (or whose file still holds a killed predecessor's)."""
    deadline = time.monotonic() + _HOLDER_READ_S
    while True:
        holder = LockHolder.parse(os.pread(fd, _HOLDER_MAX_BYTES, 0))
        alive = holder is not None and procfs.alive(holder.pid)
        if alive or time.monotonic() >= deadline:
            return holder if alive else None
        time.sleep(_POLL_FIRST_S)


class MigrationLock:
    """The lock of one VM's migrations on this host, held by this process until `release()`.
    A context manager (releasing on exit)."""

    def __init__(self, path: Path, fd: int, holder: LockHolder) -> None:
        """Use `MigrationLock.acquire`."""
        self.path = path
        self.holder = holder
        self._fd: int | None = fd
        self._release_lock = threading.Lock()

    @classmethod
    def acquire(
        cls,
        directory: Path,
        domain_uuid: str,
        migration_id: str,
        *,
        domain: str = "",
        source: str = "",
        wait_s: float = 0.0,
    ) -> MigrationLock:
        """Lock the VM `domain_uuid` (named `domain`, migrated from `source`) in `directory` (see
        `lock_dir`) for `migration_id`; if another holds it, wait up to `wait_s` seconds.

        Raises MigrationBusy naming the holder if it is still held then, EnvironmentProblem if the
        lock file cannot be opened or locked.
        """
        path = lock_path(directory, domain_uuid)
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
            cls._lock(fd, domain, domain_uuid, wait_s)
            holder = LockHolder(migration_id, os.getpid(), domain_uuid, source, time.time(), domain)
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.line(), 0)
        except OSError as exc:
            os.close(fd)
            raise EnvironmentProblem(
                f"cannot lock the migration lock {path}: {exc.strerror or exc}",
                f"check the file system of {path.parent} (flock must work there)",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, holder)

    @staticmethod
    def _lock(fd: int, domain: str, domain_uuid: str, wait_s: float) -> None:
        deadline = time.monotonic() + max(wait_s, 0.0)
        delay = _POLL_FIRST_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MigrationBusy(domain, domain_uuid, _read_holder(fd)) from None
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
