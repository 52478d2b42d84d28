"""The fault matrix: each fault of issue 10 on the lab (real libvirtd + QEMU, simulated VFIO devices,
real hook processes), each ending with the three facts (`assert_three_facts`, tests/faults/kit.py):
every drained device undrained exactly once, the VM running on exactly one host, and `orchestrator
history` telling the truth.

| fault                                         | test                                              |
| --------------------------------------------- | ------------------------------------------------- |
| drain hook fails, on_failure abort / continue | test_failing_drain_hook                           |
| drain hook hangs past its deadline (continue) | test_hanging_drain_hook_with_continue             |
| undrain hook fails                            | test_failing_undrain_hook_exits_9                 |
| SIGTERM mid-job (drained since the start)     | test_sigterm_mid_job_exits_130                    |
| destination QEMU killed                       | test_killed_destination_qemu                      |
| destination libvirtd killed                   | test_killed_destination_libvirtd                  |
| two concurrent runs of one VM                 | test_a_second_run_is_refused_naming_the_first     |
| journal write-locked by another process       | test_journal_locked_by_another_process,           |
|                                               | test_journal_locked_across_a_drain                |
| missing hook, group-writable policy, corrupt  | test_refused_before_anything                      |
| journal, hostile domain name / URI            |                                                   |
| SIGKILL at each phase, then recover           | test_sigkill.py                                   |
| a second process's records in a migration     | test_journal_order.py                             |

Already covered elsewhere, not repeated: a drain hook timing out with on_failure abort, SIGTERM sent
by the drain hook, a cancelled job and an injected transition failure (tests/lab/test_migrate.py);
a failing drain in gated mode and stalls (tests/lab/test_switchover.py); journal locks, corruption
and lost records without libvirt (tests/unit/test_journal.py). The killed destination QEMU of
test_migrate.py is repeated here only for its journal (the third fact).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lab.runner import cli

from faults.kit import Case, assert_three_facts
from orchestrator.edges.journal import Journal
from orchestrator.edges.virt import Host
from orchestrator.lab import hosts as lab

ONE_LINE = re.compile(r"\Aorchestrator: error: [^\n]+\n\Z")


def error_line(err: str) -> str:
    """The last stderr line, which must be our one error line (the plan may come before it)."""
    last = err.splitlines(keepends=True)[-1] if err else ""
    assert ONE_LINE.match(last), err
    assert "Traceback" not in err, err
    return last


def test_failing_drain_hook(lab_env: Any, tmp_path: Path) -> None:
    for on_failure in ("abort", "continue"):
        tmp = tmp_path / on_failure
        tmp.mkdir()
        # A 3 s transition: the abort is sent while the device is still quiescing. In prepare mode the drain
        # starts as QEMU switches over, so the abort races libvirt's own migrate-continue for QEMU's
        # monitor (which the transition holds): either may win, as with real hardware (the gated mode
        # is the one that drains before any switchover; its abort is tested in tests/lab/test_switchover.py).
        case = Case(lab_env, tmp, transition_ms=3000)
        try:
            case.write_policy(drain="--exit=3", drain_keys={"on_failure": on_failure})
            run = case.migrate()
            doc = run.doc
            failed = [h for h in doc["hooks"] if h["trigger"] == "drain"]
            assert len(failed) == 1 and failed[0]["exit_code"] == 3 and not failed[0]["ok"]
            if on_failure == "abort":
                assert "drain hook record-hook for nic0 failed" in doc["error"], run.err
                if doc["location"] == "source":
                    assert run.code == 5 and doc["outcome"] == "aborted", run.err
                else:  # the switchover won the race: said so, never reported as a plain success
                    assert run.code == 0 and doc["outcome"] == "succeeded", run.err
                    assert "the abort came too late" in doc["error"]
                assert_three_facts(case, doc["migration_id"], on=doc["location"])
            else:
                assert run.code == 0 and doc["outcome"] == "succeeded", run.err
                assert doc["devices"]["nic0"]["drain_ok"] is False
                assert_three_facts(case, doc["migration_id"], on="destination")
        finally:
            case.cleanup()


def test_hanging_drain_hook_with_continue(lab_env: Any, tmp_path: Path) -> None:
    case = Case(lab_env, tmp_path)
    try:
        case.write_policy(drain="--sleep-ms=10000", drain_keys={"timeout_ms": 800, "on_failure": "continue"})
        run = case.migrate()
        assert run.code == 0 and run.doc["outcome"] == "succeeded", run.err
        (drain,) = [h for h in run.doc["hooks"] if h["trigger"] == "drain"]
        assert drain["timed_out"] is True
        assert_three_facts(case, run.doc["migration_id"], on="destination")
        # The device ran again on the destination long before, but its undrain waited for the drain's end
        # (the deadline's SIGTERM, as the hook recorded it): assert_three_facts checked the order.
        (drain_run,) = case.calls("drain")
        assert case.ends()[drain_run["pid"]]["how"] == "SIGTERM"
    finally:
        case.cleanup()


def test_failing_undrain_hook_exits_9(lab_env: Any, tmp_path: Path) -> None:
    case = Case(lab_env, tmp_path)
    try:
        case.write_policy(undrain="--exit=1")
        run = case.migrate()
        assert run.code == 9, run.err
        assert run.doc["outcome"] == "succeeded" and run.doc["exit_code"] == 9
        assert "undrain" in error_line(run.err)
        assert_three_facts(case, run.doc["migration_id"], on="destination")
        actions = case.history(run.doc["migration_id"])["device_actions"]
        assert [(a["action"], a["status"]) for a in actions][-1] == ("undrain", "failed")
    finally:
        case.cleanup()


def test_sigterm_mid_job_exits_130(lab_env: Any, tmp_path: Path) -> None:
    # Drained before the job (drain=start), then held in pre-copy: SIGTERM must abort and undrain.
    case = Case(lab_env, tmp_path, workload="dirty")
    try:
        background = case.start("--drain", "start", "--bandwidth", "32", "--max-downtime", "1")
        background.wait_line(r"phase job-running")
        case.wait_for("the job", lambda: lab_env.conn(0).domain(case.name).job_stats() is not None)
        assert case.calls("drain") and not case.calls("undrain")
        background.kill(signal.SIGTERM)
        run = background.wait()
        assert run.code == 130, run.err
        assert run.doc["outcome"] == "interrupted" and "SIGTERM" in run.doc["error"]
        assert_three_facts(case, run.doc["migration_id"], on="source")
    finally:
        case.cleanup()


def test_killed_destination_qemu(lab_env: Any, tmp_path: Path) -> None:
    case = Case(lab_env, tmp_path, transition_ms=1500)
    try:
        background = case.start()
        case.wait_hook("drain")
        pidfile = lab_env.hosts[1].dir / "run" / "qemu" / f"{case.name}.pid"
        os.kill(int(pidfile.read_text()), signal.SIGKILL)  # the incoming QEMU of this test's guest
        run = background.wait()
        assert run.code == 4 and run.doc["outcome"] == "rolled-back", run.err
        assert_three_facts(case, run.doc["migration_id"], on="source")
    finally:
        case.cleanup()


def test_killed_destination_libvirtd(lab_env: Any, tmp_path: Path) -> None:
    # A destination of this test's own (the watch test's way): its daemon is killed, then restarted.
    root = Path(tempfile.mkdtemp(prefix="orch-f-", dir="/var/tmp"))  # unix socket paths: short
    case: Case | None = None
    try:
        (extra,) = lab.up(1, root)
        case = Case(lab_env, tmp_path, transition_ms=3000)
        case.dst_host, case.dst_conn = extra, Host.open(extra.uri)
        background = case.start()
        case.wait_hook("drain")
        daemon = extra.pid("libvirtd")
        assert daemon is not None
        os.kill(daemon, signal.SIGKILL)
        run = background.wait()
        assert run.code == 4 and run.doc["outcome"] == "rolled-back", run.err
        with contextlib.suppress(Exception):
            case.dst_conn.close()
        # Restart the destination (its virtlogd first: the new daemons start their own), then look.
        virtlogd = extra.pid("virtlogd")
        if virtlogd is not None:
            os.kill(virtlogd, signal.SIGTERM)
        lab.up(1, root)
        case.dst_conn = Host.open(extra.uri)
        # The restarted daemon killed the orphaned incoming QEMU: the destination has no copy at all.
        case.wait_for("the destination to drop the incoming VM", lambda: case.state(1) == "absent")
        assert any("could not ask" in note for note in run.doc["notes"]), run.doc["notes"]
        assert_three_facts(case, run.doc["migration_id"], on="source")
    finally:
        if case is not None:
            case.cleanup()
            with contextlib.suppress(Exception):
                case.dst_conn.close()
        lab.down(root)
        shutil.rmtree(root, ignore_errors=True)


def test_a_second_run_is_refused_naming_the_first(lab_env: Any, tmp_path: Path) -> None:
    case = Case(lab_env, tmp_path, transition_ms=3000)
    try:
        case.write_policy(hooks=case.hook("before", "--sleep-ms=1500", timeout_ms=10000))
        other = case.twin("second")
        other.write_policy(hooks=other.hook("before"))
        first = case.start()
        first_id = case.wait_hook("before")["env"]["ORCH_MIGRATION_ID"]
        refusals = [other.migrate()]  # while the first runs its before hook (no job yet)
        case.wait_hook("drain")
        refusals.append(other.migrate())  # while the first's job runs
        for refused in refusals:
            assert refused.code == 2, refused.err
            line = error_line(refused.err)
            assert "is already being migrated" in line and f"by migration {first_id}" in line, line
        assert other.hooks() == [], "the second run acted on nothing"
        run = first.wait()
        assert run.code == 0 and run.doc["migration_id"] == first_id, run.err
        assert_three_facts(case, first_id, on="destination")
    finally:
        case.cleanup()


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
print("released", flush=True)
"""


def test_journal_locked_by_another_process(lab_env: Any, tmp_path: Path) -> None:
    # Locked from the before hook on for 3 s: the job starts and its first events arrive meanwhile;
    # the gate (a dirty guest at 32 MiB/s) holds the drains until after the lock is gone.
    case = Case(lab_env, tmp_path, workload="dirty")
    locker: subprocess.Popen[str] | None = None
    try:
        case.write_policy(hooks=case.hook("before", "--sleep-ms=300"), switchover='drain = "gated"')
        background = case.start("--bandwidth", "32")
        case.wait_hook("before")
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(case.journal), "3"], stdout=subprocess.PIPE, text=True
        )
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        background.wait_line(r"phase job-running")
        assert locker.poll() is None, "the job started while the journal was locked"
        assert locker.wait(30) == 0
        run = background.wait()
        assert run.code == 0 and run.doc["journal_error"] is None, run.err
        doc, record = run.doc, case.history(run.doc["migration_id"])
        assert_three_facts(case, doc["migration_id"], on="destination")
        # Every record landed: what the report tells is what the journal holds.
        told = [e for e in doc["timeline"] if e["kind"] == "event"]
        held = [e for e in record["events"] if e["kind"] in ("vfio", "qemu")]
        assert len(told) == len(held) and len(held) >= 8, (told, held)
        phases = [e["text"] for e in doc["timeline"] if e["kind"] == "phase"]
        assert [e["name"] for e in record["events"] if e["name"].startswith("phase ")] == [
            *phases,
            "phase done",
        ]
        assert len(record["hook_runs"]) == len(doc["hooks"]) == 3
        assert len(record["device_actions"]) == 4  # drain starting, done; undrain starting, done
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
            locker.wait()
        case.cleanup()


def test_journal_locked_across_a_drain(lab_env: Any, tmp_path: Path) -> None:
    case = Case(lab_env, tmp_path, transition_ms=1000)
    locker: subprocess.Popen[str] | None = None
    try:
        case.write_policy(hooks=case.hook("before", "--sleep-ms=300"))
        background = case.start()
        case.wait_hook("before")
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(case.journal), "6"], stdout=subprocess.PIPE, text=True
        )
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        case.wait_hook("drain")
        assert locker.poll() is None, "the drain started while the journal was locked"
        assert locker.wait(30) == 0
        run = background.wait()
        assert run.doc["outcome"] == "succeeded", run.err
        assert_three_facts(case, run.doc["migration_id"], on="destination")
        actions = case.history(run.doc["migration_id"])["device_actions"]
        assert [(a["action"], a["status"]) for a in actions] == [
            ("drain", "starting"),
            ("drain", "done"),
            ("undrain", "starting"),
            ("undrain", "done"),
        ], "every record landed"
        assert run.code == 0 and run.doc["journal_error"] is None, run.doc["journal_error"]
        # The drain was written to the migration's run log at once (the lock never touched it), and the
        # run log is gone now that the journal holds everything.
        assert not any("could not" in n for n in run.doc["notes"]), run.doc["notes"]
        assert not case.journal.with_name(case.journal.name + ".runs").exists()
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
            locker.wait()
        case.cleanup()


HOSTILE_NAMES = ["vm\n1", "../../etc/passwd", "\x1b]0;owned\x07", "$(reboot)'\"", "x" * 3000]


def test_refused_before_anything(lab_env: Any, tmp_path: Path) -> None:
    case = Case(lab_env, tmp_path)
    a, b = lab_env.hosts[0].uri, lab_env.hosts[1].uri
    try:
        # A hook that does not exist: the pre-flight refuses (and journals the refusal).
        case.write_policy(hooks='[[hooks.before]]\nargv = ["/no/such/hook"]\n')
        run = case.migrate()
        assert run.code == 2 and "/no/such/hook" in error_line(run.err), run.err
        assert_three_facts(case, None)
        # A policy its group may write: refused before the journal is even opened.
        case.journal.unlink()
        case.write_policy(mode=0o664)
        run = case.migrate()
        assert run.code == 2 and "writable by group" in error_line(run.err), run.err
        assert not case.journal.exists()
        assert_three_facts(case, None)
        # Hostile domain names and URIs.
        case.write_policy()
        hostile = [[name, b, "-c", a] for name in HOSTILE_NAMES] + [
            [case.name, b + "\n", "-c", a],
            [case.name, b, "-c", a + "\r\nX"],
            [case.name, "", "-c", a],
            [case.name, b, "-c", a, "--dname", "x\ny"],
        ]
        for args in hostile:
            run = cli("migrate", *args, "--policy", str(case.policy), "--journal", str(case.journal))
            assert run.code == 2, (args, run.err)
            error_line(run.err)
        assert_three_facts(case, None)
        # A corrupt journal: refused (exit 7), the file left as it was.
        case.journal.unlink(missing_ok=True)
        with Journal.open(case.journal) as journal:
            journal.begin_migration("old", "migrate", "vm0", a, b, "p", 1.0)
            for n in range(400):  # some pages to damage
                journal.record_event(
                    "old", "h", None, "note", f"note {n} " + "x" * 200, None, None, None, 1.0
                )
            journal.finish_migration("old", "succeeded", True, None, 0, 2.0)
        data = bytearray(case.journal.read_bytes())
        data[4096:8192] = os.urandom(4096)
        case.journal.write_bytes(bytes(data))
        run = case.migrate()
        assert run.code == 7 and "corrupt" in error_line(run.err), run.err
        assert case.journal.read_bytes() == bytes(data), "the corrupt journal is left as it was"
        assert case.hooks() == [] and case.state(0) == "running" and case.state(1) == "absent"
    finally:
        case.cleanup()
