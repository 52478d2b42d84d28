"""Tests of the journal on real SQLite files in tmp_path."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator import intents
from orchestrator import journal as journal_module
from orchestrator.errors import BadInput, EnvironmentProblem, ExitCode, OrchestratorError
from orchestrator.hooks import HookResult, Trigger
from orchestrator.journal import (
    DEFAULT_PATH,
    ENV_VAR,
    SCHEMA_VERSION,
    ActionStatus,
    DeviceAction,
    EventKind,
    Journal,
    MigrationKind,
    Outcome,
    check_in_background,
    journal_path,
    still_drained,
)
from orchestrator.vfio import Role

T0 = 1_700_000_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    with Journal.open(path) as opened:
        yield opened


def begin(journal: Journal, migration_id: str, domain: str = "vm1", started: float = T0) -> None:
    journal.begin_migration(
        migration_id,
        MigrationKind.MIGRATE,
        domain,
        "qemu:///system",
        "qemu+ssh://dst/system",
        "rdma-drain",
        started,
    )


def vfio_event(journal: Journal, migration_id: str, state: str, at: float) -> None:
    journal.record_event(
        migration_id,
        "src",
        Role.SOURCE,
        EventKind.VFIO,
        "VFIO_MIGRATION",
        "hostdev0",
        state,
        at,
        at + 0.001,
        {"device-id": "hostdev0", "qom-path": "/machine/peripheral/hostdev0", "device-state": state},
    )


def hook_result(trigger: Trigger, exit_code: int | None, started: float) -> dict[str, object]:
    result = HookResult("drain-rdma", trigger, "hostdev0", ["/usr/bin/drain", "vm1"], 1, started, 0.0, 4242)
    result.ended = started + 0.25
    result.duration_ms = 250.0
    result.exit_code = exit_code
    result.error = None if exit_code == 0 else f"exited with status {exit_code}"
    result.output_tail = "drained 3 QPs\n"
    return result.to_json()


# --- the path -------------------------------------------------------------------------------------


def test_journal_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert journal_path(None) == DEFAULT_PATH
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env.sqlite"))
    assert journal_path(None) == tmp_path / "env.sqlite"
    assert journal_path(tmp_path / "explicit.sqlite") == tmp_path / "explicit.sqlite"


def test_open_creates_the_directory_and_the_versioned_schema(path: Path, journal: Journal) -> None:
    assert path.parent.stat().st_mode & 0o777 == 0o750 & ~_umask()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"migrations", "events", "hook_runs", "migrations_by_started"} <= names
    assert {"events_by_migration", "hook_runs_by_migration"} <= names
    conn.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_newer_schema_is_refused(path: Path) -> None:
    Journal.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(EnvironmentProblem, match="newer than this orchestrator"):
        Journal.open(path)


def _not_a_database(tmp_path: Path) -> Path:
    bad = tmp_path / "notes.txt"
    bad.write_text("not SQLite, and long enough for SQLite to read a header from it\n" * 4)
    return bad


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("")
    return tmp_path / "afile" / "journal.sqlite"


@pytest.mark.parametrize(
    "make",
    [lambda tmp: tmp, _under_a_file, _not_a_database],
    ids=["a directory", "under a file", "not a database"],
)
def test_an_unusable_path_is_one_line_naming_it(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    bad = make(tmp_path)
    with pytest.raises(BadInput) as caught:
        Journal.open(bad)
    line = caught.value.line()
    assert str(bad) in line
    assert "--journal PATH" in line
    assert "\n" not in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_directory_is_an_environment_problem(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(EnvironmentProblem) as caught:
        Journal.open(locked / "sub" / "journal.sqlite")
    assert "--journal PATH" in caught.value.line()


# --- writing and reading back ---------------------------------------------------------------------


def test_a_full_migration_round_trips(journal: Journal) -> None:
    begin(journal, "m-1")
    vfio_event(journal, "m-1", "pre-copy-p2p-prepare", T0 + 1)
    journal.record_hook("m-1", hook_result(Trigger.DRAIN, 0, T0 + 1.01))
    vfio_event(journal, "m-1", "pre-copy-p2p", T0 + 1.2)
    journal.record_event(
        "m-1", "orchestrator", None, "note", "undrain after failure", None, None, None, T0 + 2
    )
    journal.record_hook("m-1", hook_result(Trigger.UNDRAIN, 3, T0 + 2.5))
    journal.finish_migration("m-1", Outcome.ROLLED_BACK, False, "hook failed", 4, T0 + 3, {"downtime_ms": 12})
    journal.flush()

    record = journal.get_migration("m-1")
    row = record.migration
    assert (row.kind, row.domain, row.policy, row.outcome) == ("migrate", "vm1", "rdma-drain", "rolled-back")
    assert (row.changed, row.error, row.exit_code, row.summary) == (
        False,
        "hook failed",
        4,
        {"downtime_ms": 12},
    )
    assert (row.started, row.ended, row.duration_s, row.parent) == (T0, T0 + 3, 3.0, None)
    assert (row.pid, row.host) == (os.getpid(), os.uname().nodename)
    assert [e.seq for e in record.events] == [1, 3, 4]
    assert [h.seq for h in record.hook_runs] == [2, 5]
    first = record.events[0]
    assert (first.kind, first.name, first.device_id, first.state) == (
        "vfio",
        "VFIO_MIGRATION",
        "hostdev0",
        "pre-copy-p2p-prepare",
    )
    assert (first.role, first.qemu_time, first.data["device-state"]) == (
        "source",
        T0 + 1,
        "pre-copy-p2p-prepare",
    )
    assert (record.events[2].kind, record.events[2].role, record.events[2].data) == ("note", None, None)
    drain, undrain = record.hook_runs
    assert (drain.trigger, drain.label, drain.argv, drain.ok) == (
        "drain",
        "drain-rdma",
        ("/usr/bin/drain", "vm1"),
        True,
    )
    assert (drain.ended, drain.duration_ms, drain.output_tail) == (T0 + 1.26, 250.0, "drained 3 QPs\n")
    assert (undrain.exit_code, undrain.timed_out, undrain.error, undrain.ok) == (
        3,
        False,
        "exited with status 3",
        False,
    )
    as_json = json.loads(json.dumps(record.to_json()))
    assert as_json["outcome"] == "rolled-back"
    assert [e["seq"] for e in as_json["events"]] == [1, 3, 4]
    assert as_json["hook_runs"][1]["ok"] is False


def test_a_running_migration_reads_as_running(journal: Journal) -> None:
    journal.begin_migration("e-1", "evacuate-item", "vm2", "a", "b", "default", T0, parent="evac-7")
    journal.flush()
    row = journal.get_migration("e-1").migration
    assert (row.outcome, row.ended, row.duration_s, row.parent, row.kind) == (
        "running",
        None,
        None,
        "evac-7",
        MigrationKind.EVACUATE_ITEM,
    )


def test_list_is_newest_first_and_filters_by_domain(journal: Journal) -> None:
    for index, domain in enumerate(["vm1", "vm2", "vm1", "vm3"]):
        begin(journal, f"m-{index}", domain, started=T0 + index)
    journal.flush()
    assert [m.id for m in journal.list_migrations()] == ["m-3", "m-2", "m-1", "m-0"]
    assert [m.id for m in journal.list_migrations(limit=2)] == ["m-3", "m-2"]
    assert [m.id for m in journal.list_migrations(domain="vm1")] == ["m-2", "m-0"]
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
    journal.flush()

    events = journal.get_migration("m-1").events
    assert [e.seq for e in events] == list(range(1, 2 * per_thread + 1))
    for name in ("a", "b"):
        # each thread's events appear in the order it recorded them
        assert [e.name for e in events if e.host == name] == [f"{name}-{i}" for i in range(per_thread)]


def test_a_reader_sees_committed_records_while_the_writer_is_open(path: Path, journal: Journal) -> None:
    begin(journal, "m-1")
    vfio_event(journal, "m-1", "pre-copy-p2p-prepare", T0 + 1)
    journal.flush()
    with Journal.open(path) as other:  # as `orchestrator history` in another process would
        # ... and its stale check leaves a migration of a live process alone
        record = other.get_migration("m-1")
        assert record.migration.outcome == "running"
        assert [e.state for e in record.events] == ["pre-copy-p2p-prepare"]
        vfio_event(journal, "m-1", "pre-copy-p2p", T0 + 2)
        journal.flush()
        assert len(other.get_migration("m-1").events) == 2
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT count(*) FROM events").fetchone()[0] == 2
    raw.close()


# --- ids ------------------------------------------------------------------------------------------


def test_lookup_by_unique_prefix(journal: Journal) -> None:
    for migration_id in ("3f2a9c", "3f2b00", "7c1d44"):
        begin(journal, migration_id)
    journal.flush()
    assert journal.get_migration("7").migration.id == "7c1d44"
    assert journal.get_migration("3f2a").migration.id == "3f2a9c"
    assert journal.get_migration("3f2b00").migration.id == "3f2b00"


def test_an_exact_id_wins_over_longer_ids_it_prefixes(journal: Journal) -> None:
    begin(journal, "ab")
    begin(journal, "abc")
    journal.flush()
    assert journal.get_migration("ab").migration.id == "ab"


def test_an_unknown_id_says_how_to_list(path: Path, journal: Journal) -> None:
    with pytest.raises(BadInput) as caught:
        journal.get_migration("nope")
    # pasted, the hint lists this very journal
    assert caught.value.line() == (
        f"no migration nope in {path}; list them with: orchestrator history --journal '{path}'"
    )
    with pytest.raises(BadInput):
        journal.get_migration("")


def test_an_ambiguous_prefix_lists_the_candidates(journal: Journal) -> None:
    for migration_id in ("3f2a9c", "3f2b00", "7c1d44"):
        begin(journal, migration_id)
    journal.flush()
    with pytest.raises(BadInput) as caught:
        journal.get_migration("3f")
    line = caught.value.line()
    assert "3f2a9c" in line
    assert "3f2b00" in line
    assert "7c1d44" not in line
    assert "\n" not in line


# --- failures -------------------------------------------------------------------------------------


def failing_write(journal: Journal) -> None:
    """A record the writer thread cannot insert (a NOT NULL column left empty); the caller does not fail."""
    journal.record_event("m-1", "src", None, EventKind.NOTE, "x", None, None, None, None)  # type: ignore[arg-type]


def test_a_failed_write_is_reported_once_by_flush_and_later_writes_still_land(journal: Journal) -> None:
    begin(journal, "m-1")
    failing_write(journal)
    vfio_event(journal, "m-1", "pre-copy-p2p-prepare", T0 + 1)
    with pytest.raises(OrchestratorError, match="did not record event 1 of migration m-1"):
        journal.flush()
    journal.flush()  # reported once
    assert len(journal.get_migration("m-1").events) == 1


def test_a_start_that_cannot_be_recorded_is_an_error_at_once(journal: Journal) -> None:
    begin(journal, "m-1")
    with pytest.raises(OrchestratorError, match="UNIQUE constraint failed"):
        begin(journal, "m-1")  # committed before it returns: nothing of a migration happens unrecorded


def test_a_failed_write_is_reported_by_close(path: Path) -> None:
    journal = Journal.open(path)
    begin(journal, "m-1")
    failing_write(journal)
    with pytest.raises(OrchestratorError, match="NOT NULL constraint failed"):
        journal.close()
    journal.close()  # idempotent, nothing left to report


def test_bad_values_are_refused_at_the_call(journal: Journal) -> None:
    with pytest.raises(ValueError, match="event kind"):
        journal.record_event("m-1", "h", "source", "bogus", "x", None, None, None, T0, None)
    with pytest.raises(ValueError):
        journal.finish_migration("m-1", "exploded", None, None, None, T0, {})
    with pytest.raises(ValueError):
        journal.finish_migration("m-1", Outcome.RUNNING, None, None, None, T0, {})
    with pytest.raises(ValueError):
        journal.begin_migration("m-1", "teleport", "vm1", "a", "b", "p", T0)


def test_writing_to_a_closed_journal_is_an_error(path: Path) -> None:
    journal = Journal.open(path)
    journal.close()
    with pytest.raises(OrchestratorError, match="is closed"):
        begin(journal, "m-1")


CRASHING_CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from orchestrator.journal import Journal
    journal = Journal.open(Path(sys.argv[1]))
    journal.begin_migration("m-crash", "migrate", "vm1", "a", "b", "default", 1.0)
    for index in range(5):
        journal.record_event("m-crash", "src", "source", "vfio", "VFIO_MIGRATION", "hostdev0",
                             f"state-{index}", 2.0, 2.0 + index, {"i": index})
    journal.flush()
    for index in range(5, 200):  # in flight at the crash: some may land, none half
        journal.record_event("m-crash", "src", "source", "vfio", "VFIO_MIGRATION", "hostdev0",
                             f"state-{index}", 2.0, 2.0 + index, {"i": index})
    os._exit(1)
    """
)


def test_a_crashed_process_leaves_its_records_and_is_marked_interrupted(path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_CHILD, str(path)], check=False, capture_output=True, text=True
    )
    assert child.returncode == 1, child.stderr

    before = time.time()
    with Journal.open(path) as journal:
        record = journal.get_migration("m-crash")
    row = record.migration
    assert (row.outcome, row.error) == ("interrupted", "orchestrator process died")
    assert row.ended is not None
    assert row.ended >= before
    assert row.pid != os.getpid()
    seqs = [e.seq for e in record.events]
    assert seqs[:5] == [1, 2, 3, 4, 5]
    assert seqs == list(range(1, len(seqs) + 1))  # a true prefix: nothing missing in between
    assert all(e.data == {"i": e.seq - 1} for e in record.events)


def test_mark_stale_leaves_other_hosts_and_live_processes_alone(path: Path, journal: Journal) -> None:
    begin(journal, "mine-live")
    for migration_id in ("other-host", "mine-dead"):
        begin(journal, migration_id)
    journal.flush()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    raw = sqlite3.connect(path)
    raw.execute("UPDATE migrations SET pid = ? WHERE id IN ('other-host', 'mine-dead')", (int(dead.stdout),))
    raw.execute("UPDATE migrations SET host = 'elsewhere' WHERE id = 'other-host'")
    raw.commit()
    raw.close()

    assert journal.mark_stale(T0 + 10) == ["mine-dead"]
    outcomes = {m.id: (m.outcome, m.ended) for m in journal.list_migrations()}
    assert outcomes == {
        "mine-live": ("running", None),
        "other-host": ("running", None),
        "mine-dead": ("interrupted", T0 + 10),
    }
    assert journal.mark_stale(T0 + 20) == []


# --- speed ----------------------------------------------------------------------------------------


def test_recording_an_event_does_not_wait_for_the_disk(journal: Journal) -> None:
    begin(journal, "m-1")
    costs = []
    for index in range(2000):
        start = time.perf_counter()
        vfio_event(journal, "m-1", "pre-copy-p2p-prepare", T0 + index)
        costs.append(time.perf_counter() - start)
    journal.flush()
    costs.sort()
    # a commit is tens of microseconds or more; a queue put is a few
    assert costs[len(costs) // 2] < 50e-6


def test_a_whole_migration_commits_in_well_under_50_ms(journal: Journal) -> None:
    start = time.perf_counter()
    begin(journal, "m-1")
    for index in range(20):
        vfio_event(journal, "m-1", "pre-copy-p2p", T0 + index)
    for index in range(4):
        journal.record_hook("m-1", hook_result(Trigger.DRAIN, 0, T0 + index))
    journal.finish_migration("m-1", Outcome.SUCCEEDED, True, None, 0, T0 + 30, {"events": 20})
    journal.flush()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.05, f"{elapsed * 1000:.1f} ms"


# --- reading only (orchestrator history) -----------------------------------------------------------


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_missing_journal_reads_as_empty_and_nothing_is_created(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "journal.sqlite"
    with Journal.open_readonly(path) as journal:
        assert journal.readonly
        assert journal.list_migrations() == []
        assert journal.list_migrations(domain="vm1") == []
        with pytest.raises(BadInput) as caught:
            journal.get_migration("3f2a")
    assert "there is no journal there yet" in caught.value.line()
    assert not (tmp_path / "no").exists(), "reading created a directory"


def test_the_default_journal_hint_needs_no_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "journal.sqlite"))
    with Journal.open_readonly(journal_path()) as journal, pytest.raises(BadInput) as caught:
        journal.get_migration("3f2a")
    assert caught.value.line().endswith("; list them with: orchestrator history")
    assert _files(tmp_path) == []


def test_a_readonly_journal_reads_records_and_refuses_writes(path: Path) -> None:
    with Journal.open(path) as writer:
        begin(writer, "m-1")
        vfio_event(writer, "m-1", "pre-copy-p2p-prepare", T0 + 1)
    before = _files(path.parent)
    with Journal.open_readonly(path) as journal:
        assert [m.id for m in journal.list_migrations()] == ["m-1"]
        assert [e.state for e in journal.get_migration("m-1").events] == ["pre-copy-p2p-prepare"]
        with pytest.raises(OrchestratorError, match="read-only"):
            begin(journal, "m-2")
        with pytest.raises(OrchestratorError, match="read-only"):
            journal.mark_stale(T0)
        journal.flush()  # nothing to wait for
    assert _files(path.parent) == before == ["journal.sqlite"], "SQLite's side files were left behind"


def test_a_readonly_reader_sees_a_live_writer(path: Path, journal: Journal) -> None:
    begin(journal, "m-1")
    journal.flush()
    with Journal.open_readonly(path) as reader:
        assert reader.get_migration("m-1").migration.outcome == "running"
        vfio_event(journal, "m-1", "pre-copy", T0 + 1)
        journal.flush()
        assert len(reader.get_migration("m-1").events) == 1


def test_a_readonly_reader_does_not_mark_a_dead_process_but_reads_it_as_interrupted(path: Path) -> None:
    with Journal.open(path) as writer:
        begin(writer, "m-dead")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    raw = sqlite3.connect(path)
    raw.execute("UPDATE migrations SET pid = ?", (int(dead.stdout),))
    raw.commit()
    raw.close()

    with Journal.open_readonly(path) as reader:
        (row,) = reader.list_migrations()
        assert (row.outcome, row.error, row.ended) == ("interrupted", "orchestrator process died", None)
        assert reader.get_migration("m-dead").migration.outcome == "interrupted"
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT outcome FROM migrations").fetchall() == [("running",)], "the reader wrote"
    raw.close()
    with Journal.open(path) as writer:  # a writer marks it, as before
        assert writer.get_migration("m-dead").migration.outcome == "interrupted"


def test_a_readonly_open_of_an_empty_file_reads_as_empty(tmp_path: Path) -> None:
    empty = tmp_path / "journal.sqlite"
    empty.write_bytes(b"")
    with Journal.open_readonly(empty) as journal:
        assert journal.list_migrations() == []
    assert empty.read_bytes() == b""


def test_a_readonly_open_refuses_what_open_refuses(path: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="it is a directory"):
        Journal.open_readonly(tmp_path)
    with pytest.raises(BadInput) as caught:
        Journal.open_readonly(_not_a_database(tmp_path)).list_migrations()
    assert "--journal PATH" in caught.value.line()
    Journal.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(EnvironmentProblem, match="newer than this orchestrator"):
        Journal.open_readonly(path)


# --- another process holding the write lock (issue 10) ----------------------------------------------

LOCK_HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")  # the journal's write lock, as an admin's sqlite3 shell would hold it
    print("locked", flush=True)
    if sys.argv[2] == "stdin":
        sys.stdin.readline()
    else:
        time.sleep(float(sys.argv[2]))
    conn.execute("ROLLBACK")
    """
)


@contextlib.contextmanager
def write_lock_held_elsewhere(path: Path, hold: str) -> Iterator[subprocess.Popen[str]]:
    """A child process holding the journal's write lock for `hold` seconds, or until its stdin closes."""
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(path), hold],
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
        child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def test_a_write_lock_held_8_s_by_another_process_delays_records_but_loses_none(
    path: Path, journal: Journal
) -> None:
    begin(journal, "m-1")
    with write_lock_held_elsewhere(path, "8") as holder:
        locked_at = time.monotonic()
        with Journal.open(path) as other:  # opening an existing journal needs no write lock
            assert [m.id for m in other.list_migrations()] == ["m-1"]
        assert time.monotonic() - locked_at < 2
        for index in range(50):
            vfio_event(journal, "m-1", f"state-{index}", T0 + index)
        time.sleep(0.3)  # the writer is now retrying event 1
        start = time.perf_counter()
        reason = journal.record_device_action("m-1", "hostdev0", "drain", "starting", T0 + 60, "detail")
        waited = time.perf_counter() - start
        assert waited < 0.25, f"a drain hook would have waited {waited * 1000:.0f} ms for the journal"
        assert reason is None  # durable already, in the intents file, which a reader sees with the journal
        with Journal.open_readonly(path) as reader:
            assert [(a.seq, a.device_id, a.status) for a in reader.device_actions("m-1")] == [
                (51, "hostdev0", "starting")
            ]
        journal.record_hook("m-1", hook_result(Trigger.DRAIN, 0, T0 + 61))
        journal.finish_migration("m-1", Outcome.SUCCEEDED, True, None, 0, T0 + 70, {"events": 50})
        journal.flush()  # waits while the writer waits for the lock: that time is not its timeout's
        held = time.monotonic() - locked_at
        assert holder.wait(timeout=5) == 0
    assert held > 7, "the lock was not held as long as the test needs"
    assert journal.failures == []
    record = journal.get_migration("m-1")
    assert [e.state for e in record.events if e.kind == "vfio"] == [f"state-{i}" for i in range(50)]
    assert [(a.device_id, a.status) for a in record.device_actions] == [("hostdev0", "starting")]
    assert len(record.hook_runs) == 1
    assert (record.migration.outcome, record.migration.summary) == ("succeeded", {"events": 50})
    seqs = sorted([e.seq for e in record.events] + [h.seq for h in record.hook_runs] + [51])
    assert seqs == list(range(1, 53))
    assert not intents.directory_of(path).is_dir(), "the ended migration's intents file was left"


def test_without_an_intents_file_a_locked_journal_makes_starting_late_not_lost(
    path: Path, journal: Journal
) -> None:
    intents.directory_of(path).write_text("not a directory")  # the intents directory cannot be made
    begin(journal, "m-1")
    with write_lock_held_elsewhere(path, "stdin"):
        start = time.perf_counter()
        reason = journal.record_device_action("m-1", "hostdev0", "drain", "starting", T0 + 60, "detail")
        waited = time.perf_counter() - start
        assert waited < 0.25, f"a drain hook would have waited {waited * 1000:.0f} ms for the journal"
        assert reason is not None and "before its hooks started" in reason  # committed at once: it could not
    journal.flush()  # the lock is gone: the queued record lands
    assert journal.failures == []
    assert [(a.device_id, a.status) for a in journal.get_migration("m-1").device_actions] == [
        ("hostdev0", "starting")
    ]


def test_a_write_lock_held_beyond_the_retry_budget_is_a_reported_loss(
    path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_RETRY_BUDGET_S", 0.5)
    begin(journal, "m-1")
    with write_lock_held_elsewhere(path, "stdin") as holder:
        start = time.monotonic()
        for index in range(3):
            vfio_event(journal, "m-1", f"lost-{index}", T0 + index)
        with pytest.raises(EnvironmentProblem) as caught:
            journal.flush()
        elapsed = time.monotonic() - start
        assert holder.stdin is not None
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(timeout=5) == 0
    # the first record was retried for the budget; the next ones once each, while the lock stayed held
    assert 0.5 <= elapsed < 3, elapsed
    line = caught.value.line()
    assert line.startswith(f"the journal {path} did not record event 1 of migration m-1: another process")
    assert "held its write lock for 0.5 s (database is locked)" in line
    assert f"fuser -v '{path}'" in line
    failures = journal.failures
    assert len(failures) == 3
    assert failures[0] == line
    assert all("still holds its write lock" in f for f in failures[1:])
    assert [f.split(" did not record ")[1][:10] for f in failures[1:]] == ["event 2 of", "event 3 of"]

    vfio_event(journal, "m-1", "landed", T0 + 10)  # the lock is free: records land again
    journal.flush()  # the loss was reported once
    assert [e.state for e in journal.get_migration("m-1").events] == ["landed"]
    assert len(journal.failures) == 3  # ... and stays listed
    journal.close()


def test_failures_list_every_lost_record_without_raising(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_FAILURES_KEPT", 4)
    begin(journal, "m-1")
    assert journal.failures == []
    for _ in range(6):
        failing_write(journal)
    vfio_event(journal, "m-1", "pre-copy", T0)
    with pytest.raises(OrchestratorError):
        journal.flush()
    failures = journal.failures  # reading raises nothing and reports nothing
    assert len(failures) == 5
    assert [f.split(" did not record ")[1].split(":")[0] for f in failures[:4]] == [
        f"event {seq} of migration m-1" for seq in range(1, 5)
    ]
    assert all("NOT NULL constraint failed" in f and "\n" not in f for f in failures[:4])
    assert failures[4] == f"the journal {journal.path} failed 2 more writes"
    assert journal.failures == failures
    assert len(journal.get_migration("m-1").events) == 1


# --- a corrupt journal (issue 10) -------------------------------------------------------------------


def journal_with_data(path: Path) -> bytes:
    """A closed journal of 30 migrations with events (tens of pages); its bytes."""
    with Journal.open(path) as writer:
        for index in range(30):
            begin(writer, f"m-{index}", started=T0 + index)
            for event in range(20):
                vfio_event(writer, f"m-{index}", "x" * 100, T0 + event)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
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


def _read(path: Path) -> None:
    with Journal.open_readonly(path) as journal:
        journal.list_migrations()
        journal.get_migration("m-3")


def _checked_in_background_then_opened(path: Path) -> None:
    """What `migrate` and `evacuate` do: the check started first, awaited before the journal opens."""
    wait = check_in_background(path)
    Journal.open(path, check=not wait()).close()


OPENINGS: dict[str, Callable[[Path], object]] = {
    "open(check=True)": lambda path: Journal.open(path, check=True).close(),
    "checked in the background": _checked_in_background_then_opened,
    "open": lambda path: Journal.open(path).close(),
    "open_readonly and read": _read,
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
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "side files were left behind"

    # the hint works: moved aside, a new journal is created and used
    path.rename(f"{path}.corrupt")
    with Journal.open(path, check=True) as fresh:
        begin(fresh, "m-new")
        fresh.flush()
        assert [m.id for m in fresh.list_migrations()] == ["m-new"]


def test_check_finds_damage_that_open_without_it_does_not_read(path: Path) -> None:
    data = bytearray(journal_with_data(path))
    with Journal.open(path) as journal:  # which pages the events index lives on
        conn = sqlite3.connect(path)
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'events_by_migration'"
        ).fetchone()
        conn.close()
        journal.check()  # a sound journal
    page = int.from_bytes(data[16:18], "big")
    start = (root - 1) * page
    data[start : start + page] = bytes(page)  # the index's root page zeroed
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
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "side files were left behind"


def test_a_corrupt_journal_names_a_leftover_write_ahead_log_in_the_hint(path: Path) -> None:
    journal_with_data(path)
    wal = Path(f"{path}-wal")
    wal.write_bytes(b"records of a crashed writer")
    error = journal_module._corrupt(
        path, "*** in database main ***\nPage 9: btreeInitPage() returns error code 11"
    )
    assert error.line().startswith(
        f"the journal {path} is corrupt: Page 9: btreeInitPage() returns error code 11;"
    )
    assert f"mv '{path}' '{path}.corrupt' && mv '{wal}' '{path}.corrupt-wal' (a new" in error.line()


def test_a_read_after_close_is_an_error_not_a_traceback(path: Path) -> None:
    journal = Journal.open(path)
    journal.close()
    with pytest.raises(OrchestratorError, match="is closed"):
        journal.list_migrations()


# --- crash recovery (issue 10) ----------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    return int(child.stdout)


def raw_update(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def raw_row(path: Path, migration_id: str) -> tuple[object, ...]:
    conn = sqlite3.connect(path)
    row = conn.execute(
        "SELECT outcome, error, ended, recovered, summary FROM migrations WHERE id = ?", (migration_id,)
    ).fetchone()
    conn.close()
    return tuple(row)


@pytest.fixture
def crashed(path: Path, journal: Journal) -> Journal:
    """Migrations of every kind: only 'dead-running' and 'dead-interrupted' (this host) are unfinished."""
    ids = ["live", "dead-running", "dead-interrupted", "dead-succeeded", "other-host", "dead-recovered"]
    for index, migration_id in enumerate(ids):
        begin(journal, migration_id, started=T0 + index)
    journal.finish_migration("dead-interrupted", Outcome.INTERRUPTED, None, "SIGTERM", 130, T0 + 100)
    journal.finish_migration("dead-succeeded", Outcome.SUCCEEDED, True, None, 0, T0 + 100)
    journal.flush()
    dead = dead_pid()
    raw_update(path, "UPDATE migrations SET pid = ? WHERE id != 'live'", (dead,))
    raw_update(path, "UPDATE migrations SET host = 'elsewhere' WHERE id = 'other-host'")
    raw_update(path, "UPDATE migrations SET recovered = ? WHERE id = 'dead-recovered'", (T0 + 50,))
    return journal


def test_migrate_reconciles_only_a_vm_with_an_unfinished_migration(
    crashed: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import cli, recovery
    from orchestrator.recovery import RecoveryReport

    asked: list[str] = []

    def recover_before(
        journal: Journal, hosts: object, domain: str, on_line: object = None
    ) -> RecoveryReport:
        asked.append(domain)
        return RecoveryReport()

    monkeypatch.setattr(recovery, "recover_before", recover_before)
    for row in crashed.unfinished():
        raw_update(crashed.path, "UPDATE migrations SET domain = 'vm-left' WHERE id = ?", (row.id,))
    cli.reconcile(crashed, [], "vm-clean", print)  # nothing of its own to finish: recover is not asked
    cli.reconcile(crashed, [], "vm-left", print)
    assert asked == ["vm-left"]


def test_reconciling_a_vm_with_nothing_to_finish_imports_nothing_of_recover(path: Path) -> None:
    program = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from orchestrator import cli
        from orchestrator.journal import Journal
        with Journal.open(Path(sys.argv[1])) as journal:
            cli.reconcile(journal, [], "vm1", print)
        print("orchestrator.recovery" in sys.modules)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", program, str(path)], capture_output=True, text=True, check=True
    )
    assert child.stdout == "False\n"


def test_unfinished_lists_dead_unrecovered_migrations_of_this_host(crashed: Journal) -> None:
    assert [m.id for m in crashed.unfinished()] == ["dead-running", "dead-interrupted"]
    assert [m.id for m in crashed.unfinished(os.uname().nodename)] == ["dead-running", "dead-interrupted"]
    assert [m.id for m in crashed.unfinished("elsewhere")] == ["other-host"]
    assert crashed.unfinished("nowhere") == []


def test_mark_recovered_commits_at_once_and_only_once(path: Path, crashed: Journal) -> None:
    summary = {"undrained": ["hostdev0"]}
    assert crashed.mark_recovered(
        "dead-running", Outcome.ROLLED_BACK, "undrained by recover", T0 + 200, summary
    )
    # committed before it returned: another connection sees it
    assert raw_row(path, "dead-running") == (
        "rolled-back",
        "undrained by recover",
        T0 + 200,
        T0 + 200,
        json.dumps(summary, separators=(",", ":")),
    )
    # an end already recorded stays; a summary not given is kept
    assert crashed.mark_recovered("dead-interrupted", "interrupted", "nothing left drained", T0 + 300)
    assert raw_row(path, "dead-interrupted") == (
        "interrupted",
        "nothing left drained",
        T0 + 100,
        T0 + 300,
        None,
    )
    assert crashed.unfinished() == []
    # never twice, never an unknown id
    assert not crashed.mark_recovered("dead-running", Outcome.FAILED, "again", T0 + 400)
    assert raw_row(path, "dead-running")[:2] == ("rolled-back", "undrained by recover")
    assert not crashed.mark_recovered("no-such-id", Outcome.FAILED, None, T0 + 400)
    with pytest.raises(ValueError, match="cannot be 'running'"):
        crashed.mark_recovered("dead-running", Outcome.RUNNING, None, T0)
    assert crashed.failures == []
    crashed.flush()


def test_mark_stale_never_touches_a_recovered_migration(path: Path, crashed: Journal) -> None:
    # 'dead-recovered' is running (its recover was cut short before writing the outcome, say)
    before = raw_row(path, "dead-recovered")
    assert crashed.mark_stale(T0 + 500) == ["dead-running"]
    assert raw_row(path, "dead-recovered") == before
    with Journal.open(path):  # every open marks stale migrations
        pass
    assert raw_row(path, "dead-recovered") == before
    with Journal.open_readonly(path) as reader:  # ... and a reader does not read it as interrupted
        assert reader.get_migration("dead-recovered").migration.outcome == "running"
        assert [m.id for m in reader.unfinished()] == ["dead-running", "dead-interrupted"]
    assert raw_row(path, "dead-running")[:3] == ("interrupted", "orchestrator process died", T0 + 500)


def test_device_actions_are_public_in_sequence(journal: Journal) -> None:
    begin(journal, "m-1")
    assert journal.record_device_action("m-1", "hostdev0", DeviceAction.DRAIN, "starting", T0, "d0") is None
    vfio_event(journal, "m-1", "pre-copy-p2p", T0 + 1)
    journal.record_device_action("m-1", "hostdev0", "drain", ActionStatus.DONE, T0 + 2)
    journal.record_device_action("m-1", "hostdev1", "drain", "starting", T0 + 3, "d1")
    journal.record_device_action("m-1", "hostdev0", "undrain", "starting", T0 + 4)
    journal.record_device_action("m-1", "hostdev0", "undrain", "done", T0 + 5)
    journal.flush()
    actions = journal.device_actions("m-1")
    assert [(a.seq, a.device_id, a.action, a.status) for a in actions] == [
        (1, "hostdev0", "drain", "starting"),
        (3, "hostdev0", "drain", "done"),
        (4, "hostdev1", "drain", "starting"),
        (5, "hostdev0", "undrain", "starting"),
        (6, "hostdev0", "undrain", "done"),
    ]
    assert actions == journal.get_migration("m-1").device_actions
    assert still_drained(actions) == {"hostdev1": "d1"}
    assert journal.device_actions("no-such-id") == ()


def test_a_schema_1_journal_reads_for_recovery(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(journal_module._SCHEMA.split(journal_module._V2_MARKER)[0])
    conn.execute(
        "INSERT INTO migrations (id, kind, domain, source_uri, destination_uri, policy, started, outcome, "
        "pid, host) VALUES ('old', 'migrate', 'vm1', 'a', 'b', 'p', ?, 'running', ?, ?)",
        (T0, dead_pid(), os.uname().nodename),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Journal.open_readonly(path) as reader:
        (row,) = reader.unfinished()
        assert (row.id, row.outcome, row.recovered) == ("old", "interrupted", None)
        assert reader.device_actions("old") == ()


@pytest.mark.parametrize("old_version", [1, 2])
def test_an_older_journal_is_upgraded_keeping_its_rows_and_taking_new_kinds(
    tmp_path: Path, old_version: int
) -> None:
    path = tmp_path / f"v{old_version}.sqlite"
    conn = sqlite3.connect(path)
    first, rest = journal_module._SCHEMA.split(journal_module._V2_MARKER)
    conn.executescript(first + (journal_module._V2_MARKER + rest if old_version == 2 else ""))
    conn.execute(
        "INSERT INTO migrations (id, kind, domain, source_uri, destination_uri, policy, started, ended, "
        "outcome, pid, host) VALUES ('old', 'migrate', 'vm1', 'a', 'b', 'p', ?, ?, 'succeeded', 1, 'h')",
        (T0, T0 + 3),
    )
    conn.execute(f"PRAGMA user_version = {old_version}")
    conn.commit()
    with pytest.raises(sqlite3.IntegrityError):  # the old CHECK: what the upgrade must lift
        conn.execute(
            "INSERT INTO migrations (id, kind, domain, source_uri, destination_uri, policy, started, pid, "
            "host) "
            "VALUES ('x', 'evacuation', '*', 'a', 'b', 'p', 0, 1, 'h')"
        )
    conn.close()
    with Journal.open(path) as journal:
        (old,) = journal.list_migrations()
        assert (old.id, old.outcome, old.ended) == ("old", Outcome.SUCCEEDED, T0 + 3)
        journal.begin_migration("e-1", MigrationKind.EVACUATION, "*", "a", "b,c", "p", T0 + 10)
        journal.begin_migration(
            "m-2", MigrationKind.EVACUATE_ITEM, "vm2", "a", "b", "p", T0 + 11, parent="e-1"
        )
        journal.finish_migration("m-2", Outcome.REFUSED, False, "events off", 2, T0 + 12)
        journal.flush()
        assert [row.id for row in journal.children("e-1")] == ["m-2"]
        assert journal.get_migration("m-2").migration.outcome is Outcome.REFUSED
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


# --- the intents file: the hot path's `starting` records (orchestrator/intents.py) --------------------

KILLED_MID_DRAIN = """
import os, sys
from orchestrator.journal import Journal
journal = Journal.open(__import__("pathlib").Path(sys.argv[1]))
journal.begin_migration("m-dead", "migrate", "vm1", "qemu:///system", "qemu+ssh://dst/system", "p", 1.0e9)
print("begun", flush=True)
sys.stdin.readline()  # the journal is write-locked by another process now
assert journal.record_device_action("m-dead", "hostdev0", "drain", "starting", 1.0e9 + 1, "prepare") is None
journal.record_device_action("m-dead", "hostdev1", "drain", "starting", 1.0e9 + 2, "prepare")
journal.record_device_action("m-dead", "hostdev1", "drain", "done", 1.0e9 + 3)
journal.record_device_action("m-dead", "hostdev1", "undrain", "starting", 1.0e9 + 4, "resumed")
os._exit(9)  # killed: nothing of the above reached SQLite (locked), the writer thread dies with it
"""


def test_a_drain_started_by_a_killed_process_is_found_and_adopted_from_its_intents_file(path: Path) -> None:
    with Journal.open(path):
        pass  # the schema exists, so the child's open needs no write lock
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_DRAIN, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline() == "begun\n"
    with write_lock_held_elsewhere(path, "stdin"):  # until the child is dead
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 9
    with Journal.open_readonly(path) as reader:  # history: the truth, before any recover
        actions = reader.device_actions("m-dead")
    assert [(a.seq, a.device_id, str(a.action), str(a.status)) for a in actions] == [
        (1, "hostdev0", "drain", "starting"),
        (2, "hostdev1", "drain", "starting"),
        (4, "hostdev1", "undrain", "starting"),
    ]  # `done` is queued only: it never reached the journal (that is what the writer's queue is)
    assert still_drained(actions) == {"hostdev0": "prepare", "hostdev1": "prepare"}
    with Journal.open(path) as journal:
        assert [m.id for m in journal.unfinished()] == ["m-dead"]
        # recover's own records go on after the intents' (never the same sequence number)
        assert journal.adopt_intents("m-dead") == 3
        assert journal.adopt_intents("m-dead") == 0
        journal.record_device_action("m-dead", "hostdev0", "undrain", "starting", 2.0e9, "recover")
        journal.flush()
        seqs = [a.seq for a in journal.device_actions("m-dead")]
        assert seqs == [1, 2, 4, 5]
        assert intents.read(intents.directory_of(path), "m-dead") != []
        assert journal.mark_recovered("m-dead", Outcome.ROLLED_BACK, "recovered", 2.0e9 + 1)
        assert not intents.directory_of(path).exists(), "the recovered migration's intents file was left"
        assert [a.seq for a in journal.device_actions("m-dead")] == [1, 2, 4, 5]


def event_names(path: Path, migration_id: str = "m1") -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM events WHERE migration_id = ?", (migration_id,))
        return sorted(row[0] for row in rows)


def in_thread(work: Callable[[], object]) -> None:
    other = threading.Thread(target=work)
    other.start()
    other.join()


def test_records_made_while_holding_reach_the_writer_when_the_block_ends(
    journal: Journal, path: Path
) -> None:
    begin(journal, "m1")
    journal.flush()
    with journal.holding():
        assert journal.record_device_action("m1", "nic0", "drain", "starting", T0 + 1, "prepare") is None
        # durable at once, in the intents file; the journal's copy waits for the block's end
        assert [i.device_id for i in intents.read(intents.directory_of(path), "m1")] == ["nic0"]
        journal.record_event("m1", "source", "source", "vfio", "VFIO_MIGRATION", "nic0", "prepare", T0, T0)
        with journal.holding():  # nested: the outer block hands them over
            journal.record_phase("m1", "switching-over", T0 + 2)
        # another thread's records are not held; its flush commits them, and nothing of this block
        in_thread(lambda: journal.record_phase("m1", "other-thread", T0 + 3))
        in_thread(journal.flush)
        assert event_names(path) == ["phase other-thread"]
        assert journal.device_actions("m1") != []  # (from the intents file)
    in_thread(journal.flush)
    assert event_names(path) == ["VFIO_MIGRATION", "phase other-thread", "phase switching-over"]
    assert [(a.device_id, str(a.status)) for a in journal.device_actions("m1")] == [("nic0", "starting")]


def test_waiting_for_the_writer_inside_a_block_hands_the_block_over_first(
    journal: Journal, path: Path
) -> None:
    begin(journal, "m1")
    with journal.holding():
        journal.record_phase("m1", "switching-over", T0 + 1)
        journal.flush()  # "everything written so far": the block's records included, at once
        assert event_names(path) == ["phase switching-over"]
        journal.record_phase("m1", "settling", T0 + 2)
        started = time.monotonic()
        # a record its caller waits for (ticketed) is not held: no wait for itself until a timeout
        assert journal.mark_recovered("m1", Outcome.SUCCEEDED, None, T0 + 3)
        assert time.monotonic() - started < journal_module.FLUSH_TIMEOUT_S
        assert event_names(path) == ["phase settling", "phase switching-over"]


@contextlib.contextmanager
def drain_held_by_another_thread(journal: Journal) -> Iterator[None]:
    """Another thread (an event thread) inside a holding block that recorded m1's drain of nic0."""
    inside, leave = threading.Event(), threading.Event()

    def event_thread() -> None:
        with journal.holding():
            journal.record_device_action("m1", "nic0", "drain", "starting", T0 + 1, "prepare")
            inside.set()
            leave.wait(10)

    other = threading.Thread(target=event_thread)
    other.start()
    try:
        assert inside.wait(10)
        yield
    finally:
        leave.set()
        other.join()


def test_a_migration_finished_while_another_thread_holds_its_drain_keeps_its_intents_file_until_then(
    journal: Journal, path: Path
) -> None:
    begin(journal, "m1")
    with drain_held_by_another_thread(journal):
        journal.finish_migration("m1", Outcome.SUCCEEDED, True, None, 0, T0 + 5)
        journal.flush()
        # the drain is in no table yet: its intents file is its only record and must stay
        assert [i.device_id for i in intents.read(intents.directory_of(path), "m1")] == ["nic0"]
    journal.flush()
    assert [(a.device_id, str(a.status)) for a in journal.device_actions("m1")] == [("nic0", "starting")]
    assert intents.read(intents.directory_of(path), "m1") == [], "its file outlived its committed records"


def test_a_journal_closed_while_another_thread_holds_records_keeps_their_intents_file(path: Path) -> None:
    journal = Journal.open(path)
    begin(journal, "m1")
    with drain_held_by_another_thread(journal):
        journal.close()
    assert any("closed before the drain of nic0" in line for line in journal.failures)
    assert [i.device_id for i in intents.read(intents.directory_of(path), "m1")] == ["nic0"]


def test_a_journal_closed_while_a_block_holds_records_keeps_the_intents_file_and_says_so(path: Path) -> None:
    journal = Journal.open(path)
    begin(journal, "m1")
    with pytest.raises(OrchestratorError, match="closed before the drain of nic0"):
        with journal.holding():
            journal.record_device_action("m1", "nic0", "drain", "starting", T0 + 1, "prepare")
            journal.close()
        journal.close()  # reports what the block could not hand over
    assert [i.device_id for i in intents.read(intents.directory_of(path), "m1")] == ["nic0"]
    with Journal.open_readonly(path) as reader:
        assert [a.device_id for a in reader.device_actions("m1")] == ["nic0"]  # from the file


def test_an_intents_file_is_read_line_by_line_and_what_cannot_be_parsed_is_skipped(tmp_path: Path) -> None:
    log = intents.IntentLog(tmp_path / "j.sqlite")
    assert log.open("m-1")
    assert log.append("m-1", intents.Intent(3, "nic0\nnic1 \u00e9", "drain", "starting", 1.5, None))
    with open(intents.directory_of(tmp_path / "j.sqlite") / "m-1", "ab") as raw:
        raw.write(b'[4, "nic2", "drain"\n{"not": "a list"}\n[5, 6, "drain", "starting", 1, null]\n[7, "ni')
    assert intents.read(log.directory, "m-1") == [
        intents.Intent(3, "nic0\nnic1 \u00e9", "drain", "starting", 1.5, None)
    ]
    assert not log.append("m-2", intents.Intent(1, "nic0", "drain", "starting", 1.0, None))  # never opened
    assert not log.open("../escape") and not log.open("")
    assert intents.read(log.directory, "../j.sqlite") == []
    log.close(keep={"m-1"})
    assert (log.directory / "m-1").exists()
    log.open("m-3")
    log.close(keep=set())
    assert sorted(p.name for p in log.directory.iterdir()) == ["m-1"]


# --- the writer: bursts gathered, committed together --------------------------------------------------


def test_a_burst_of_records_is_committed_in_one_transaction(journal: Journal) -> None:
    begin(journal, "m-1")
    statements: list[str] = []
    assert journal._writer_conn is not None
    journal._writer_conn.set_trace_callback(statements.append)
    for index in range(40):  # one switchover's worth of events, queued faster than the writer gathers
        vfio_event(journal, "m-1", f"state-{index}", T0 + index)
    journal.flush()
    assert [e.state for e in journal.get_migration("m-1").events] == [f"state-{i}" for i in range(40)]
    commits = [s for s in statements if s.strip().upper() == "COMMIT"]
    assert 1 <= len(commits) <= 2, statements  # not one per record


def test_waiting_for_the_writer_cuts_its_gathering_short(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "_GATHER_S", 3600.0)  # were it not cut short, flush would hang
    with Journal.open(path) as journal:
        begin(journal, "m-1")  # flushes
        vfio_event(journal, "m-1", "pre-copy", T0)
        journal.flush()
        assert [e.state for e in journal.get_migration("m-1").events] == ["pre-copy"]
        vfio_event(journal, "m-1", "stop-copy", T0 + 1)
    with Journal.open_readonly(path) as reader:  # close() cut it short too, and committed the event
        assert [e.state for e in reader.get_migration("m-1").events] == ["pre-copy", "stop-copy"]


@pytest.mark.parametrize("where", ["a link to a directory", "group-writable", "a file"])
def test_an_intents_directory_that_is_not_a_private_one_is_not_written_to(tmp_path: Path, where: str) -> None:
    journal = tmp_path / "j.sqlite"
    directory = intents.directory_of(journal)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if where == "a link to a directory":
        directory.symlink_to(elsewhere)
    elif where == "group-writable":
        directory.mkdir(mode=0o770)
        directory.chmod(0o770)
    else:
        directory.write_text("")
    log = intents.IntentLog(journal)
    assert not log.open("m-1")  # the journal then commits `starting` synchronously
    assert not log.append("m-1", intents.Intent(1, "nic0", "drain", "starting", 1.0, None))
    assert list(elsewhere.iterdir()) == []


def test_a_record_sqlite_cannot_take_in_a_burst_loses_only_itself(journal: Journal) -> None:
    # A lone surrogate (JSON from an event can carry one) cannot be encoded for SQLite: the burst it
    # came in is committed one by one, that record is a reported failure, the writer goes on.
    begin(journal, "m-1")
    vfio_event(journal, "m-1", "pre-copy", T0)
    vfio_event(journal, "m-1", "bad \udc80", T0 + 1)
    vfio_event(journal, "m-1", "stop-copy", T0 + 2)
    with pytest.raises(OrchestratorError):
        journal.flush()
    assert len(journal.failures) == 1 and "event 2 of migration m-1" in journal.failures[0]
    vfio_event(journal, "m-1", "stop", T0 + 3)
    journal.flush()  # the writer still runs
    assert [e.state for e in journal.get_migration("m-1").events] == ["pre-copy", "stop-copy", "stop"]
