"""Property test: random event orders, hook results and interrupts against the whole migration.

Whatever QEMU sends (any order, duplicates, states a newer QEMU may have, events after the job's end),
however the hooks end (success, failure, deadline) and whenever an interrupt comes, a migration ends with:
every drained device undrained exactly once and never before its drain ended, the outcome matching
where the VM runs, and the journal holding no device drained.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.scripted import Behaviour, FakeClock, FakeDevice, FakeHost, FakeRunner, Model, assert_invariant
from unit.test_migration import DST, SRC, domain_xml, policy_text

from orchestrator.core.hooks import Trigger
from orchestrator.core.hypervisor import RUNNING
from orchestrator.core.policy_toml import parse_policy
from orchestrator.core.records import still_drained
from orchestrator.core.report import Outcome
from orchestrator.core.request import Request
from orchestrator.edges.journal import Journal
from orchestrator.flows.migration import Migration

STATES = [
    "running",
    "pre-copy",
    "pre-copy-p2p-prepare",
    "pre-copy-p2p",
    "running-p2p",
    "running-p2p-prepare",
    "stop-copy",
    "stop",
    "resuming",
    "some-future-state",
]
DELAYS = st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0])
EVENT = st.tuples(
    DELAYS,
    st.tuples(
        st.just("vfio"),
        st.sampled_from(["src", "dst"]),
        st.sampled_from(["nic0", "nic1"]),
        st.sampled_from(STATES),
    ),
)
END = st.tuples(
    DELAYS, st.tuples(st.just("end"), st.sampled_from([None, "operation failed: migration failed"]))
)
BEHAVIOUR = st.builds(
    Behaviour,
    duration_s=st.sampled_from([0.001, 0.1, 0.6]),
    error=st.sampled_from([None, None, "exited with status 1"]),
    timed_out=st.booleans(),
)


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[float, tuple[Any, ...]]]:
    before = draw(st.lists(EVENT, max_size=10))
    after = draw(st.lists(EVENT, max_size=4))
    return [*before, draw(END), *after]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    script=scripts(),
    drain=st.sampled_from(["prepare", "gated", "start"]),
    on_failure=st.sampled_from(["abort", "continue"]),
    drain_behaviour=BEHAVIOUR,
    undrain_behaviour=BEHAVIOUR,
    interrupt_at=st.one_of(st.none(), st.floats(min_value=0.0, max_value=3.0)),
)
def test_any_event_order_hook_result_and_interrupt_keeps_the_invariant(
    script: list[tuple[float, tuple[Any, ...]]],
    drain: str,
    on_failure: str,
    drain_behaviour: Behaviour,
    undrain_behaviour: Behaviour,
    interrupt_at: float | None,
) -> None:
    clock = FakeClock()
    source, destination = FakeHost(SRC, clock), FakeHost(DST, clock)
    source.model = Model(devices=[FakeDevice("nic0"), FakeDevice("nic1")], script=script)
    source.add("vm1", domain_xml(["nic0", "nic1"]))
    runner = FakeRunner(clock)
    runner.behaviours[(Trigger.DRAIN, None)] = drain_behaviour
    runner.behaviours[(Trigger.UNDRAIN, None)] = undrain_behaviour
    policy = parse_policy(policy_text(drain=drain, on_failure=on_failure), "p.toml")
    with tempfile.TemporaryDirectory() as tmp, Journal.open(Path(tmp) / "j.sqlite") as journal:
        migration = Migration(
            Request("vm1", SRC, DST, policy), source, destination, runner=runner, clock=clock, journal=journal
        )
        if interrupt_at is not None:
            clock.at(interrupt_at, lambda: migration.interrupt("SIGTERM"))
        report = migration.run()
        record = journal.get_migration(report.migration_id)

    assert_invariant(runner)
    running = [
        h.uri for h in (source, destination) if "vm1" in h.domains and h.domains["vm1"].state() == RUNNING
    ]
    if report.outcome is Outcome.SUCCEEDED:
        assert running == [DST]
    elif report.outcome in (Outcome.ROLLED_BACK, Outcome.ABORTED, Outcome.INTERRUPTED):
        assert running == [SRC]
    else:
        assert report.outcome is Outcome.FAILED and running != [DST]
    assert record.migration.outcome is report.outcome
    assert still_drained(record.device_actions) == {}
    assert report.changed is (report.outcome is Outcome.SUCCEEDED)
