"""Tests of the journal (run logs, imported into SQLite when a migration ends) on real files in tmp_path."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.errors import BadInput, EnvironmentProblem, ExitCode, OrchestratorError
from orchestrator.core.hooks import HookResult, Trigger
from orchestrator.core.records import ActionStatus, DeviceAction, EventKind, MigrationKind, still_drained
from orchestrator.core.report import Outcome
from orchestrator.core.vfio import Role
from orchestrator.edges import journal_db, procfs, runlog
from orchestrator.edges.journal import Journal
from orchestrator.edges.journal_db import (
    DEFAULT_PATH,
    ENV_VAR,
    SCHEMA_VERSION,
    JournalCorrupt,
    check_in_background,
    journal_path,
)

T0 = 1_700_000_000.0
HOST = os.uname().nodename
SRC, DST = "qemu:///system", "qemu+ssh://dst/system"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    with Journal.open(path) as opened:
        yield opened


def begin(journal: Journal, mid: str, domain: str = "vm1", started: float = T0) -> None:
    journal.begin_migration(mid, MigrationKind.MIGRATE, domain, SRC, DST, "rdma-drain", started)


def finish(journal: Journal, mid: str, summary: dict[str, object] | None = None) -> None:
    journal.finish_migration(mid, Outcome.SUCCEEDED, True, None, 0, T0 + 9, summary)


def vfio_event(journal: Journal, mid: str, state: str, at: float) -> None:
    data = {"device-id": "hostdev0", "device-state": state}
    kind, device = EventKind.VFIO, "hostdev0"
    journal.record_event(mid, "src", Role.SOURCE, kind, "VFIO_MIGRATION", device, state, at, at, data)


def hook_result(trigger: Trigger, exit_code: int, started: float) -> dict[str, object]:
    result = HookResult("drain-rdma", trigger, "hostdev0", ["/usr/bin/drain", "vm1"], 1, started, 0.0, 4242)
    result.ended, result.duration_ms, result.exit_code = started + 0.25, 250.0, exit_code
    result.error = None if exit_code == 0 else f"exited with status {exit_code}"
    result.output_tail = "drained 3 QPs\n"
    return result.to_json()


def supervisor_writes(journal: Journal, mid: str, record: dict[str, Any]) -> None:
    """A record the hook supervisor writes itself, through the run log's shared file description."""
    log = journal.run_log(mid)
    assert log is not None
    os.write(log.fd, (json.dumps(record) + "\n").encode())


def hook_start(run: str, started: float, *, armed: bool = False) -> dict[str, Any]:
    return {"k": "hook-start", "run": run, "hook": 0, "label": f"label-{run}", "trigger": "drain",
            "device_id": "hostdev0", "argv": ["/usr/bin/drain", "vm1"], "attempt": 1, "timeout_ms": 5000,
            "armed": armed, "pid": 999, "start": 1, "tag": run, "started": started}  # fmt: skip


def hook_end(run: str, started: float, exit_code: int) -> dict[str, Any]:
    return {"k": "hook-end", "run": run, "started": started, "ended": started + 0.5, "duration_ms": 500.0,
            "exit_code": exit_code, "timed_out": False, "error": None if exit_code == 0 else "failed",
            "output_tail": f"{run} out\n"}  # fmt: skip


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    program = "import os; print(os.getpid())"
    child = subprocess.run([sys.executable, "-c", program], check=True, capture_output=True)
    return int(child.stdout)


def write_run_log(
    path: Path, mid: str, pid: int, pid_start: int | None = None, *, ended: bool = False
) -> Path:
    """A run log written by hand, as the process `pid` would have left it (its reserved zeros after)."""
    records: list[dict[str, Any]] = [
        {"k": "begin", "id": mid, "kind": "migrate", "domain": "vm1", "source_uri": SRC,
         "destination_uri": DST, "policy": "rdma-drain", "started": T0, "parent": None, "pid": pid,
         "pid_start": pid_start, "host": HOST, "drain_mode": "prepare"},
        {"k": "phase", "phase": "switching-over", "at": T0 + 1},
        {"k": "action", "device_id": "hostdev0", "action": "drain", "status": "starting", "at": T0 + 2,
         "detail": "prepare"},
        {"k": "event", "host": "src", "role": "source", "kind": "vfio", "name": "VFIO_MIGRATION",
         "device_id": "hostdev0", "state": "pre-copy", "qemu_time": 1.0, "received": T0 + 3,
         "data": {"i": 1}},
    ]  # fmt: skip
    if ended:
        records.append({"k": "end", "outcome": "succeeded", "changed": True, "error": None, "exit_code": 0,
                        "ended": T0 + 9, "dropped": 0})  # fmt: skip
    runlog.directory_of(path).mkdir(mode=0o700, parents=True, exist_ok=True)
    log = runlog.path_of(runlog.directory_of(path), mid)
    log.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + bytes(4096))
    return log


def counts(path: Path) -> list[int]:
    """How many rows each table of the journal's file has: migrations, events, hook_runs, device_actions."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = ("migrations", "events", "hook_runs", "device_actions")
        return [conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


# --- the path and the file ------------------------------------------------------------------------


def test_journal_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert journal_path(None) == DEFAULT_PATH
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env.sqlite"))
    assert journal_path(None) == tmp_path / "env.sqlite"
    assert journal_path(tmp_path / "explicit.sqlite") == tmp_path / "explicit.sqlite"


def test_open_creates_the_directory_and_the_versioned_schema(path: Path, journal: Journal) -> None:
    mask = os.umask(0)
    os.umask(mask)
    assert path.parent.stat().st_mode & 0o777 == 0o750 & ~mask
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"migrations", "events", "hook_runs", "device_actions", "migrations_by_started"} <= names
    assert {"events_by_migration", "hook_runs_by_migration", "device_actions_by_migration"} <= names
    conn.close()
    assert not journal.runs.exists(), "a run log directory before any run"


def test_a_newer_schema_is_refused(path: Path) -> None:
    Journal.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    for opening in (Journal.open, Journal.open_readonly):
        with pytest.raises(EnvironmentProblem, match="newer than this orchestrator"):
            opening(path)


def _not_a_database(tmp_path: Path) -> Path:
    bad = tmp_path / "notes.txt"
    bad.write_text("not SQLite, and long enough for SQLite to read a header from it\n" * 4)
    return bad


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("")
    return tmp_path / "afile" / "journal.sqlite"


@pytest.mark.parametrize(
    ("make", "error"),
    [(lambda tmp: tmp, BadInput), (_under_a_file, EnvironmentProblem), (_not_a_database, EnvironmentProblem)],
    ids=["a directory", "under a file", "not a database"],
)
def test_an_unusable_path_is_one_line_naming_it(
    tmp_path: Path, make: Callable[[Path], Path], error: type[OrchestratorError]
) -> None:
    bad = make(tmp_path)
    before = bad.read_bytes() if bad.is_file() else None
    for opening in (Journal.open, Journal.open_readonly) if bad.exists() else (Journal.open,):
        with pytest.raises(error) as caught:
            opening(bad)
        line = caught.value.line()
        assert str(bad) in line and "--journal PATH" in line and "\n" not in line
    assert before is None or bad.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_directory_is_an_environment_problem(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(EnvironmentProblem) as caught:
        Journal.open(locked / "sub" / "journal.sqlite")
    assert "--journal PATH" in caught.value.line()


# --- writing, importing and reading back ------------------------------------------------------------


def test_a_full_migration_round_trips(path: Path, journal: Journal) -> None:
    begin(journal, "m-1")
    log = runlog.path_of(journal.runs, "m-1")
    journal.record_phase("m-1", "switching-over", T0 + 0.5)  # 1 (a note)
    vfio_event(journal, "m-1", "pre-copy-p2p-prepare", T0 + 1)  # 2
    assert journal.record_device_action("m-1", "hostdev0", "drain", "starting", T0 + 1.1, "prepare") is None
    supervisor_writes(journal, "m-1", hook_start("r1", T0 + 1.2))
    supervisor_writes(journal, "m-1", hook_start("r2", T0 + 1.3, armed=True))
    vfio_event(journal, "m-1", "pre-copy-p2p", T0 + 1.4)  # 4
    supervisor_writes(journal, "m-1", hook_end("r1", T0 + 1.2, 0))  # 5
    supervisor_writes(journal, "m-1", hook_end("r2", T0 + 1.3, 0))  # armed: the orchestrator records it
    journal.record_hook("m-1", hook_result(Trigger.UNDRAIN, 3, T0 + 2.5))  # 6
    journal.record_hook("m-1", {**hook_result(Trigger.DRAIN, 0, T0), "run": "r1"})  # the supervisor's: none
    journal.record_device_action("m-1", "hostdev0", DeviceAction.DRAIN, ActionStatus.DONE, T0 + 2.6)  # 7
    journal.record_event("m-1", "orchestrator", None, "note", "undrain failed", None, None, None, T0 + 2.7)
    assert log.exists()
    journal.finish_migration("m-1", Outcome.ROLLED_BACK, False, "hook failed", 4, T0 + 3, {"downtime_ms": 12})

    assert journal.failures == []
    assert not log.exists(), "the imported run log was left"
    assert counts(path) == [1, 4, 2, 2]
    record = journal.get_migration("m-1")
    row = record.migration
    assert (row.kind, row.domain, row.policy, row.phase) == ("migrate", "vm1", "rdma-drain", "switching-over")
    assert (row.outcome, row.changed, row.error, row.exit_code) == ("rolled-back", False, "hook failed", 4)
    assert (row.started, row.ended, row.duration_s, row.parent) == (T0, T0 + 3, 3.0, None)
    assert row.summary == {"downtime_ms": 12}
    assert (row.pid, row.host, row.drain_mode) == (os.getpid(), HOST, "prepare")
    seqs = [[r.seq for r in rows] for rows in (record.events, record.hook_runs, record.device_actions)]
    assert seqs == [[1, 2, 4, 8], [5, 6], [3, 7]]
    phase, first, _, note = record.events
    assert (phase.kind, phase.name, phase.host) == ("note", "phase switching-over", "orchestrator")
    assert (phase.received, first.qemu_time) == (T0 + 0.5, T0 + 1)
    assert (first.kind, first.role, first.state) == ("vfio", "source", "pre-copy-p2p-prepare")
    assert first.data == {"device-id": "hostdev0", "device-state": "pre-copy-p2p-prepare"}
    assert (note.kind, note.name, note.role, note.data) == ("note", "undrain failed", None, None)
    run, answer = record.hook_runs
    assert (run.trigger, run.label, run.argv[0], run.ok) == ("drain", "label-r1", "/usr/bin/drain", True)
    assert (run.started, run.ended, run.duration_ms, run.output_tail) == (T0 + 1.2, T0 + 1.7, 500, "r1 out\n")
    assert (answer.trigger, answer.label, answer.exit_code, answer.ok) == ("undrain", "drain-rdma", 3, False)
    assert (answer.ended, answer.error) == (T0 + 2.75, "exited with status 3")
    as_json = json.loads(json.dumps(record.to_json()))
    assert (as_json["outcome"], [h["ok"] for h in as_json["hook_runs"]]) == ("rolled-back", [True, False])


def test_a_running_migration_reads_as_running_with_its_events(path: Path, journal: Journal) -> None:
    journal.begin_migration("e-1", "evacuate-item", "vm2", "a", "b", "default", T0, parent="evac-7")
    vfio_event(journal, "e-1", "pre-copy-p2p-prepare", T0 + 1)
    journal.record_device_action("e-1", "hostdev0", "drain", "starting", T0 + 2, "prepare")
    supervisor_writes(journal, "e-1", hook_start("r9", T0 + 2.1))  # its hook still runs
    (listed,) = journal.list_migrations()
    assert (listed.id, listed.outcome, listed.ended, listed.duration_s) == ("e-1", "running", None, None)
    with Journal.open_readonly(path) as reader:  # `orchestrator history`, as another process would
        record = reader.get_migration("e-1")
        row = record.migration
        assert (row.outcome, row.parent, row.kind, row.error) == ("running", "evac-7", "evacuate-item", None)
        assert [e.state for e in record.events] == ["pre-copy-p2p-prepare"]
        (hook,) = record.hook_runs
        assert (hook.label, hook.ended, hook.exit_code, hook.ok) == ("label-r9", None, None, False)
        assert [(a.device_id, a.status) for a in reader.device_actions("e-1")] == [("hostdev0", "starting")]
        assert [m.id for m in reader.children("evac-7")] == ["e-1"]
        assert reader.unfinished() == []  # its process lives
        vfio_event(journal, "e-1", "pre-copy-p2p", T0 + 3)
        assert len(reader.get_migration("e-1").events) == 2
    assert counts(path) == [0, 0, 0, 0], "a running migration in SQLite"


@pytest.mark.parametrize("owner", ["dead", "reused"])
def test_a_run_log_of_a_dead_process_reads_as_interrupted_and_is_unfinished(path: Path, owner: str) -> None:
    me = procfs.proc(os.getpid())
    assert me is not None
    # a dead pid, or this pid with another start time: the pid now names another process
    pid, start = (dead_pid(), None) if owner == "dead" else (os.getpid(), me.start + 1)
    log = write_run_log(path, "m-dead", pid, start)
    with Journal.open(path) as journal:
        assert log.exists(), "a run log without an end was imported"
        (listed,) = journal.list_migrations()
        record = journal.get_migration("m-dead")
        (unfinished,) = journal.unfinished()
        assert journal.unfinished("elsewhere") == []
    for row in (listed, record.migration, unfinished):
        assert (row.id, row.outcome, row.phase) == ("m-dead", "interrupted", "switching-over")
        assert row.error is not None and f"process {pid}" in row.error and "recover" in row.error
    assert [e.name for e in record.events] == ["phase switching-over", "VFIO_MIGRATION"]
    assert still_drained(record.device_actions) == {"hostdev0": "prepare"}


def test_a_finished_run_log_left_on_disk_is_imported_by_the_next_open_once(path: Path) -> None:
    log = write_run_log(path, "m-left", dead_pid(), ended=True)
    kept = log.read_bytes()
    with Journal.open_readonly(path) as reader:  # read, not imported: an ended run is not unfinished
        (row,) = reader.list_migrations()
        assert (row.id, row.outcome, row.ended, row.error) == ("m-left", "succeeded", T0 + 9, None)
        assert reader.unfinished() == []
    with Journal.open(path) as journal:
        assert not log.exists(), "the imported run log was left"
        assert journal.failures == []
        assert journal.import_finished() == []  # nothing left to import
        record = journal.get_migration("m-left")
    assert record.migration.outcome == "succeeded"
    assert ([e.seq for e in record.events], [a.seq for a in record.device_actions]) == ([1, 3], [2])
    assert counts(path) == [1, 2, 0, 1]
    log.parent.mkdir(mode=0o700, exist_ok=True)  # (removed once empty)
    log.write_bytes(kept)  # as if the importer was killed between its commit and the unlink
    Journal.open(path).close()
    assert not log.exists()
    assert counts(path) == [1, 2, 0, 1], "imported twice"


def test_list_is_newest_first_and_filters_by_domain(journal: Journal) -> None:
    for index, domain in enumerate(["vm1", "vm2", "vm1", "vm3"]):
        begin(journal, f"m-{index}", domain, started=T0 + index)
        if index % 2 == 0:
            finish(journal, f"m-{index}")  # imported; the others read from their run logs
    assert [m.id for m in journal.list_migrations()] == ["m-3", "m-2", "m-1", "m-0"]
    assert [m.id for m in journal.list_migrations(limit=2)] == ["m-3", "m-2"]
    assert [m.id for m in journal.list_migrations(domain="vm1")] == ["m-2", "m-0"]
    assert [m.outcome for m in journal.list_migrations(domain="vm2")] == ["running"]
    assert journal.list_migrations(domain="nope") == []


def test_concurrent_recorders_get_true_sequence_numbers(journal: Journal) -> None:
    begin(journal, "m-1")
    per_thread = 500
    start = threading.Barrier(2)

    def record(name: str) -> None:
        start.wait()
        for index in range(per_thread):
            journal.record_event("m-1", name, "source", "qemu", f"{name}-{index}", None, None, None, T0, None)

    threads = [threading.Thread(target=record, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    while_running = journal.get_migration("m-1").events
    finish(journal, "m-1")
    events = journal.get_migration("m-1").events
    assert events == while_running
    assert [e.seq for e in events] == list(range(1, 2 * per_thread + 1))
    for name in ("a", "b"):  # each thread's events in the order it recorded them
        assert [e.name for e in events if e.host == name] == [f"{name}-{i}" for i in range(per_thread)]


def test_device_actions_are_public_in_sequence(journal: Journal) -> None:
    begin(journal, "m-1")
    assert journal.record_device_action("m-1", "hostdev0", DeviceAction.DRAIN, "starting", T0, "d0") is None
    vfio_event(journal, "m-1", "pre-copy-p2p", T0 + 1)
    journal.record_device_action("m-1", "hostdev0", "drain", ActionStatus.DONE, T0 + 2)
    journal.record_device_action("m-1", "hostdev1", "drain", "starting", T0 + 3, "d1")
    journal.record_device_action("m-1", "hostdev0", "undrain", "starting", T0 + 4)
    journal.record_device_action("m-1", "hostdev0", "undrain", "done", T0 + 5)
    expected = [(1, "hostdev0", "drain", "starting"), (3, "hostdev0", "drain", "done"),
                (4, "hostdev1", "drain", "starting"), (5, "hostdev0", "undrain", "starting"),
                (6, "hostdev0", "undrain", "done")]  # fmt: skip
    for ended in (False, True):  # from the run log, then from the journal
        if ended:
            finish(journal, "m-1")
        actions = journal.device_actions("m-1")
        assert [(a.seq, a.device_id, a.action, a.status) for a in actions] == expected
        assert actions == journal.get_migration("m-1").device_actions
        assert still_drained(actions) == {"hostdev1": "d1"}
    assert journal.device_actions("no-such-id") == ()
    assert journal.failures == []


def test_a_lone_surrogate_in_an_event_is_imported(journal: Journal) -> None:
    begin(journal, "m-1")
    name, data = "bad \udc80 name", {"x": "\udc80"}
    journal.record_event("m-1", "src", "source", "qemu", name, None, None, None, T0, data)
    assert journal.get_migration("m-1").events[0].data == {"x": "\udc80"}  # read from the run log
    finish(journal, "m-1")
    assert journal.failures == []
    assert not runlog.path_of(journal.runs, "m-1").exists()
    (event,) = journal.get_migration("m-1").events
    assert event.name.startswith("bad ") and event.name.endswith(" name")
    assert event.data == {"x": "\udc80"}


# --- ids ------------------------------------------------------------------------------------------


def test_lookup_by_unique_prefix_and_an_exact_id_wins(journal: Journal) -> None:
    for migration_id in ("3f2a9c", "3f2b00", "7c1d44", "ab", "abc", "xyz", "xy"):
        begin(journal, migration_id)
    for migration_id in ("3f2a9c", "ab", "xyz"):
        finish(journal, migration_id)  # some in the journal, some in run logs
    assert journal.get_migration("7").migration.id == "7c1d44"
    assert journal.get_migration("3f2a").migration.id == "3f2a9c"
    assert journal.get_migration("3f2b00").migration.id == "3f2b00"
    assert journal.get_migration("ab").migration.id == "ab"
    assert journal.get_migration("xy").migration.id == "xy"


def test_an_ambiguous_prefix_lists_the_candidates(journal: Journal) -> None:
    for migration_id in ("3f2a9c", "3f2b00", "7c1d44"):
        begin(journal, migration_id)
    finish(journal, "3f2b00")
    with pytest.raises(BadInput) as caught:
        journal.get_migration("3f")
    line = caught.value.line()
    assert "3f2a9c" in line and "3f2b00" in line and "7c1d44" not in line and "\n" not in line


def test_an_unknown_id_says_how_to_list(path: Path, journal: Journal) -> None:
    with pytest.raises(BadInput) as caught:
        journal.get_migration("nope")
    hint = f"list them with: orchestrator history --journal '{path}'"
    assert caught.value.line() == f"no migration nope in {path}; {hint}"
    with pytest.raises(BadInput):
        journal.get_migration("")


def test_the_default_journal_hint_needs_no_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "journal.sqlite"))
    with Journal.open_readonly(journal_path()) as journal, pytest.raises(BadInput) as caught:
        journal.get_migration("3f2a")
    assert caught.value.line().endswith("; list them with: orchestrator history")
    assert files(tmp_path) == []


# --- bad calls ------------------------------------------------------------------------------------


def test_bad_values_are_refused_at_the_call(journal: Journal) -> None:
    begin(journal, "m-1")
    with pytest.raises(ValueError, match="event kind"):
        journal.record_event("m-1", "h", "source", "bogus", "x", None, None, None, T0, None)
    with pytest.raises(ValueError):
        journal.record_device_action("m-1", "hostdev0", "explode", "starting", T0)
    with pytest.raises(ValueError):
        journal.finish_migration("m-1", "exploded", None, None, None, T0, {})
    with pytest.raises(ValueError):
        journal.finish_migration("m-1", Outcome.RUNNING, None, None, None, T0, {})
    with pytest.raises(ValueError):
        journal.begin_migration("../m-2", "migrate", "vm1", "a", "b", "p", T0)
    assert [r["k"] for r in journal.records("m-1")] == ["begin"]  # nothing of the refused calls written


def test_a_refused_begin_leaves_no_run_log_behind(journal: Journal) -> None:
    with pytest.raises(ValueError):
        journal.begin_migration("m-2", "teleport", "vm1", "a", "b", "p", T0)
    assert not runlog.path_of(journal.runs, "m-2").exists(), "a refused begin left a run log without records"
    begin(journal, "m-2")  # the id is still free
    assert [r["k"] for r in journal.records("m-2")] == ["begin"]


def test_a_begin_that_cannot_be_written_is_refused(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if data.startswith(b'{"k":"begin"'):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    # a run log without its begin is invisible to history and to recover: the migration must not go on
    with pytest.raises(OrchestratorError):
        begin(journal, "m-1")


def test_a_closed_journal_refuses_writes_and_reads(path: Path) -> None:
    journal = Journal.open(path)
    begin(journal, "m-1")
    finish(journal, "m-1")
    journal.close()
    journal.close()  # idempotent
    with pytest.raises(OrchestratorError, match="not open for writing"):
        begin(journal, "m-2")
    with pytest.raises(OrchestratorError):  # not an empty history
        journal.list_migrations()
    with pytest.raises(OrchestratorError) as caught:
        journal.get_migration("m-1")
    assert not isinstance(caught.value, BadInput), f"a closed journal misleads: {caught.value.line()}"


# --- room for the run log ---------------------------------------------------------------------------


def test_a_run_that_cannot_reserve_its_room_is_refused_leaving_nothing(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_room(fd: int, offset: int, length: int) -> None:
        raise ENOSPC

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(EnvironmentProblem) as caught:
        begin(journal, "m-1")
    assert caught.value.code == ExitCode.ENVIRONMENT == 7
    line = caught.value.line()
    assert os.strerror(errno.ENOSPC) in line and str(runlog.path_of(journal.runs, "m-1")) in line
    assert "\n" not in line
    assert files(journal.runs) == []
    assert journal.list_migrations() == []
    monkeypatch.undo()
    begin(journal, "m-1")  # room again: the id is free


def test_a_short_room_drops_story_records_and_keeps_the_vital_ones(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fallocate = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        if len(calls) > 1:  # the first reservation only: the disk is full after it
            raise ENOSPC
        real_fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(runlog, "MARGIN", runlog.RESERVE - 2048)  # ~2 KiB of room for the story
    begin(journal, "m-1")
    for index in range(30):
        vfio_event(journal, "m-1", f"state-{index}", T0 + index)
    assert journal.record_device_action("m-1", "hostdev0", "drain", "starting", T0 + 40, "prepare") is None
    journal.record_phase("m-1", "switching-over", T0 + 41)
    journal.record_hook("m-1", hook_result(Trigger.DRAIN, 0, T0 + 42))
    journal.finish_migration("m-1", Outcome.SUCCEEDED, True, None, 0, T0 + 50, {"events": 30})
    assert len(calls) > 1, "the room was never found short"

    record = journal.get_migration("m-1")
    kept = len(record.events)
    assert 0 < kept < 30
    assert [e.state for e in record.events] == [f"state-{i}" for i in range(kept)]
    assert [(a.device_id, a.status) for a in record.device_actions] == [("hostdev0", "starting")]
    assert len(record.hook_runs) == 1
    assert (record.migration.outcome, record.migration.summary) == ("succeeded", None)
    dropped = 30 - kept + 2  # the events that did not fit, the phase and the summary
    assert journal.failures == [f"the run log of migration m-1 dropped {dropped} records: its disk was full"]


def test_a_runs_directory_removed_by_another_process_meanwhile_refuses_no_run(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    removed: list[bool] = []

    def open_after_removal(file: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if str(file).endswith(".log") and flags & os.O_CREAT and journal.runs.is_dir() and not removed:
            # another orchestrator removed the empty directory (its import done) after our mkdir
            journal.runs.rmdir()
            removed.append(True)
        return real_open(file, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_after_removal)
    begin(journal, "m-1")
    assert removed and [r["k"] for r in journal.records("m-1")] == ["begin"]


# --- reading only (orchestrator history) -----------------------------------------------------------


def test_a_missing_or_empty_journal_reads_as_empty_and_nothing_is_created(tmp_path: Path) -> None:
    (tmp_path / "empty.sqlite").write_bytes(b"")
    for path in (tmp_path / "no" / "such" / "journal.sqlite", tmp_path / "empty.sqlite"):
        with Journal.open_readonly(path) as journal:
            assert journal.readonly
            assert journal.list_migrations() == journal.unfinished() == []
            assert journal.list_migrations(domain="vm1") == []
            with pytest.raises(BadInput):
                journal.get_migration("3f2a")
            with pytest.raises(OrchestratorError, match="not open for writing"):
                begin(journal, "m-1")
    assert files(tmp_path) == ["empty.sqlite"], "reading created a file or directory"
    assert (tmp_path / "empty.sqlite").read_bytes() == b""


def test_a_readonly_journal_reads_records_and_refuses_writes(path: Path) -> None:
    with Journal.open(path) as writer:
        begin(writer, "m-1")
        vfio_event(writer, "m-1", "pre-copy-p2p-prepare", T0 + 1)
        finish(writer, "m-1")
        begin(writer, "m-2", started=T0 + 10)  # its run log stays: this process still runs
    listing = (files(path.parent), files(runlog.directory_of(path)))
    assert listing == (["journal.sqlite", "journal.sqlite.runs"], ["m-2.log"])
    before = path.read_bytes()
    with Journal.open_readonly(path) as journal:
        listed = [(m.id, m.outcome) for m in journal.list_migrations()]
        assert listed == [("m-2", "running"), ("m-1", "succeeded")]
        assert [e.state for e in journal.get_migration("m-1").events] == ["pre-copy-p2p-prepare"]
        with pytest.raises(OrchestratorError, match="not open for writing"):
            begin(journal, "m-3")
    assert (files(path.parent), files(runlog.directory_of(path))) == listing, "side files were left"
    assert path.read_bytes() == before


# --- a journal replaced, damaged, or on a full disk -----------------------------------------------------


def test_a_journal_replaced_by_garbage_keeps_the_run_log_and_is_never_touched(
    path: Path, tmp_path: Path
) -> None:
    garbage = b"an admin's notes, moved over the journal by mistake\n" * 200
    with Journal.open(path) as journal:
        begin(journal, "m-1")
        vfio_event(journal, "m-1", "pre-copy", T0 + 1)
        journal.record_device_action("m-1", "hostdev0", "drain", "starting", T0 + 2, "prepare")
        log = runlog.path_of(journal.runs, "m-1")
        replacement = tmp_path / "garbage"
        replacement.write_bytes(garbage)
        replacement.replace(path)
        finish(journal, "m-1", {"events": 1})
        (failure,) = journal.failures
    assert "is not an SQLite database" in failure and str(log) in failure and "\n" not in failure
    assert [r["k"] for r in runlog.read(log)] == ["begin", "event", "action", "summary", "end"]
    other = sqlite3.connect(tmp_path / "other.sqlite", isolation_level=None)  # a -wal with records in it
    for statement in ("PRAGMA journal_mode = WAL", "PRAGMA wal_autocheckpoint = 0", "CREATE TABLE t (x)"):
        other.execute(statement)
    wal = Path(f"{path}-wal")
    stale = Path(f"{tmp_path}/other.sqlite-wal").read_bytes()
    other.close()
    wal.write_bytes(stale)
    for opening in (Journal.open_readonly, Journal.open):
        with pytest.raises(EnvironmentProblem) as caught:
            opening(path)
        assert caught.value.code == ExitCode.ENVIRONMENT
        assert f"mv '{path}' '{path}.not-a-journal'" in caught.value.line()
        assert path.read_bytes() == garbage, "SQLite touched the file that is not a journal"
        assert wal.read_bytes() == stale
    assert log.exists()


def journal_with_data(path: Path) -> bytes:
    """A closed journal of 30 ended migrations with events (tens of pages); its bytes."""
    with Journal.open(path) as writer:
        for index in range(30):
            begin(writer, f"m-{index}", started=T0 + index)
            for event in range(20):
                vfio_event(writer, f"m-{index}", "x" * 100, T0 + event)
            finish(writer, f"m-{index}")
    assert files(path.parent) == [path.name], "side files (or an empty run log directory) were left"
    return path.read_bytes()


def _garbage_after_page_1(data: bytes) -> bytes:
    page = int.from_bytes(data[16:18], "big")
    assert len(data) > 10 * page
    return data[:page] + bytes((index * 37 + 11) % 256 for index in range(len(data) - page))


CORRUPTIONS = {
    "garbage from page 2 on": _garbage_after_page_1,
    "truncated to 2 pages": lambda data: data[: 2 * int.from_bytes(data[16:18], "big")],
    "truncated inside page 1": lambda data: data[:3000],
    "truncated inside the header": lambda data: data[:50],
}


def _read(journal: Journal) -> None:
    with journal:
        journal.list_migrations()
        journal.get_migration("m-3")


OPENINGS: dict[str, Callable[[Path], object]] = {
    "open(check=True)": lambda path: Journal.open(path, check=True).close(),
    # what `migrate` and `evacuate` do: the check started first, awaited before the journal opens
    "checked in the background": lambda p: Journal.open(p, check=not check_in_background(p)()).close(),
    "open and read": lambda path: _read(Journal.open(path)),  # open alone reads the header only
    "open_readonly and read": lambda path: _read(Journal.open_readonly(path)),
}


def assert_corruption_line(error: OrchestratorError, path: Path) -> None:
    line = error.line()
    assert isinstance(error, EnvironmentProblem)
    assert error.code == ExitCode.ENVIRONMENT
    assert "\n" not in line
    assert line.startswith(f"the journal {path} is corrupt: ")
    assert f"move it aside: mv '{path}' '{path}.corrupt' (a new journal is created on the next run)" in line
    assert f"salvage it with: sqlite3 '{path}' .recover" in line


@pytest.mark.parametrize("opening", OPENINGS)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_journal_is_one_line_saying_how_to_move_it_aside(
    path: Path, corruption: str, opening: str
) -> None:
    damaged = CORRUPTIONS[corruption](journal_with_data(path))
    path.write_bytes(damaged)
    with pytest.raises(OrchestratorError) as caught:
        OPENINGS[opening](path)
    assert_corruption_line(caught.value, path)
    assert path.read_bytes() == damaged, "a corrupt journal was written to"
    assert files(path.parent) == [path.name], "side files were left behind"
    path.rename(f"{path}.corrupt")  # the hint works: a new journal is created and used
    with Journal.open(path, check=True) as fresh:
        begin(fresh, "m-new")
        finish(fresh, "m-new")
        assert [m.id for m in fresh.list_migrations()] == ["m-new"]
        assert fresh.failures == []


def test_check_finds_damage_that_open_without_it_does_not_read(path: Path) -> None:
    data = bytearray(journal_with_data(path))
    with Journal.open(path) as journal:
        conn = sqlite3.connect(path)
        sql = "SELECT rootpage FROM sqlite_master WHERE name = 'events_by_migration'"
        (root,) = conn.execute(sql).fetchone()
        conn.close()
        journal.check()  # a sound journal
    page = int.from_bytes(data[16:18], "big")
    data[(root - 1) * page : root * page] = bytes(page)  # the index's root page zeroed
    path.write_bytes(bytes(data))
    with Journal.open(path) as journal:  # the migrations table is intact: open reads only that
        assert len(journal.list_migrations()) == 30
        with pytest.raises(EnvironmentProblem) as caught:
            journal.check()
    assert_corruption_line(caught.value, path)
    with pytest.raises(EnvironmentProblem) as caught:
        check_in_background(path)()
    assert_corruption_line(caught.value, path)
    with pytest.raises(EnvironmentProblem) as caught:
        Journal.open(path, check=True)
    assert_corruption_line(caught.value, path)


def test_a_background_check_of_a_sound_or_missing_journal_passes_and_creates_nothing(path: Path) -> None:
    assert check_in_background(path)() is True
    assert not path.parent.exists(), "checking created the journal's directory"
    journal_with_data(path)
    assert check_in_background(path)() is True
    assert files(path.parent) == [path.name], "side files were left behind"


def test_a_corrupt_journal_names_a_leftover_write_ahead_log_in_the_hint(path: Path) -> None:
    journal_with_data(path)
    wal = Path(f"{path}-wal")
    wal.write_bytes(b"records of a crashed writer")
    detail = "*** in database main ***\nPage 9: btreeInitPage() returns error code 11"
    line = JournalCorrupt(path, detail).line()
    assert line.startswith(f"the journal {path} is corrupt: Page 9: btreeInitPage() returns error code 11;")
    assert f"mv '{path}' '{path}.corrupt' && mv '{wal}' '{path}.corrupt-wal' (a new" in line


def test_a_full_disk_hidden_behind_a_failed_rollback_is_named(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hidden = sqlite3.OperationalError("cannot rollback - no transaction is active")

    def free(blocks: int) -> Callable[[object], os.statvfs_result]:
        return lambda _: os.statvfs_result((4096, 4096, 1 << 20, blocks, blocks, 1000, 900, 900, 0, 255))

    monkeypatch.setattr(os, "statvfs", free(1))  # 4 KiB left
    full = journal_db.disk_full(path, hidden)
    assert full is not None and full.code == ExitCode.ENVIRONMENT
    problem = journal_db.db_error(path, hidden)
    assert isinstance(problem, EnvironmentProblem)
    assert problem.line().startswith(f"the disk of the journal {path} is full (SQLite: cannot rollback")
    assert "--journal PATH" in problem.line()
    monkeypatch.setattr(os, "statvfs", free(1 << 18))  # 1 GiB left: something else went wrong
    assert journal_db.disk_full(path, hidden) is None
    assert "is full" not in journal_db.db_error(path, hidden).line()
    assert journal_db.disk_full(path, ENOSPC) is not None


# --- journals of older orchestrators ------------------------------------------------------------------


def insert_legacy(path: Path, mid: str, pid: int, host: str = HOST, **more: object) -> None:
    """A migrations row as an orchestrator before the run log wrote it (by default: left running)."""
    columns = {"id": mid, "kind": "migrate", "domain": "vm1", "source_uri": "a", "destination_uri": "b",
               "policy": "p", "started": T0, "outcome": "running", "pid": pid, "host": host,
               **more}  # fmt: skip
    conn = sqlite3.connect(path)
    marks = ", ".join("?" for _ in columns)
    conn.execute(f"INSERT INTO migrations ({', '.join(columns)}) VALUES ({marks})", tuple(columns.values()))
    conn.commit()
    conn.close()


def test_a_legacy_running_row_of_a_dead_process_is_unfinished_and_reads_as_interrupted(path: Path) -> None:
    Journal.open(path).close()
    dead = dead_pid()
    insert_legacy(path, "legacy", dead)
    insert_legacy(path, "other-host", dead, host="elsewhere")
    insert_legacy(path, "recovered", dead, recovered=T0 + 5)
    insert_legacy(path, "ended", dead, outcome="interrupted", exit_code=130, ended=T0 + 1)
    insert_legacy(path, "live", os.getpid())
    with Journal.open(path) as journal:
        assert [m.id for m in journal.unfinished()] == ["legacy"]
        assert [m.id for m in journal.unfinished("elsewhere")] == ["other-host"]
        outcomes = {m.id: m.outcome for m in journal.list_migrations()}
        row = journal.get_migration("legacy").migration
    assert (row.outcome, row.error, row.recovered) == ("interrupted", "orchestrator process died", None)
    assert [outcomes[m] for m in ("legacy", "other-host", "ended", "live")] == ["interrupted", "running"] * 2
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT outcome FROM migrations WHERE id = 'legacy'").fetchone() == ("running",)
    conn.close()


def test_a_schema_1_journal_reads_for_recovery(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(journal_db._SCHEMA.split(journal_db._V2_MARKER)[0])
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    insert_legacy(path, "old", dead_pid())
    with Journal.open_readonly(path) as reader:
        (listed,) = reader.list_migrations()
        assert (listed.id, listed.outcome, listed.drain_mode) == ("old", "interrupted", None)
        assert reader.device_actions("old") == ()
        (row,) = reader.unfinished()
        assert (row.id, row.outcome, row.recovered) == ("old", "interrupted", None)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1, "the reader upgraded it"
    conn.close()


@pytest.mark.parametrize("old_version", [1, 2])
def test_an_older_journal_is_upgraded_keeping_its_rows_and_taking_new_kinds(
    tmp_path: Path, old_version: int
) -> None:
    path = tmp_path / f"v{old_version}.sqlite"
    conn = sqlite3.connect(path)
    first, rest = journal_db._SCHEMA.split(journal_db._V2_MARKER)
    conn.executescript(first + (journal_db._V2_MARKER + rest if old_version == 2 else ""))
    conn.execute(f"PRAGMA user_version = {old_version}")
    conn.commit()
    with pytest.raises(sqlite3.IntegrityError):  # the old CHECK: what the upgrade must lift
        conn.execute(
            "INSERT INTO migrations (id, kind, domain, source_uri, destination_uri, policy, started, pid, "
            "host) VALUES ('x', 'evacuation', '*', 'a', 'b', 'p', 0, 1, 'h')"
        )
    conn.close()
    insert_legacy(path, "old", 1, host="h", outcome="succeeded", ended=T0 + 3)
    with Journal.open(path) as journal:
        (old,) = journal.list_migrations()
        assert (old.id, old.outcome, old.ended) == ("old", Outcome.SUCCEEDED, T0 + 3)
        journal.begin_migration("e-1", MigrationKind.EVACUATION, "*", "a", "b,c", "p", T0 + 10)
        item = MigrationKind.EVACUATE_ITEM
        journal.begin_migration("m-2", item, "vm2", "a", "b", "p", T0 + 11, parent="e-1")
        journal.finish_migration("m-2", Outcome.REFUSED, False, "events off", 2, T0 + 12)
        journal.finish_migration("e-1", Outcome.PARTIAL, True, None, 8, T0 + 13)
        assert journal.failures == []
        assert [row.id for row in journal.children("e-1")] == ["m-2"]
        assert journal.get_migration("m-2").migration.outcome is Outcome.REFUSED
        assert journal.get_migration("e-1").migration.kind is MigrationKind.EVACUATION
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    assert counts(path)[0] == 3
