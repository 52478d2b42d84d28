"""Tests of the per-VM migration lock on real files and real child processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import EnvironmentProblem, ExitCode
from orchestrator.locks import LockHolder, MigrationBusy, MigrationLock, lock_dir, lock_path

SOURCE = "qemu+ssh://src.example/system"
UUID = "5f0c3a3e-8d2b-4f57-9a0e-1d2c3b4a5e6f"


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return lock_dir(tmp_path / "state" / "journal.sqlite")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the directory --------------------------------------------------------------------------------


def test_lock_dir_is_made_0700_next_to_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = lock_dir(tmp_path / "state" / "journal.sqlite")
    assert directory == tmp_path / "state" / "locks"
    assert directory.stat().st_mode & 0o777 == 0o700 & ~_umask()
    assert lock_dir(tmp_path / "state" / "journal.sqlite") == directory  # idempotent
    monkeypatch.chdir(tmp_path)
    assert lock_dir(Path("journal.sqlite")) == tmp_path / "locks"  # a relative journal path: absolute


def test_lock_dir_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(EnvironmentProblem) as caught:
        lock_dir(tmp_path / "afile" / "journal.sqlite")
    line = caught.value.line()
    assert line.startswith(f"cannot create the migration lock directory {tmp_path / 'afile' / 'locks'}: ")
    assert "--journal PATH" in line
    assert "\n" not in line
    assert caught.value.code == ExitCode.ENVIRONMENT


def test_lock_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "locks").write_text("")
    with pytest.raises(EnvironmentProblem, match="cannot create the migration lock directory"):
        lock_dir(tmp_path / "journal.sqlite")


def test_lock_dir_without_permission_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as a user who may not write there (the tests run as root: the refusal is simulated)
    def denied(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(EnvironmentProblem) as caught:
        lock_dir(tmp_path / "journal.sqlite")
    assert caught.value.line() == (
        f"cannot create the migration lock directory {tmp_path / 'locks'}: {tmp_path}: Permission denied; "
        "run as root, or use --journal PATH (the locks are kept next to the journal)"
    )


# --- one process ----------------------------------------------------------------------------------


def test_a_second_acquire_in_the_same_process_conflicts(directory: Path) -> None:
    first = MigrationLock.acquire(directory, SOURCE, UUID, "m-1")
    start = time.monotonic()
    with pytest.raises(MigrationBusy) as caught:
        MigrationLock.acquire(directory, SOURCE, UUID, "m-2")  # another open file description: flock says no
    assert time.monotonic() - start < 0.5
    busy = caught.value
    assert busy.code == ExitCode.BAD_INPUT
    assert busy.holder is not None
    assert (busy.holder.migration_id, busy.holder.pid) == ("m-1", os.getpid())
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.holder.started))
    assert busy.line() == (
        f"VM {UUID} is already being migrated from {SOURCE} by migration m-1 (pid {os.getpid()}, "
        f"since {since}); wait for it, or see: orchestrator history m-1"
    )
    first.release()
    with MigrationLock.acquire(directory, SOURCE, UUID, "m-2") as second:
        assert second.holder.migration_id == "m-2"


def test_the_lock_file_holds_the_holder_record_until_released(directory: Path) -> None:
    before = time.time()
    lock = MigrationLock.acquire(directory, SOURCE, UUID, "m-1")
    assert lock.path == lock_path(directory, SOURCE, UUID)
    assert lock.path.parent == directory
    assert lock.path.stat().st_mode & 0o777 == 0o600 & ~_umask()
    record = json.loads(lock.path.read_text())
    assert record["started"] >= before
    assert record == {
        "migration_id": "m-1",
        "pid": os.getpid(),
        "domain_uuid": UUID,
        "source": SOURCE,
        "started": record["started"],
    }
    assert lock.path.read_text().count("\n") == 1
    lock.release()
    assert lock.path.read_text() == ""  # no stale record; the file stays (deleting it would race)


def test_release_is_idempotent_and_the_context_manager_releases(directory: Path) -> None:
    lock = MigrationLock.acquire(directory, SOURCE, UUID, "m-1")
    assert lock.held
    lock.release()
    lock.release()
    assert not lock.held
    with MigrationLock.acquire(directory, SOURCE, UUID, "m-2") as again:
        assert again.held
    assert not again.held
    again.release()
    with pytest.raises(RuntimeError), MigrationLock.acquire(directory, SOURCE, UUID, "m-3"):
        raise RuntimeError("the migration failed")
    MigrationLock.acquire(directory, SOURCE, UUID, "m-4").release()  # released on the way out


def test_other_vms_and_other_sources_do_not_conflict(directory: Path) -> None:
    with (
        MigrationLock.acquire(directory, SOURCE, UUID, "m-1"),
        MigrationLock.acquire(directory, SOURCE, "another-uuid", "m-2"),
        MigrationLock.acquire(directory, "qemu:///system", UUID, "m-3"),
    ):
        assert len(list(directory.iterdir())) == 3


def test_wait_s_waits_then_names_the_holder(directory: Path) -> None:
    with MigrationLock.acquire(directory, SOURCE, UUID, "m-1"):
        start = time.monotonic()
        with pytest.raises(MigrationBusy, match="by migration m-1"):
            MigrationLock.acquire(directory, SOURCE, UUID, "m-2", wait_s=0.3)
        assert 0.3 <= time.monotonic() - start < 1.5


def test_wait_s_gets_the_lock_when_it_is_released(directory: Path) -> None:
    first = MigrationLock.acquire(directory, SOURCE, UUID, "m-1")
    threading.Timer(0.3, first.release).start()
    start = time.monotonic()
    with MigrationLock.acquire(directory, SOURCE, UUID, "m-2", wait_s=10) as second:
        assert 0.25 <= time.monotonic() - start < 2
        assert json.loads(second.path.read_text())["migration_id"] == "m-2"


def test_hooks_started_while_locked_do_not_inherit_the_lock(directory: Path) -> None:
    lock = MigrationLock.acquire(directory, SOURCE, UUID, "m-1")
    hook = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # outlives the lock
    try:
        lock.release()
        MigrationLock.acquire(directory, SOURCE, UUID, "m-2").release()
    finally:
        hook.kill()
        hook.wait()


# --- hostile names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "domain_uuid"),
    [
        ("../../../../etc", "passwd"),
        ("qemu:///system", "../../../../tmp/x"),
        ("/", "/"),
        ("qemu+ssh://a/system?x=\n../..", "uuid\0/../.."),
        ("", ""),
    ],
)
def test_hostile_uuids_and_uris_cannot_escape_the_directory(
    tmp_path: Path, directory: Path, source: str, domain_uuid: str
) -> None:
    outside = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if directory not in p.parents)
    with MigrationLock.acquire(directory, source, domain_uuid, "m-1\nforged") as lock:
        assert lock.path.parent == directory
        assert re.fullmatch(r"[0-9a-f]{24}\.lock", lock.path.name)
        with pytest.raises(MigrationBusy) as caught:
            MigrationLock.acquire(directory, source, domain_uuid, "m-2")
        assert "\n" not in caught.value.line()
        assert "\0" not in caught.value.line()
        assert "m-1?forged" in caught.value.line()
        assert LockHolder.parse(lock.path.read_bytes()) == lock.holder  # what it wrote reads back
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if directory not in p.parents)
    assert after == outside
    assert [p.name for p in directory.iterdir()] == [lock.path.name]


def test_a_symlink_planted_at_the_lock_path_is_refused(tmp_path: Path, directory: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    lock_path(directory, SOURCE, UUID).symlink_to(target)
    with pytest.raises(EnvironmentProblem, match="cannot open the migration lock"):
        MigrationLock.acquire(directory, SOURCE, UUID, "m-1")
    assert target.read_text() == "keep me"


def test_a_directory_at_the_lock_path_is_refused(directory: Path) -> None:
    lock_path(directory, SOURCE, UUID).mkdir()
    with pytest.raises(EnvironmentProblem) as caught:
        MigrationLock.acquire(directory, SOURCE, UUID, "m-1")
    assert "\n" not in caught.value.line()


# --- another process ------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from orchestrator.locks import MigrationLock
    lock = MigrationLock.acquire(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
    print("locked", flush=True)
    sys.stdin.readline()  # until told, or until its stdin closes
    lock.release()
    """
)


@pytest.fixture
def holder(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process holding the lock of (SOURCE, UUID) as migration m-child until its stdin closes."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), SOURCE, UUID, "m-child"],
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
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def test_a_holder_in_another_process_is_named_at_once(directory: Path, holder: subprocess.Popen[str]) -> None:
    start = time.monotonic()
    with pytest.raises(MigrationBusy) as caught:
        MigrationLock.acquire(directory, SOURCE, UUID, "m-parent")
    assert time.monotonic() - start < 0.5
    assert caught.value.holder is not None
    assert (caught.value.holder.migration_id, caught.value.holder.pid) == ("m-child", holder.pid)
    assert f"by migration m-child (pid {holder.pid}, since " in caught.value.line()
    assert caught.value.line().endswith("; wait for it, or see: orchestrator history m-child")


def test_waiting_gets_the_lock_once_the_holder_exits(directory: Path, holder: subprocess.Popen[str]) -> None:
    def finish() -> None:
        assert holder.stdin is not None
        holder.stdin.write("done\n")
        holder.stdin.flush()

    threading.Timer(0.5, finish).start()
    start = time.monotonic()
    with MigrationLock.acquire(directory, SOURCE, UUID, "m-parent", wait_s=15) as lock:
        waited = time.monotonic() - start
        assert lock.holder.pid == os.getpid()
    assert 0.4 <= waited < 10, waited
    assert holder.wait(timeout=5) == 0


def test_a_killed_holder_leaves_no_stale_lock(directory: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=5)
    # its record is still in the file (nothing ran to empty it), but the kernel dropped its lock
    stale = LockHolder.parse(lock_path(directory, SOURCE, UUID).read_bytes())
    assert stale is not None
    assert (stale.migration_id, stale.pid) == ("m-child", holder.pid)
    start = time.monotonic()
    with MigrationLock.acquire(directory, SOURCE, UUID, "m-parent") as lock:
        assert time.monotonic() - start < 0.5
        assert json.loads(lock.path.read_text())["migration_id"] == "m-parent"


def test_a_holder_that_has_not_written_its_record_yet_is_still_busy(directory: Path) -> None:
    # a killed earlier holder's record is in the file, and the live holder has not replaced it yet
    lock = MigrationLock.acquire(directory, SOURCE, UUID, "m-1")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    stale = LockHolder("m-dead", int(dead.stdout), UUID, SOURCE, time.time() - 60)
    lock.path.write_bytes(stale.line())
    with pytest.raises(MigrationBusy) as caught:
        MigrationLock.acquire(directory, SOURCE, UUID, "m-2")
    assert caught.value.holder is None  # never the dead process's migration
    assert "m-dead" not in caught.value.line()
    assert "by another orchestrator (it has not written its record yet)" in caught.value.line()
    lock.release()
