"""Records written into a migration's run log by another process (`recover`, after the orchestrator
died) come after the dead process's own, in sequence order (no libvirt needed)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.core.records import still_drained
from orchestrator.edges.journal import Journal


def test_records_of_a_second_process_follow_the_first_ones(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with Journal.open(path) as first:  # the orchestrator, up to its death in an undrain
        first.begin_migration("m1", "migrate", "vm1", "a", "b", "p", 1.0)
        for n in range(12):
            first.record_phase("m1", f"phase-{n}", 1.0 + n)
        first.record_device_action("m1", "nic0", "drain", "starting", 20.0)
        first.record_device_action("m1", "nic0", "drain", "done", 21.0)
    with Journal.open(path) as second:  # recover, in another process: a fresh Journal object
        second.resume("m1")  # it takes the run log over: its records go after the dead run's
        second.record_device_action("m1", "nic0", "undrain", "starting", 30.0)
        second.record_hook(
            "m1",
            {
                "trigger": "undrain",
                "device_id": "nic0",
                "label": "h",
                "argv": ["h"],
                "attempt": 1,
                "started": 30.0,
                "ended": 31.0,
                "duration_ms": 1000.0,
                "exit_code": 0,
                "timed_out": False,
                "error": None,
                "output_tail": "",
            },
        )
        second.record_device_action("m1", "nic0", "undrain", "done", 31.0)
        second.mark_recovered("m1", "rolled-back", "recovered", 32.0)  # and imports the run log
        assert second.failures == []
        actions = second.device_actions("m1")
        assert [(a.action.value, a.status.value) for a in actions] == [
            ("drain", "starting"),
            ("drain", "done"),
            ("undrain", "starting"),
            ("undrain", "done"),
        ]
        assert still_drained(actions) == {}
        record = second.get_migration("m1")
        assert len(record.events) == 12 and len(record.hook_runs) == 1
        seqs = [e.seq for e in record.events] + [h.seq for h in record.hook_runs] + [a.seq for a in actions]
        assert len(set(seqs)) == len(seqs) and sorted(seqs) == list(range(1, len(seqs) + 1))
        assert record.migration.recovered == 32.0 and not second.records("m1"), "imported: no run log left"
