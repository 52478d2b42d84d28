"""SIGKILL `orchestrator migrate` at each phase, then `orchestrator recover`: the three facts hold.

The orchestrator is killed, with no chance to clean up, at five instants of a peer-to-peer migration
and three of a client-driven (`--direct`) one:

- before:     in its `before` hook (nothing changed yet; the lock and the journal row exist);
- precopy:    mid pre-copy, a dirty guest held there by the gate (`--drain gated`, 32 MiB/s: the limit
              stays at its 1 ms floor once nobody raises it);
- transition: during a device's 3 s P2P transition, once its drain hook has run (journaled drained);
- completed:  after the VM runs on the destination, in a slow `after-success` hook;
- undrain:    in a slow undrain hook (journaled: undrain starting, spawned, never ended): recover
              waits for the orphaned hook rather than running the undrain a second time.

Then `recover` runs, and `assert_three_facts` (tests/faults/kit.py) checks the hook log, both hosts
and `orchestrator history`. A peer-to-peer job survives its client (the source libvirtd drives it);
a client-driven one does not: the destination destroys the incoming VM when the client's connection
closes, so the job fails and the source resumes.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from faults.kit import Background, Case, assert_three_facts

SLEEP = "--sleep-ms=20000"  # a hook that is still running when the orchestrator is killed
SLOW_HOOK = {"timeout_ms": 30000}


@dataclass(frozen=True)
class KillPoint:
    guest: dict[str, Any]
    args: tuple[str, ...]
    policy: Callable[[Case], dict[str, Any]]
    reach: Callable[[Case, Background], object]
    undrained_by_recover: list[str] = field(default_factory=list)
    awaited_by_recover: list[str] = field(default_factory=list)


def _job_running(case: Case, run: Background) -> None:
    run.wait_line(r"phase job-running")
    case.wait_for("the job on the source", lambda: case.lab.conn(0).domain(case.name).job_stats() is not None)
    run.wait_line(r"nic0 -> pre-copy$")


POINTS = {
    "before": KillPoint(
        guest={},
        args=(),
        policy=lambda c: {"hooks": c.hook("before", SLEEP, **SLOW_HOOK)},
        reach=lambda c, _run: c.wait_hook("before"),
    ),
    "precopy": KillPoint(
        guest={"workload": "dirty"},
        args=("--drain", "gated", "--bandwidth", "32"),
        policy=lambda c: {},
        reach=_job_running,
    ),
    "transition": KillPoint(
        guest={"transition_ms": 3000},
        args=(),
        policy=lambda c: {},
        reach=lambda c, _run: c.wait_hook("drain"),
        undrained_by_recover=["nic0"],
    ),
    "completed": KillPoint(
        guest={},
        args=(),
        policy=lambda c: {"hooks": c.hook("after-success", SLEEP, **SLOW_HOOK)},
        reach=lambda c, _run: c.wait_hook("after-success"),
    ),
    "undrain": KillPoint(
        guest={},
        args=(),
        # Still running when recover starts: recover waits for it, and runs nothing again.
        policy=lambda c: {"undrain": "--sleep-ms=2000", "undrain_keys": SLOW_HOOK},
        reach=lambda c, _run: c.wait_hook("undrain"),
        awaited_by_recover=["nic0"],
    ),
}

# Where the VM runs once recovered, per (mode, kill point).
EXPECTED = {
    ("p2p", "before"): "source",
    ("p2p", "precopy"): "source",  # recover aborts the job held at the gate
    ("p2p", "transition"): "destination",  # the job went on without its client; recover waited
    ("p2p", "completed"): "destination",
    ("p2p", "undrain"): "destination",
    ("direct", "precopy"): "source",
    ("direct", "transition"): "source",
    ("direct", "completed"): "destination",
}
# What recover says it did with the libvirt job, when the test knows.
JOB_NOTES = {("p2p", "precopy"): ["aborted the libvirt job held at the gate (nothing would release it)"]}
CASES = [pytest.param(mode, point, id=f"{mode}-{point}") for mode, point in EXPECTED]


@pytest.mark.parametrize(("mode", "point"), CASES)
def test_sigkill_then_recover(lab_env: Any, tmp_path: Path, mode: str, point: str) -> None:
    kill = POINTS[point]
    case = Case(lab_env, tmp_path, **kill.guest)
    try:
        case.write_policy(**kill.policy(case))
        run = case.start(f"--{mode}", *kill.args)
        kill.reach(case, run)
        run.kill(signal.SIGKILL)
        assert run.wait().code == -signal.SIGKILL
        (migration_id,) = case.migration_ids()
        if mode == "direct" and point != "completed":
            # The client's connections closed: the destination destroyed the incoming VM, the job
            # failed and the source resumed, before anything recovered.
            case.wait_for(
                "the source to resume", lambda: case.state(0) == "running" and case.state(1) == "absent"
            )
        recovered = case.recover()
        assert recovered.code == 0, recovered.err
        (done,) = recovered.doc["recovered"]
        assert done["migration_id"] == migration_id and done["failed"] == []
        assert done["undrained"] == kill.undrained_by_recover, done
        assert done["awaited"] == kill.awaited_by_recover, done
        assert done["location"] == EXPECTED[mode, point], done
        if (mode, point) in JOB_NOTES:
            assert done["notes"] == JOB_NOTES[mode, point], done
        assert_three_facts(case, migration_id, on=EXPECTED[mode, point], recovered=True)
        again = case.recover()
        assert again.code == 0 and again.doc["recovered"] == [], "recovering twice does nothing"
    finally:
        case.cleanup()
