"""The faults an admin meets every week, on the lab, each ending with the three facts (tests/faults/kit.py):
no device left drained (each drain undrained exactly once, never before the drain ended, per the hooks'
own records), the VM running on exactly one host, the journal telling the truth.

| fault                                                          | test                                     |
| -------------------------------------------------------------- | ---------------------------------------- |
| SIGKILL while drain hooks run (gated, start, prepare)          | test_..._while_the_dead_runs_drain_runs  |
| SIGKILL while two devices' undrain hooks run (3 s and 2 s)     | test_..._undrain_that_ran_is_never_rerun |
| SIGHUP (the ssh session dies), and the terminal vanishing      | test_a_hang_up_..., test_a_vanished_...  |
| a second migrate with another journal; --lock-wait             | test_one_migration_per_vm_whatever_...   |
| the disk fills during the migration                            | test_a_disk_that_fills_...               |
| the journal replaced under a running migration; a full disk    | test_a_journal_replaced_..., test_a_...  |
| a clean exit (SIGTERM) is not taken for a crash                | test_a_clean_interrupt_is_not_recovered  |
| a hook program others may write                                | test_a_hook_program_others_may_write_... |
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab.runner import RECORD_HOOK, cli

from faults.kit import Case, assert_three_facts

SLOW_DRAIN = {"timeout_ms": 20000}


@pytest.mark.parametrize("mode", ["gated", "start", "prepare"])
def test_recover_never_undrains_while_the_dead_runs_drain_runs(
    lab_env: Any, tmp_path: Path, mode: str
) -> None:
    """SIGKILL right after the drain hooks started (5 s for nic0, 3 s for nic1): `recover` waits for the
    dead run's supervisor to see them end, and only then undrains (issue 19, case 1)."""
    guest = {"devices": 2, "workload": "dirty"} if mode == "gated" else {"devices": 2, "transition_ms": 3000}
    case = Case(lab_env, tmp_path, **guest)
    try:
        case.write_policy(drain="--sleep-ms-nic0=5000 --sleep-ms-nic1=3000", drain_keys=SLOW_DRAIN)
        run = case.start("--drain", mode, *(("--bandwidth", "32") if mode == "gated" else ()))
        case.wait_hook("drain")
        run.kill(signal.SIGKILL)
        assert run.wait().code == -signal.SIGKILL
        (migration_id,) = case.migration_ids()
        recovered = case.recover()
        assert recovered.code == 0, recovered.err
        (done,) = recovered.doc["recovered"]
        drained = sorted({h["args"][2] for h in case.calls("drain")})
        assert sorted(done["undrained"]) == drained and done["failed"] == [], done
        assert_three_facts(case, migration_id, recovered=True)
        assert case.recover().doc["recovered"] == [], "recovering twice does nothing"
    finally:
        case.cleanup()


def test_an_undrain_that_ran_is_never_rerun_whichever_ends_first(lab_env: Any, tmp_path: Path) -> None:
    """SIGKILL while both devices' undrain hooks run (nic0 3 s, nic1 2 s: the second device's ends
    first): both run to their end under the supervisor, and `recover` runs neither again (case 2)."""
    case = Case(lab_env, tmp_path, devices=2, transition_ms=200)
    try:
        case.write_policy(
            undrain="--sleep-ms-nic0=3000 --sleep-ms-nic1=2000", undrain_keys={"timeout_ms": 20000}
        )
        run = case.start()
        case.wait_hook("undrain", count=2)
        run.kill(signal.SIGKILL)
        assert run.wait().code == -signal.SIGKILL
        (migration_id,) = case.migration_ids()
        recovered = case.recover()
        assert recovered.code == 0, recovered.err
        (done,) = recovered.doc["recovered"]
        assert (sorted(done["awaited"]), done["undrained"]) == (["nic0", "nic1"], []), done
        assert_three_facts(case, migration_id, on="destination", recovered=True)
    finally:
        case.cleanup()


def test_a_hang_up_never_stops_a_migration(lab_env: Any, tmp_path: Path) -> None:
    """SIGHUP mid-switchover (what an admin's dying ssh session sends): the migration finishes, undrains
    and records everything, and says in its story that the terminal hung up (case 3)."""
    case = Case(lab_env, tmp_path, devices=2, transition_ms=1500)
    try:
        run = case.start()
        case.wait_hook("drain")
        run.kill(signal.SIGHUP)
        done = run.wait()
        assert done.code == 0 and done.doc["outcome"] == "succeeded", done.err
        assert_three_facts(case, done.doc["migration_id"], on="destination")
        notes = [e["name"] for e in case.history(done.doc["migration_id"])["events"] if e["kind"] == "note"]
        assert any("the terminal hung up (SIGHUP)" in note for note in notes), notes
    finally:
        case.cleanup()


def test_a_vanished_terminal_never_stops_a_migration(lab_env: Any, tmp_path: Path) -> None:
    """On a real terminal (a pty as its controlling terminal) that goes away mid-switchover: the kernel
    sends SIGHUP and every later write to it fails (EIO). It finishes all the same (case 3)."""
    case = Case(lab_env, tmp_path, transition_ms=1500)
    try:
        pid, master = pty.fork()
        if pid == 0:  # pragma: no cover - the child: the orchestrator on the terminal
            os.execv(sys.executable, [sys.executable, "-m", "orchestrator", *case.migrate_args()])
        seen = b""
        while b"drain nic0: record-hook" not in seen:  # its story, as the terminal shows it
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, seen.decode(errors="replace")
            seen += os.read(master, 65536)
        os.close(master)  # the terminal is gone
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, seen.decode(errors="replace")
        (migration_id,) = case.migration_ids()
        assert case.history(migration_id)["outcome"] == "succeeded"
        assert_three_facts(case, migration_id, on="destination")
    finally:
        case.cleanup()


def test_one_migration_per_vm_whatever_journal_and_lock_wait_waits(lab_env: Any, tmp_path: Path) -> None:
    """A second migrate of the same VM with another journal is refused before it drains anything; with
    --lock-wait it waits for the first to end, then finds the VM there already (cases 4 and 5)."""
    case = Case(lab_env, tmp_path, transition_ms=1500)
    try:
        case.write_policy(hooks=case.hook("before", "--sleep-ms=2000", timeout_ms=10000))
        other = case.twin("second")
        other.journal = tmp_path / "other-journal.sqlite"
        other.write_policy()
        first = case.start()
        first_id = case.wait_hook("before")["env"]["ORCH_MIGRATION_ID"]
        refused = other.migrate()
        assert refused.code == 2, refused.err
        assert f"is already being migrated from {lab_env.hosts[0].uri} by migration {first_id}" in refused.err
        assert f"{case.name} (UUID" in refused.err, "named by its name"
        assert other.hooks() == [], "the second run drained nothing"
        waiting = other.start("--lock-wait", "120")
        done = first.wait()
        assert done.code == 0 and done.doc["outcome"] == "succeeded", done.err
        waited = waiting.wait()
        assert waited.code == 0 and waited.doc["outcome"] == "unchanged", waited.err
        assert other.hooks() == []
        assert_three_facts(case, first_id, on="destination")
        for value in ("nan", "inf", "1e30", "-1"):
            bad = cli(*other.migrate_args("--lock-wait", value))
            assert bad.code == 2 and "--lock-wait must be a number of seconds" in bad.err, (value, bad.err)
    finally:
        case.cleanup()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs of our own at `path` (root: the lab tests run as root)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to its last byte; the filler file (remove it to free it)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):  # big writes, then what is left to the last byte
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def test_a_disk_that_fills_during_the_migration_loses_nothing(lab_env: Any, tmp_path: Path) -> None:
    """The journal's disk fills mid-migration: the run log's room was reserved, so every record that
    matters is written; the import into the journal waits for room (exit 7 says so), and the next
    command imports it, undoing nothing twice (case 6)."""
    case = Case(lab_env, tmp_path, devices=2, transition_ms=1000)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        try:
            case.journal = disk / "journal.sqlite"
            run = case.start()
            case.wait_hook("drain")
            filler = fill(disk)
            done = run.wait()
            assert done.code == 7, done.err
            assert done.doc["outcome"] == "succeeded" and "its run log" in done.doc["journal_error"], done.doc
            history = case.history(done.doc["migration_id"])  # read from the run log meanwhile
            assert history["outcome"] == "succeeded", history
            filler.unlink()
            recovered = case.recover()  # imports it: nothing to recover, nothing undrained again
            assert recovered.code == 0 and recovered.doc["recovered"] == [], recovered.out
            assert not (disk / "journal.sqlite.runs").exists(), "imported"
            assert_three_facts(case, done.doc["migration_id"], on="destination")
        finally:
            case.cleanup()


def test_a_full_disk_at_the_start_refuses_before_anything(lab_env: Any, tmp_path: Path) -> None:
    """A journal on a full disk: exit 7 with the real cause, before anything is drained (case 7)."""
    case = Case(lab_env, tmp_path)
    with tmpfs(tmp_path / "disk", "2m") as disk:
        try:
            case.journal = disk / "journal.sqlite"
            fill(disk)
            run = case.migrate()
            assert run.code == 7 and "full" in run.err, run.err
            assert case.hooks() == [] and case.state(0) == "running" and case.state(1) == "absent"
            # A journal that exists, on a disk filled since: SQLite cannot open its write-ahead log, or
            # the run log's room cannot be reserved; the same refusal either way.
            (disk / "filler").unlink()
            created = case.migrate("--dry-run")
            assert created.code == 0, created.err
            fill(disk)
            run = case.migrate()
            assert run.code == 7 and ("is full" in run.err or "cannot reserve room" in run.err), run.err
            assert case.hooks() == [] and case.state(0) == "running"
        finally:
            case.cleanup()


def test_a_journal_replaced_under_a_running_migration(lab_env: Any, tmp_path: Path) -> None:
    """Garbage moved over the journal mid-migration: the migration ends, says its record is not in the
    journal (exit 7) and keeps its run log; `history` refuses the garbage without touching it; once it
    is moved aside, the next command imports the run log (case 7)."""
    case = Case(lab_env, tmp_path, transition_ms=1000)
    try:
        run = case.start()
        case.wait_hook("drain")
        garbage = os.urandom(65536)
        staged = tmp_path / "garbage"
        staged.write_bytes(garbage)
        os.replace(staged, case.journal)
        done = run.wait()
        assert done.code == 7 and done.doc["outcome"] == "succeeded", done.err
        assert "not an SQLite database" in done.doc["journal_error"], done.doc["journal_error"]
        history = cli("history", "--journal", str(case.journal))
        assert history.code == 7 and "not an SQLite database" in history.err, history.err
        assert case.journal.read_bytes() == garbage, "the garbage is left as it was"
        case.journal.rename(tmp_path / "journal.not-a-journal")
        assert case.recover().code == 0  # a new journal: the run log is imported into it
        assert_three_facts(case, done.doc["migration_id"], on="destination")
    finally:
        case.cleanup()


def test_a_clean_interrupt_is_not_recovered_as_a_crash(lab_env: Any, tmp_path: Path) -> None:
    """SIGTERM mid-job, everything undrained, exit 130: the run recorded its end; `recover` finds
    nothing to do and the journal keeps saying interrupted (case 8)."""
    case = Case(lab_env, tmp_path, workload="dirty")
    try:
        run = case.start("--drain", "start", "--bandwidth", "32", "--max-downtime", "1")
        run.wait_line(r"phase job-running")
        run.kill(signal.SIGTERM)
        done = run.wait()
        assert done.code == 130 and done.doc["outcome"] == "interrupted", done.err
        recovered = case.recover()
        assert recovered.code == 0 and recovered.doc["recovered"] == [], recovered.out
        record = case.history(done.doc["migration_id"])
        assert (record["outcome"], record["exit_code"], record["recovered"]) == ("interrupted", 130, None)
        assert_three_facts(case, done.doc["migration_id"], on="source")
    finally:
        case.cleanup()


def test_a_hook_program_others_may_write_is_refused(lab_env: Any, tmp_path: Path) -> None:
    case = Case(lab_env, tmp_path)
    try:
        program = tmp_path / "bin" / "record-hook"
        program.parent.mkdir()
        shutil.copy(RECORD_HOOK, program)
        program.chmod(0o777)
        case.write_policy(hooks=f'[[hooks.before]]\nargv = ["{program}", "{case.log}", "before"]\n')
        run = case.migrate()
        assert run.code == 2 and "writable by group and others" in run.err and "unsafe to run" in run.err, (
            run.err
        )
        assert case.hooks() == []
        assert_three_facts(case, None)
    finally:
        case.cleanup()
