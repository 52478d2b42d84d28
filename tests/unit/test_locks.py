"""Tests of the per-VM migration lock on real files, real threads and real child processes.

No test reads the wall clock to decide anything: "it waited" is shown by the order of events (the
holder let go before the waiter got the lock, the waiter was refused before it got it), and the
waiting loop's deadline by a fake clock standing in for `time` in orchestrator.edges.locks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import orchestrator.edges.locks
from orchestrator.core.errors import EnvironmentProblem, ExitCode
from orchestrator.edges.locks import (
    LockHolder,
    MigrationBusy,
    MigrationLock,
    lock_dir,
    lock_path,
    runtime_dir,
)

SOURCE = "qemu+ssh://src.example/system"
UUID = "5f0c3a3e-8d2b-4f57-9a0e-1d2c3b4a5e6f"
OTHER_UUID = "0b7d1c2e-3f4a-4b5c-8d6e-7f8091a2b3c4"
TIMEOUT_S = 30  # only ever a bound on a hang; never asserted on


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$ORCH_RUNTIME_DIR, not created yet."""
    path = tmp_path / "run"
    monkeypatch.setenv("ORCH_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def directory(runtime: Path) -> Path:
    return lock_dir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _watch_sleeps(monkeypatch: pytest.MonkeyPatch, on_sleep: Callable[[int], None]) -> list[float]:
    """Has `on_sleep(n)` called as the n-th (from 1) sleep of orchestrator.edges.locks begins (the real sleep
    follows); returns the list of the sleeps asked for."""
    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        on_sleep(len(asked))
        time.sleep(seconds)

    monkeypatch.setattr(orchestrator.edges.locks, "time", SimpleNamespace(**{**vars(time), "sleep": sleep}))
    return asked


class FakeClock:
    """Stands in for `time` in orchestrator.edges.locks: its monotonic clock moves only when it sleeps."""

    def __init__(self, on_sleep: Callable[[int], None] = lambda n: None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._on_sleep = on_sleep
        self.time = time.time
        self.strftime = time.strftime
        self.localtime = time.localtime

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds
        self._on_sleep(len(self.sleeps))


# --- the runtime directory ------------------------------------------------------------------------


def test_runtime_dir_is_orch_runtime_dir_when_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_RUNTIME_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert runtime_dir() == tmp_path / "mine"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert runtime_dir() == tmp_path / "mine"  # root too


@pytest.mark.parametrize("override", [None, ""])
def test_runtime_dir_of_root_is_run_orchestrator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str | None
) -> None:
    if override is None:
        monkeypatch.delenv("ORCH_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("ORCH_RUNTIME_DIR", override)  # empty: as if unset
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))  # not for root
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert runtime_dir() == Path("/run/orchestrator")


def test_runtime_dir_of_a_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert runtime_dir() == tmp_path / "xdg" / "orchestrator"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir() == Path("/tmp/orchestrator-1234")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    assert runtime_dir() == Path("/tmp/orchestrator-1234")


def test_lock_dir_is_made_0700_in_the_runtime_dir(runtime: Path) -> None:
    directory = lock_dir()
    assert directory == runtime / "locks"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 & ~_umask()
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700 & ~_umask()  # made too, as ours only
    assert lock_dir() == directory  # idempotent
    MigrationLock.acquire(directory, UUID, "m-1").release()
    assert lock_dir() == directory  # with a lock file in it


def test_lock_dir_accepts_an_existing_private_directory(runtime: Path) -> None:
    (runtime / "locks").mkdir(parents=True, mode=0o755)
    (runtime / "locks").chmod(0o755)  # readable by others is fine: only writing is refused
    assert lock_dir() == runtime / "locks"


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
def test_a_lock_dir_others_may_write_to_is_refused_in_one_line(runtime: Path, mode: int) -> None:
    (runtime / "locks").mkdir(parents=True)
    (runtime / "locks").chmod(mode)
    with pytest.raises(EnvironmentProblem) as caught:
        lock_dir()
    assert caught.value.line() == (
        f"the migration lock directory {runtime / 'locks'} is not a directory of yours only you may write "
        "to; remove it, or set ORCH_RUNTIME_DIR to a directory of your own"
    )
    assert caught.value.code == ExitCode.ENVIRONMENT
    assert stat.S_IMODE((runtime / "locks").stat().st_mode) == mode  # refused, not "fixed"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away takes root")
def test_a_lock_dir_owned_by_someone_else_is_refused_in_one_line(runtime: Path) -> None:
    (runtime / "locks").mkdir(parents=True, mode=0o700)
    os.chown(runtime / "locks", 65534, 65534)
    with pytest.raises(EnvironmentProblem) as caught:
        lock_dir()
    line = caught.value.line()
    assert line.startswith(f"the migration lock directory {runtime / 'locks'} is not a directory of yours ")
    assert "\n" not in line
    assert caught.value.code == ExitCode.ENVIRONMENT


def test_a_symlink_as_the_lock_dir_is_refused(tmp_path: Path, runtime: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    runtime.mkdir()
    (runtime / "locks").symlink_to(elsewhere)
    with pytest.raises(EnvironmentProblem, match=r"is not a directory of yours"):
        lock_dir()
    assert list(elsewhere.iterdir()) == []


def test_a_file_in_the_way_of_the_lock_dir_is_refused_in_one_line(runtime: Path) -> None:
    runtime.mkdir()
    (runtime / "locks").write_text("")
    with pytest.raises(EnvironmentProblem) as caught:
        lock_dir()
    line = caught.value.line()
    assert line.startswith(f"cannot create the migration lock directory {runtime / 'locks'}: ")
    assert line.endswith("; run as root, or set ORCH_RUNTIME_DIR to a directory of your own")
    assert "\n" not in line
    assert caught.value.code == ExitCode.ENVIRONMENT


def test_a_file_in_the_way_of_the_runtime_dir_is_refused_in_one_line(runtime: Path) -> None:
    runtime.write_text("")
    with pytest.raises(EnvironmentProblem) as caught:
        lock_dir()
    line = caught.value.line()
    assert line.startswith(f"cannot create the migration lock directory {runtime / 'locks'}: {runtime}: ")
    assert "\n" not in line


def test_lock_dir_without_permission_is_one_line(runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as a user who may not write there (the tests run as root: the refusal is simulated)
    def denied(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(EnvironmentProblem) as caught:
        lock_dir()
    assert caught.value.line() == (
        f"cannot create the migration lock directory {runtime / 'locks'}: {runtime}: Permission denied; "
        "run as root, or set ORCH_RUNTIME_DIR to a directory of your own"
    )


# --- one process ----------------------------------------------------------------------------------


def test_a_second_acquire_in_the_same_process_conflicts_at_once(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = MigrationLock.acquire(directory, UUID, "m-1", domain="vm1", source=SOURCE)
    sleeps = _watch_sleeps(monkeypatch, lambda n: None)
    with pytest.raises(MigrationBusy) as caught:
        MigrationLock.acquire(directory, UUID, "m-2", domain="vm1")  # another open file description
    assert sleeps == []  # at once: no waiting without wait_s
    busy = caught.value
    assert busy.code == ExitCode.BAD_INPUT
    assert busy.holder == first.holder
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.holder.started))
    assert busy.line() == (
        f"vm1 (UUID {UUID}) is already being migrated from {SOURCE} by migration m-1 (pid {os.getpid()}, "
        f"since {since}); wait for it (--lock-wait SECONDS), or see: orchestrator history m-1"
    )
    first.release()
    with MigrationLock.acquire(directory, UUID, "m-2") as second:
        assert second.holder.migration_id == "m-2"


def test_busy_names_the_vm_by_its_uuid_when_it_has_no_name(directory: Path) -> None:
    with MigrationLock.acquire(directory, UUID, "m-1", source=SOURCE), pytest.raises(MigrationBusy) as caught:
        MigrationLock.acquire(directory, UUID, "m-2")
    line = caught.value.line()
    assert line.startswith(f"the VM {UUID} is already being migrated from {SOURCE} by migration m-1 ")


def test_the_lock_file_holds_the_holder_record_until_released(directory: Path) -> None:
    before = time.time()
    lock = MigrationLock.acquire(directory, UUID, "m-1", domain="vm1", source=SOURCE)
    assert lock.path == lock_path(directory, UUID)
    assert lock.path.parent == directory
    assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600 & ~_umask()
    record = json.loads(lock.path.read_text())
    assert record["started"] >= before
    assert record == {
        "migration_id": "m-1",
        "pid": os.getpid(),
        "domain_uuid": UUID,
        "domain": "vm1",
        "source": SOURCE,
        "started": record["started"],
    }
    assert lock.path.read_text().count("\n") == 1
    assert LockHolder.parse(lock.path.read_bytes()) == lock.holder
    assert lock.holder.domain == "vm1"
    lock.release()
    assert lock.path.read_text() == ""  # no stale record; the file stays (deleting it would race)


def test_a_record_without_a_domain_name_still_parses() -> None:
    old = b'{"migration_id":"m-1","pid":1,"domain_uuid":"u","source":"s","started":5.0}\n'
    assert LockHolder.parse(old) == LockHolder("m-1", 1, "u", "s", 5.0, "")


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"null", b"[]", b'{"migration_id":"m","pid":0,"domain_uuid":"u","source":"s","started":1}'],
)
def test_what_is_not_a_whole_record_parses_as_none(data: bytes) -> None:
    assert LockHolder.parse(data) is None


def test_release_is_idempotent_and_the_context_manager_releases(directory: Path) -> None:
    lock = MigrationLock.acquire(directory, UUID, "m-1")
    held_before = lock.held
    lock.release()
    lock.release()
    assert (held_before, lock.held) == (True, False)
    with MigrationLock.acquire(directory, UUID, "m-2") as again:
        held_inside = again.held
    assert (held_inside, again.held) == (True, False)
    again.release()
    with pytest.raises(RuntimeError), MigrationLock.acquire(directory, UUID, "m-3"):
        raise RuntimeError("the migration failed")
    MigrationLock.acquire(directory, UUID, "m-4").release()  # released on the way out


def test_the_lock_is_per_vm_not_per_source_uri(directory: Path) -> None:
    # the same VM reached through two spellings of its host's URI (or two hosts' URIs): one lock
    with MigrationLock.acquire(directory, UUID, "m-1", domain="vm1", source=SOURCE) as first:
        spellings = ("qemu+ssh://src.example.:22/system", "qemu+tcp://10.0.0.1/system", "qemu:///system", "")
        for source in spellings:
            with pytest.raises(MigrationBusy) as caught:
                MigrationLock.acquire(directory, UUID, "m-2", domain="vm1", source=source)
            assert caught.value.holder == first.holder
            assert f"already being migrated from {SOURCE} by migration m-1 " in caught.value.line()
        assert [p.name for p in directory.iterdir()] == [first.path.name]
        assert lock_path(directory, UUID) == first.path


def test_other_vms_do_not_conflict(directory: Path) -> None:
    with (
        MigrationLock.acquire(directory, UUID, "m-1", domain="vm1", source=SOURCE),
        MigrationLock.acquire(directory, OTHER_UUID, "m-2", domain="vm2", source=SOURCE),
        MigrationLock.acquire(directory, UUID.upper(), "m-3", domain="vm3", source=SOURCE),  # its own key
    ):
        assert len(list(directory.iterdir())) == 3
    assert len({lock_path(directory, u) for u in (UUID, OTHER_UUID, UUID.upper())}) == 3


def test_two_journals_meet_in_the_runtime_dir(runtime: Path) -> None:
    # two runs (whatever their journals) each look up the lock directory themselves: the same one
    with (
        MigrationLock.acquire(lock_dir(), UUID, "m-1", domain="vm1"),
        pytest.raises(MigrationBusy, match=r"by migration m-1 "),
    ):
        MigrationLock.acquire(lock_dir(), UUID, "m-2", domain="vm1")


def test_wait_s_zero_or_negative_does_not_wait(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    with MigrationLock.acquire(directory, UUID, "m-1"):
        monkeypatch.setattr(orchestrator.edges.locks, "time", clock)
        for wait_s in (0.0, -5.0):
            with pytest.raises(MigrationBusy, match=r"by migration m-1 "):
                MigrationLock.acquire(directory, UUID, "m-2", wait_s=wait_s)
    assert clock.sleeps == []


def test_wait_s_keeps_trying_until_its_deadline_then_names_the_holder(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    with MigrationLock.acquire(directory, UUID, "m-1", domain="vm1", source=SOURCE) as first:
        monkeypatch.setattr(orchestrator.edges.locks, "time", clock)
        start = clock.now
        with pytest.raises(MigrationBusy) as caught:
            MigrationLock.acquire(directory, UUID, "m-2", domain="vm1", wait_s=3.0)
    # on the fake clock: it tried again and again, gave up only once the deadline was reached, and
    # never slept past it
    assert len(clock.sleeps) > 3
    assert clock.now == pytest.approx(start + 3.0)
    assert caught.value.holder == first.holder
    assert "vm1 (UUID " in caught.value.line()
    assert "--lock-wait SECONDS" in caught.value.line()


@pytest.mark.parametrize("release_at_sleep", [1, 2, 3, 5, 8])
def test_wait_s_gets_the_lock_whenever_the_holder_lets_go_within_the_wait(
    directory: Path, monkeypatch: pytest.MonkeyPatch, release_at_sleep: int
) -> None:
    first = MigrationLock.acquire(directory, UUID, "m-1")
    events: list[str] = []

    def on_sleep(n: int) -> None:
        events.append(f"refused {n}")
        if n == release_at_sleep:
            events.append("released")
            first.release()

    monkeypatch.setattr(orchestrator.edges.locks, "time", FakeClock(on_sleep))
    with MigrationLock.acquire(directory, UUID, "m-2", wait_s=3600) as second:
        events.append("acquired")
        assert json.loads(second.path.read_text())["migration_id"] == "m-2"
    assert events == [f"refused {n}" for n in range(1, release_at_sleep + 1)] + ["released", "acquired"]


@pytest.mark.parametrize("release_after_refusals", [0, 1, 2, 4])
def test_wait_s_gets_the_lock_when_another_thread_releases_it(
    directory: Path, monkeypatch: pytest.MonkeyPatch, release_after_refusals: int
) -> None:
    """The holder lets go from another thread: before the waiter has even tried (0: racing it), or
    once it has been refused n times, while it sleeps. The waiter gets the lock in every case."""
    first = MigrationLock.acquire(directory, UUID, "m-1")
    refused = [threading.Event() for _ in range(release_after_refusals + 1)]
    releasing = threading.Event()
    acquired = threading.Event()

    def on_sleep(n: int) -> None:
        if n < len(refused):
            refused[n].set()

    sleeps = _watch_sleeps(monkeypatch, on_sleep)

    problems: list[str] = []

    def let_go() -> None:
        if release_after_refusals and not refused[release_after_refusals].wait(TIMEOUT_S):
            problems.append("the waiter was not refused that often")
        if acquired.is_set():
            problems.append("the waiter got the lock while it was held")
        releasing.set()
        first.release()

    releaser = threading.Thread(target=let_go)
    releaser.start()
    try:
        with MigrationLock.acquire(directory, UUID, "m-2", wait_s=TIMEOUT_S) as second:
            acquired.set()
            assert releasing.is_set()  # it got the lock only once the holder let go
            assert json.loads(second.path.read_text())["migration_id"] == "m-2"
            assert len(sleeps) >= release_after_refusals  # refused (and waited) that often first
    finally:
        releaser.join(TIMEOUT_S)
    assert not releaser.is_alive()
    assert problems == []
    assert not first.held


def test_hooks_started_while_locked_do_not_inherit_the_lock(directory: Path) -> None:
    lock = MigrationLock.acquire(directory, UUID, "m-1")
    hook = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # outlives the lock
    try:
        lock.release()
        MigrationLock.acquire(directory, UUID, "m-2").release()
    finally:
        hook.kill()
        hook.wait()


# --- hostile names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain_uuid",
    ["../../../../etc/passwd", "../../tmp/x", "/", "uuid\0/../..", "\n..\r/", "", "\udcff/..", "x" * 1000],
)
def test_hostile_uuids_cannot_escape_the_directory(tmp_path: Path, directory: Path, domain_uuid: str) -> None:
    outside = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if directory not in p.parents)
    with MigrationLock.acquire(
        directory, domain_uuid, "m-1\nforged", domain="vm\n1\x1b[2J", source="qemu:///x\r\n../.."
    ) as lock:
        assert lock.path.parent == directory
        assert re.fullmatch(r"[0-9a-f]{24}\.lock", lock.path.name)
        with pytest.raises(MigrationBusy) as caught:
            MigrationLock.acquire(directory, domain_uuid, "m-2", domain="vm\n1\x1b[2J")
        line = caught.value.line()
        assert line.isprintable()  # one line, no control characters
        assert len(line) < 1000
        assert line.startswith("vm?1?[2J (UUID ")
        assert "m-1?forged" in line
        assert LockHolder.parse(lock.path.read_bytes()) == lock.holder  # what it wrote reads back
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if directory not in p.parents)
    assert after == outside
    assert [p.name for p in directory.iterdir()] == [lock.path.name]


def test_a_symlink_planted_at_the_lock_path_is_refused(tmp_path: Path, directory: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    lock_path(directory, UUID).symlink_to(target)
    with pytest.raises(EnvironmentProblem, match="cannot open the migration lock"):
        MigrationLock.acquire(directory, UUID, "m-1")
    assert target.read_text() == "keep me"


def test_a_directory_at_the_lock_path_is_refused(directory: Path) -> None:
    lock_path(directory, UUID).mkdir()
    with pytest.raises(EnvironmentProblem) as caught:
        MigrationLock.acquire(directory, UUID, "m-1")
    assert "\n" not in caught.value.line()


def test_a_fifo_at_the_lock_path_is_refused_without_hanging(directory: Path) -> None:
    os.mkfifo(lock_path(directory, UUID))
    with pytest.raises(EnvironmentProblem) as caught:
        MigrationLock.acquire(directory, UUID, "m-1")
    path = lock_path(directory, UUID)
    assert caught.value.line() == f"the migration lock {path} is not a regular file; remove it: rm '{path}'"


# --- another process ------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from orchestrator.edges.locks import MigrationLock
    lock = MigrationLock.acquire(
        Path(sys.argv[1]), sys.argv[2], sys.argv[3], domain=sys.argv[4], source=sys.argv[5]
    )
    print("locked", flush=True)
    sys.stdin.readline()  # until told, or until its stdin closes
    lock.release()
    """
)


@pytest.fixture
def holder(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process holding the lock of UUID (vm1, from SOURCE) as migration m-child until its
    stdin closes."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), UUID, "m-child", "vm1", SOURCE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "locked\n"
        yield child
    finally:
        if child.poll() is None:
            child.stdin.close()
            try:
                child.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def test_a_holder_in_another_process_is_named_at_once(
    directory: Path, holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps = _watch_sleeps(monkeypatch, lambda n: None)
    with pytest.raises(MigrationBusy) as caught:
        MigrationLock.acquire(directory, UUID, "m-parent", domain="vm1", source="qemu:///other")
    assert sleeps == []  # at once: the holder's record was there, nothing to wait for
    assert caught.value.holder is not None
    assert (caught.value.holder.migration_id, caught.value.holder.pid) == ("m-child", holder.pid)
    assert caught.value.holder.domain == "vm1"
    line = caught.value.line()
    assert line.startswith(f"vm1 (UUID {UUID}) is already being migrated from {SOURCE} by migration m-child ")
    assert f"by migration m-child (pid {holder.pid}, since " in line
    assert line.endswith("; wait for it (--lock-wait SECONDS), or see: orchestrator history m-child")


def test_waiting_gets_the_lock_once_the_holder_exits(
    directory: Path, holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = threading.Event()
    told = threading.Event()
    sleeps = _watch_sleeps(monkeypatch, lambda n: refused.set())

    def finish() -> None:
        refused.wait(TIMEOUT_S)  # the waiter has been turned away at least once (checked below)
        assert holder.stdin is not None
        told.set()
        holder.stdin.write("done\n")
        holder.stdin.flush()

    teller = threading.Thread(target=finish)
    teller.start()
    try:
        with MigrationLock.acquire(directory, UUID, "m-parent", domain="vm1", wait_s=TIMEOUT_S) as lock:
            assert told.is_set()  # it got the lock only after the holder was told to let go
            assert sleeps  # and it waited for it
            assert lock.holder.pid == os.getpid()
    finally:
        teller.join(TIMEOUT_S)
    assert holder.wait(timeout=TIMEOUT_S) == 0


def test_a_killed_holder_leaves_no_stale_lock(
    directory: Path, holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=TIMEOUT_S)
    # its record is still in the file (nothing ran to empty it), but the kernel dropped its lock
    stale = LockHolder.parse(lock_path(directory, UUID).read_bytes())
    assert stale is not None
    assert (stale.migration_id, stale.pid, stale.domain) == ("m-child", holder.pid, "vm1")
    sleeps = _watch_sleeps(monkeypatch, lambda n: None)
    with MigrationLock.acquire(directory, UUID, "m-parent") as lock:
        assert sleeps == []  # at once
        assert json.loads(lock.path.read_text())["migration_id"] == "m-parent"


def test_a_holder_that_has_not_written_its_record_yet_is_still_busy(directory: Path) -> None:
    # a killed earlier holder's record is in the file, and the live holder has not replaced it yet
    lock = MigrationLock.acquire(directory, UUID, "m-1")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    stale = LockHolder("m-dead", int(dead.stdout), UUID, SOURCE, time.time() - 60, "vm1")
    lock.path.write_bytes(stale.line())
    with pytest.raises(MigrationBusy) as caught:
        MigrationLock.acquire(directory, UUID, "m-2", domain="vm1")
    assert caught.value.holder is None  # never the dead process's migration
    assert "m-dead" not in caught.value.line()
    assert caught.value.line() == (
        f"vm1 (UUID {UUID}) is already being migrated by another orchestrator (it has not written its record "
        "yet); wait for it (--lock-wait SECONDS), or see: orchestrator history"
    )
    lock.release()


# --- what a review of the runtime directory found, fixed ---------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away takes root")
def test_a_runtime_dir_owned_by_someone_else_is_refused(runtime: Path) -> None:
    runtime.mkdir(mode=0o777)
    runtime.chmod(0o777)
    os.chown(runtime, 65534, 65534)
    with pytest.raises(EnvironmentProblem):
        lock_dir()


def test_a_long_holder_record_still_names_the_holder(directory: Path) -> None:
    long_source = "qemu+ssh://src.example/system?" + "x" * 5000
    with (
        MigrationLock.acquire(directory, UUID, "m-1", domain="vm1", source=long_source),
        pytest.raises(MigrationBusy) as caught,
    ):
        MigrationLock.acquire(directory, UUID, "m-2", domain="vm1")
    assert caught.value.holder is not None
    assert "by migration m-1 " in caught.value.line()


def test_a_relative_runtime_dir_does_not_split_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_RUNTIME_DIR", "run")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    try:
        first = lock_dir()
    except EnvironmentProblem:
        return  # refusing a relative directory is a fix too
    with MigrationLock.acquire(first, UUID, "m-1"):
        monkeypatch.chdir(tmp_path / "b")
        with pytest.raises(MigrationBusy):
            MigrationLock.acquire(lock_dir(), UUID, "m-2")
