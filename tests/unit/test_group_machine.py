"""Tests of the switchover group's machine (orchestrator/core/group.py): a stateful property and examples.

`GroupStates` feeds a `GroupMachine` of 2-4 members every input in any order the physics allows, and
plays each member the way a grouped `MigrationMachine` behaves (orchestrator/core/phases.py): the group's
commands reach a member later than they were decided (`deliver`, in order), a member drains only at the
group's word (or on its own devices' events when QEMU switched over at the floor), its run returns only
once its job ended (or never started) and, with devices drained, once it carried out the group's undrain.
What the test knows of the group comes ONLY from the actions it emitted; after every step it checks:

- StartJobs once, only when every member arrived; DrainMembers once, after it, naming every live member;
- at most one ReleaseMembers, after Record("release"), only when every live member it names was told to
  drain and said DRAINED and every other live member passed early or its job ended, and never after an
  abort decided before the release;
- an abort before the release names every live member not yet aborted; after it, only those whose job
  runs; no member is named by two aborts;
- at most one UndrainMembers, only after a drain, only when every member settled or ended, naming every
  live one;
- once every member ended: the group is done, undrained exactly once if it drained, and its outcome
  SUCCEEDED iff every member's was, PARTIAL iff some but not all were;
- and at the end of every run (`teardown`), that the members behaving well from there on (and the
  deadlines passing) bring the group to done: no member waits for an undrain that never comes.

`GroupStates` leaves out two races the group does not handle (see the xfail tests at the end):
a member's job starting after the group's drain reached it, and a member that passed early draining its
devices on their own events after the group decided to abort it, before that abort reached it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from orchestrator.core.actions import Note, Notice
from orchestrator.core.group import (
    AbortMembers,
    DrainMembers,
    GroupAction,
    GroupMachine,
    GroupPhase,
    Record,
    ReleaseMembers,
    StartJobs,
    UndrainMembers,
)
from orchestrator.core.report import Outcome

HOLD_S = 10.0
RELEASE_S = 5.0
JOB_FAILED = "operation failed: migration failed"
NAMES = ("vm0", "vm1", "vm2", "vm3")


class FakeClock:
    """Time that moves only when a test says so (`orchestrator.core.hypervisor.Clock`)."""

    def __init__(self) -> None:
        self.now = 100.0  # monotonic seconds

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def monotonic(self) -> float:
        return self.now

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        self.now += max(timeout, 0.0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Sim:
    """One member as the test plays it: what the group told it (from the actions, when emitted), what
    the member did with that (when the command is delivered) and what it told the group."""

    name: str
    covered: bool = True  # has covered devices: their events say when QEMU passed early
    # told, as the group emitted it
    named_start: bool = False
    told_drain: bool = False
    told_release: bool = False
    told_abort: Outcome | None = None
    told_undrain: bool = False
    inbox: list[str] = field(default_factory=list)  # "drain", "release", "abort", "undrain": not yet done
    # the member
    arrived: bool = False
    gave_up: bool = False  # its start barrier said False
    job: str = "not-started"  # "running", "ended"
    gate: str = "closed"  # "draining" (at the group's word), "open" (released), "passed-early"
    aborting: bool = False  # its machine's abort is decided (by itself or at the group's word)
    holds_drained: bool = False  # devices drained: its run returns only after the group's undrain
    undrained: bool = False  # carried out the group's undrain
    drained_due: str | None = None  # "early": DRAINED decided at once; "gate": once its drains end
    # said (the notices and ends fed to the group)
    ready: bool = False
    said_drained: bool = False
    passed_early: bool = False
    job_ended: bool = False
    job_error: bool = False
    settled: bool = False
    ended: bool = False
    outcome: Outcome | None = None


class GroupStates(RuleBasedStateMachine):
    """A `GroupMachine` and its members, driven in any order the physics allows."""

    # The two races the group does not handle (see the module's docstring): off here, on in the xfail run.
    RACES = False

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.sims: dict[str, Sim] = {}
        self.group = GroupMachine(NAMES[:2], self.clock, hold_timeout_s=HOLD_S, release_timeout_s=RELEASE_S)
        self.log: list[GroupAction] = []
        self.inputs: list[str] = []
        self.started_at: float | None = None  # monotonic, when StartJobs was emitted
        self.drain: tuple[str, ...] | None = None
        self.release: tuple[str, ...] | None = None
        self.released_at: float | None = None
        self.release_deadline_fired = False
        self.undrain: tuple[str, ...] | None = None
        self.aborted: set[str] = set()  # every member an AbortMembers named
        self.abort_before_release = False

    @initialize(
        n=st.integers(min_value=2, max_value=4),
        covered=st.lists(st.booleans(), min_size=4, max_size=4),
    )
    def make_group(self, n: int, covered: list[bool]) -> None:
        names = NAMES[:n]
        self.group = GroupMachine(names, self.clock, hold_timeout_s=HOLD_S, release_timeout_s=RELEASE_S)
        self.sims = {name: Sim(name, covered=c) for name, c in zip(names, covered, strict=False)}

    # --- the model, from the emitted actions ------------------------------------------------------
    def live(self) -> set[str]:
        return {s.name for s in self.sims.values() if not s.ended}

    def feed(self, what: str, actions: list[GroupAction]) -> list[GroupAction]:
        """Check and record the actions one input produced, in the order they were decided."""
        self.inputs.append(what)
        if all(s.ended for s in self.sims.values()):
            assert self.group.done
            assert actions == [] or all(isinstance(a, Note) for a in actions), (what, actions)
        for action in actions:
            self.check(action)
            self.log.append(action)
        return actions

    def previous(self) -> GroupAction | None:
        return self.log[-1] if self.log else None

    def check(self, action: GroupAction) -> None:
        sims, live = self.sims, self.live()
        if isinstance(action, StartJobs):
            assert self.started_at is None, "StartJobs twice"
            assert self.previous() == Record("start", self.previous().detail if self.previous() else "")
            assert all(s.arrived for s in sims.values()), "StartJobs before every member arrived"
            assert not self.aborted, "StartJobs after an abort"
            assert set(action.members) == set(sims) == live
            self.started_at = self.clock.monotonic()
            for name in action.members:
                sims[name].named_start = True
        elif isinstance(action, DrainMembers):
            assert self.drain is None, "DrainMembers twice"
            assert self.started_at is not None, "DrainMembers before StartJobs"
            assert not self.aborted and self.release is None
            assert isinstance(self.previous(), Record) and self.previous() == Record("drain", _detail(self.log))
            assert set(action.members) == live, (action, live)
            all_ready = bool(live) and all(sims[n].ready and not sims[n].job_ended for n in live)
            went_over = any(
                s.passed_early or (s.job_ended and not s.job_error) or s.outcome is Outcome.SUCCEEDED
                for s in sims.values()
            )
            assert all_ready or went_over, "DrainMembers while a member is not ready and none went over"
            self.drain = action.members
            for name in action.members:
                sims[name].told_drain = True
                sims[name].inbox.append("drain")
        elif isinstance(action, ReleaseMembers):
            assert self.release is None, "ReleaseMembers twice"
            assert self.previous() == Record("release", _detail(self.log)), "ReleaseMembers without its Record"
            assert self.drain is not None, "ReleaseMembers before a drain"
            assert not self.abort_before_release and not self.aborted, "ReleaseMembers after an abort"
            assert set(action.members) <= live
            for name in live:
                s = sims[name]
                if name in action.members:
                    assert s.told_drain and s.said_drained, f"{name} released before it was drained"
                    assert not s.passed_early and not s.job_ended
                else:
                    assert s.passed_early or s.job_ended, f"{name} neither released nor gone over"
            self.release = action.members
            self.released_at = self.clock.monotonic()
            for name in action.members:
                sims[name].told_release = True
                sims[name].inbox.append("release")
        elif isinstance(action, AbortMembers):
            assert action.members, "an empty AbortMembers"
            twice = self.aborted & set(action.members)
            assert not twice, f"{twice} aborted twice"
            assert set(action.members) <= live, "an ended member aborted"
            if self.release is None:
                assert isinstance(self.previous(), Record) and self.previous() == Record(
                    "abort", action.reason
                )
                assert set(action.members) == live - self.aborted, "an abort that leaves a member running"
                self.abort_before_release = True
            else:
                running = {n for n in live if not sims[n].job_ended}
                assert set(action.members) <= running, "an abort after the release of a member that ended"
            self.aborted |= set(action.members)
            for name in action.members:
                sims[name].told_abort = action.outcome
                sims[name].inbox.append("abort")
        elif isinstance(action, UndrainMembers):
            assert self.undrain is None, "UndrainMembers twice"
            assert self.drain is not None, "UndrainMembers without a drain"
            assert self.previous() == Record("undrain", _detail(self.log))
            assert all(s.settled or s.ended for s in sims.values()), "undrained while a member is unsettled"
            assert set(action.members) == live
            self.undrain = action.members
            for name in action.members:
                sims[name].told_undrain = True
                sims[name].inbox.append("undrain")
        else:
            assert isinstance(action, Record | Note), action

    @invariant()
    def done_when_every_member_ended(self) -> None:
        ended = [s for s in self.sims.values() if s.ended]
        assert self.group.done is (bool(self.sims) and len(ended) == len(self.sims))
        if not self.group.done:
            return
        assert self.group.phase is GroupPhase.DONE
        if self.drain is not None:
            assert self.undrain is not None, "drained, never undrained"
        outcome, why = self.group.outcome()
        succeeded = [s for s in ended if s.outcome is Outcome.SUCCEEDED]
        if len(succeeded) == len(ended):
            assert (outcome, why) == (Outcome.SUCCEEDED, None)
        elif succeeded:
            assert outcome is Outcome.PARTIAL, outcome
        else:
            assert outcome not in (Outcome.SUCCEEDED, Outcome.PARTIAL), outcome
            assert why

    # --- what a member does --------------------------------------------------------------------
    def arrive(self, name: str) -> None:
        self.sims[name].arrived = True
        self.feed(f"arrived({name})", self.group.arrived(name))

    def start_job(self, name: str) -> None:
        """At its start barrier: ask the group, start the job or give up."""
        sim = self.sims[name]
        may = self.group.may_start(name)
        self.inputs.append(f"may_start({name}) -> {may}")
        if self.aborted and (self.release is None or name in self.aborted):
            assert may is False, (name, may)
        elif sim.named_start:
            assert may is True, (name, may)
        else:
            assert may is None, (name, may)
        if may:
            sim.job = "running"
        elif may is False:
            sim.gave_up = True

    def carry_out(self, name: str) -> None:
        """The member carries out the group's next command to it (its machine's group_* call)."""
        sim = self.sims[name]
        command = sim.inbox.pop(0)
        if sim.ended:
            return
        if command == "drain":  # group_drain
            if sim.undrained or sim.aborting:
                return
            if sim.gate == "passed-early":
                sim.drained_due = "early"
            elif sim.gate == "closed" and sim.job == "running":
                sim.gate, sim.drained_due = "draining", "gate"
                sim.holds_drained = sim.holds_drained or sim.covered
        elif command == "release":  # group_release
            if sim.gate == "draining" and not sim.aborting:
                sim.gate = "open"
        elif command == "abort":  # request_abort: says ABORTING
            if not sim.aborting:
                self.abort_self(name, "the group's abort")
        else:  # group_undrain
            sim.undrained, sim.holds_drained = True, False

    def converge(self, name: str) -> None:
        sim = self.sims[name]
        sim.ready = not sim.ready
        notice = Notice.READY if sim.ready else Notice.UNREADY
        self.feed(f"notice({name}, {notice})", self.group.notice(name, notice, "expected downtime 40 ms"))

    def pass_early(self, name: str) -> None:
        """QEMU switched over at the floor: the first device quiesces."""
        sim = self.sims[name]
        sim.passed_early = True
        if sim.gate == "closed" and not sim.aborting and not sim.undrained:
            if self.RACES or sim.told_abort is None:
                sim.holds_drained = True  # its devices drain on their own events
        sim.gate = "passed-early"
        self.feed(f"notice({name}, passed-early)", self.group.notice(name, Notice.PASSED_EARLY, "nic0"))

    def say_drained(self, name: str) -> None:
        self.sims[name].said_drained = True
        self.feed(f"notice({name}, drained)", self.group.notice(name, Notice.DRAINED))

    def abort_self(self, name: str, why: str) -> None:
        self.sims[name].aborting = True
        self.feed(f"notice({name}, aborting)", self.group.notice(name, Notice.ABORTING, why))

    def end_job(self, name: str, ok: bool) -> None:
        sim = self.sims[name]
        sim.job, sim.job_ended, sim.job_error = "ended", True, not ok
        detail = "" if ok else JOB_FAILED
        self.feed(f"notice({name}, job-ended, {detail!r})", self.group.notice(name, Notice.JOB_ENDED, detail))

    def settle(self, name: str) -> None:
        self.sims[name].settled = True
        self.feed(f"notice({name}, settled)", self.group.notice(name, Notice.SETTLED))

    def end(self, name: str, outcome: Outcome) -> None:
        sim = self.sims[name]
        sim.ended, sim.outcome, sim.inbox = True, outcome, []
        error = None if outcome is Outcome.SUCCEEDED else f"it {outcome.value}"
        self.feed(f"ended({name}, {outcome})", self.group.ended(name, outcome, error))

    # --- what the physics allows ------------------------------------------------------------------
    def can_arrive(self) -> list[str]:
        return [s.name for s in self.sims.values() if not s.arrived and not s.ended]

    def can_start(self) -> list[str]:
        return [
            s.name
            for s in self.sims.values()
            if s.arrived and not s.ended and s.job == "not-started" and not s.gave_up
        ]

    def can_deliver(self) -> list[str]:
        def deliverable(s: Sim) -> bool:
            if not s.inbox:
                return False
            # Without the race, the group's drain reaches a member once its job started (or will not).
            return self.RACES or s.inbox[0] != "drain" or s.job != "not-started" or s.gave_up or s.ended

        return [s.name for s in self.sims.values() if deliverable(s)]

    def can_converge(self) -> list[str]:
        return [
            s.name
            for s in self.sims.values()
            if s.job == "running" and s.gate == "closed" and not s.aborting and not s.ended
        ]

    def can_pass_early(self) -> list[str]:
        return [
            s.name
            for s in self.sims.values()
            if s.covered and s.job == "running" and s.gate in ("closed", "draining")
        ]

    def can_say_drained(self) -> list[str]:
        return [
            s.name
            for s in self.sims.values()
            if not s.said_drained
            and not s.ended
            and (s.drained_due == "early" or (s.drained_due == "gate" and s.gate == "draining" and not s.aborting))
        ]

    def can_abort(self) -> list[str]:
        return [s.name for s in self.sims.values() if not s.ended and not s.aborting]

    def job_endings(self, sim: Sim) -> list[bool]:
        """How its job may end now: True with success, False with an error."""
        if sim.job != "running":
            return []
        if sim.gate in ("open", "passed-early"):
            return [True, False]
        if sim.covered or sim.aborting:  # QEMU cannot switch over unseen; an abort ends it with an error
            return [False]
        return [True, False]  # no covered device: it may switch over at the floor, unseen

    def can_end_job(self) -> list[str]:
        return [s.name for s in self.sims.values() if self.job_endings(s)]

    def can_settle(self) -> list[str]:
        return [s.name for s in self.sims.values() if s.job == "ended" and not s.settled and not s.ended]

    def outcomes(self, sim: Sim) -> list[Outcome]:
        """How its run may end now (nothing while it cannot)."""
        if sim.ended or sim.job == "running" or sim.holds_drained:
            return []
        if sim.job == "ended":
            if sim.job_error:  # SUCCEEDED: libvirt failed after the destination took over
                return [Outcome.ROLLED_BACK, Outcome.ABORTED, Outcome.INTERRUPTED, Outcome.FAILED, Outcome.SUCCEEDED]
            return [Outcome.SUCCEEDED, Outcome.FAILED]
        if sim.gave_up:
            assert sim.told_abort is not None
            return [sim.told_abort]
        if not sim.arrived:  # pre-flight, before hooks, or a signal before it arrived
            return [Outcome.REFUSED, Outcome.ABORTED, Outcome.INTERRUPTED]
        return []  # waiting at its start barrier

    def can_end(self) -> list[str]:
        return [s.name for s in self.sims.values() if self.outcomes(s)]

    # --- the rules --------------------------------------------------------------------------------
    @precondition(lambda self: bool(self.can_arrive()))
    @rule(data=st.data())
    def rule_arrive(self, data: st.DataObject) -> None:
        self.arrive(data.draw(st.sampled_from(self.can_arrive()), label="member"))

    @precondition(lambda self: bool(self.can_start()))
    @rule(data=st.data())
    def rule_start_job(self, data: st.DataObject) -> None:
        self.start_job(data.draw(st.sampled_from(self.can_start()), label="member"))

    @precondition(lambda self: bool(self.can_deliver()))
    @rule(data=st.data())
    def rule_deliver(self, data: st.DataObject) -> None:
        self.carry_out(data.draw(st.sampled_from(self.can_deliver()), label="member"))

    @precondition(lambda self: bool(self.can_converge()))
    @rule(data=st.data())
    def rule_ready_or_unready(self, data: st.DataObject) -> None:
        self.converge(data.draw(st.sampled_from(self.can_converge()), label="member"))

    @precondition(lambda self: bool(self.can_pass_early()))
    @rule(data=st.data())
    def rule_pass_early(self, data: st.DataObject) -> None:
        self.pass_early(data.draw(st.sampled_from(self.can_pass_early()), label="member"))

    @precondition(lambda self: bool(self.can_say_drained()))
    @rule(data=st.data())
    def rule_drained(self, data: st.DataObject) -> None:
        self.say_drained(data.draw(st.sampled_from(self.can_say_drained()), label="member"))

    @precondition(lambda self: bool(self.can_abort()))
    @rule(data=st.data())
    def rule_aborting(self, data: st.DataObject) -> None:
        self.abort_self(data.draw(st.sampled_from(self.can_abort()), label="member"), "its drain hook failed")

    @precondition(lambda self: bool(self.can_end_job()))
    @rule(data=st.data())
    def rule_job_ended(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.can_end_job()), label="member")
        self.end_job(name, data.draw(st.sampled_from(self.job_endings(self.sims[name])), label="ok"))

    @precondition(lambda self: bool(self.can_settle()))
    @rule(data=st.data())
    def rule_settled(self, data: st.DataObject) -> None:
        self.settle(data.draw(st.sampled_from(self.can_settle()), label="member"))

    @precondition(lambda self: bool(self.can_end()))
    @rule(data=st.data())
    def rule_ended(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.can_end()), label="member")
        self.end(name, data.draw(st.sampled_from(self.outcomes(self.sims[name])), label="outcome"))

    @rule()
    def rule_interrupt(self) -> None:
        live = self.live()
        before = set(self.aborted)
        actions = self.feed("interrupt", self.group.interrupt("SIGTERM"))
        aborts = [a for a in actions if isinstance(a, AbortMembers)]
        if self.release is None and self.started_at is not None or (self.release is None and live):
            if not before:  # the first abort before the release: every live member
                expected = live - before
                assert [set(a.members) for a in aborts] == ([expected] if expected else [])
                assert all(a.outcome is Outcome.INTERRUPTED for a in aborts)
        elif self.release is not None and self.undrain is None:
            late = {n for n in live if not self.sims[n].job_ended} - before
            assert [set(a.members) for a in aborts] == ([late] if late else [])

    @rule(dt=st.sampled_from([1.0, RELEASE_S + 1.0, HOLD_S + 1.0]))
    def rule_tick(self, dt: float) -> None:
        self.clock.advance(dt)
        self.tick()

    def tick(self) -> list[GroupAction]:
        now, live, before = self.clock.monotonic(), self.live(), set(self.aborted)
        holding = self.started_at is not None and self.drain is None and not self.aborted
        hold_over = holding and self.started_at is not None and now > self.started_at + HOLD_S
        release_over = (
            self.released_at is not None
            and self.undrain is None
            and not self.release_deadline_fired
            and now > self.released_at + RELEASE_S
        )
        waiting = [n for n in sorted(live) if not self.sims[n].ready]
        actions = self.feed("tick", self.group.tick())
        aborts = [a for a in actions if isinstance(a, AbortMembers)]
        if hold_over:
            assert [set(a.members) for a in aborts] == [live]
            assert aborts[0].outcome is Outcome.ROLLED_BACK
            assert all(n in aborts[0].reason for n in waiting), (aborts[0].reason, waiting)
        elif release_over:
            self.release_deadline_fired = True
            late = {n for n in live if not self.sims[n].job_ended} - before
            assert [set(a.members) for a in aborts] == ([late] if late else [])
        else:
            assert actions == [], actions
        return actions

    # --- the end: the members behave from here on, the deadlines pass ------------------------------
    def teardown(self) -> None:
        if not self.sims:
            return
        for _ in range(500):
            if self.group.done:
                break
            if not self.cooperate():
                self.clock.advance(HOLD_S + RELEASE_S + 1.0)
                if not self.tick():
                    stuck = {
                        s.name: (s.job, s.gate, "holds drained" if s.holds_drained else "")
                        for s in self.sims.values()
                        if not s.ended
                    }
                    pytest.fail(
                        f"the group is stuck in {self.group.phase}: {stuck}\ninputs: {self.inputs}\n"
                        f"actions: {self.log}"
                    )
        assert self.group.done
        self.done_when_every_member_ended()

    def cooperate(self) -> bool:
        """One step of a well-behaved member, if one can make one."""
        for name in self.can_deliver():
            self.carry_out(name)
            return True
        for name in self.can_arrive():
            self.arrive(name)
            return True
        for name in self.can_start():
            before = self.sims[name].job, self.sims[name].gave_up
            self.start_job(name)
            if (self.sims[name].job, self.sims[name].gave_up) != before:
                return True
        for name in self.can_say_drained():
            self.say_drained(name)
            return True
        for sim in self.sims.values():
            endings = self.job_endings(sim)
            if sim.gate in ("open", "passed-early") and True in endings:
                self.end_job(sim.name, True)
                return True
            if sim.aborting and endings:
                self.end_job(sim.name, False)
                return True
        for name in self.can_converge():
            if not self.sims[name].ready:
                self.converge(name)
                return True
        for name in self.can_settle():
            self.settle(name)
            return True
        for name in self.can_end():
            sim = self.sims[name]
            if sim.job == "ended" and not sim.job_error:
                self.end(name, Outcome.SUCCEEDED)
            else:
                self.end(name, self.outcomes(sim)[0])
            return True
        return False


def _detail(log: list[GroupAction]) -> str:
    """The detail of the Record last in `log` (its wording is free; its step is what is checked)."""
    last = log[-1] if log else None
    return last.detail if isinstance(last, Record) else ""


STATEFUL = settings(stateful_step_count=60, suppress_health_check=[HealthCheck.too_slow])
TestGroupStates = GroupStates.TestCase
TestGroupStates.settings = STATEFUL


class GroupStatesWithRaces(GroupStates):
    RACES = True


@pytest.mark.xfail(
    strict=True,
    reason="group.py: a member's own drain after an abort is never undrained; a drain before a job "
    "started is never carried out (see the two tests below)",
)
def test_the_races_the_group_does_not_handle() -> None:
    run_state_machine_as_test(
        GroupStatesWithRaces,
        settings=settings(STATEFUL, max_examples=500, derandomize=True, database=None),
    )


# --- examples ---------------------------------------------------------------------------------------
def group_of(*names: str, clock: FakeClock | None = None) -> GroupMachine:
    return GroupMachine(names, clock or FakeClock(), hold_timeout_s=HOLD_S, release_timeout_s=RELEASE_S)


def of(actions: list[GroupAction], kind: type) -> list[GroupAction]:
    return [a for a in actions if isinstance(a, kind)]


def started(group: GroupMachine) -> None:
    for name in group.members:
        group.arrived(name)
    assert all(group.may_start(name) for name in group.members)


def test_the_happy_path() -> None:
    group = group_of("a", "b")
    assert group.arrived("a") == []
    assert group.may_start("a") is None
    actions = group.arrived("b")
    assert [type(a) for a in actions] == [Record, StartJobs]
    assert actions[1] == StartJobs(("a", "b")) and group.phase is GroupPhase.HOLDING
    assert group.may_start("a") is True and group.may_start("b") is True
    assert group.notice("a", Notice.READY, "40 ms") == []
    actions = group.notice("b", Notice.READY, "35 ms")
    assert [type(a) for a in actions] == [Record, DrainMembers] and actions[1] == DrainMembers(("a", "b"))
    assert group.notice("a", Notice.DRAINED) == []
    actions = group.notice("b", Notice.DRAINED)
    assert actions == [Record("release", "every member drained: releasing a, b"), ReleaseMembers(("a", "b"))]
    assert group.notice("a", Notice.JOB_ENDED) == []
    assert group.notice("b", Notice.JOB_ENDED) == []
    assert group.notice("a", Notice.SETTLED) == []
    actions = group.notice("b", Notice.SETTLED)
    assert [type(a) for a in actions] == [Record, UndrainMembers] and actions[1] == UndrainMembers(("a", "b"))
    assert group.ended("a", Outcome.SUCCEEDED, None) == []
    assert not group.done
    assert group.ended("b", Outcome.SUCCEEDED, None) == []
    assert group.done and group.outcome() == (Outcome.SUCCEEDED, None)


def test_unready_again_holds_the_drain() -> None:
    group = group_of("a", "b")
    started(group)
    group.notice("a", Notice.READY)
    group.notice("a", Notice.UNREADY)
    assert group.notice("b", Notice.READY) == []
    assert of(group.notice("a", Notice.READY), DrainMembers) == [DrainMembers(("a", "b"))]


def test_a_member_aborting_while_held_aborts_the_group() -> None:
    group = group_of("a", "b", "c")
    started(group)
    group.notice("b", Notice.READY)
    actions = group.notice("a", Notice.ABORTING, "its drain hook failed")
    assert [type(a) for a in actions] == [Record, AbortMembers]
    abort = actions[1]
    assert isinstance(abort, AbortMembers)
    # Every live member, the aborting one too (its machine's first abort wins: harmless).
    assert abort.members == ("a", "b", "c") and abort.outcome is Outcome.ROLLED_BACK
    assert "a is aborting" in abort.reason
    assert group.phase is GroupPhase.ABORTING
    assert group.notice("c", Notice.READY) == [] and group.notice("b", Notice.PASSED_EARLY, "nic0") == []
    assert group.notice("b", Notice.ABORTING, "the group's abort") == []  # told back: nothing more
    for name in ("a", "b", "c"):
        group.notice(name, Notice.JOB_ENDED, JOB_FAILED)
        group.notice(name, Notice.SETTLED)
    assert group.ended("a", Outcome.ABORTED, "its drain hook failed") == []
    group.ended("b", Outcome.ROLLED_BACK, "aborted")
    group.ended("c", Outcome.ROLLED_BACK, "aborted")
    assert group.done
    outcome, why = group.outcome()
    assert outcome is Outcome.ABORTED and why is not None and "a is aborting" in why


def test_a_member_aborting_while_draining_undrains_once_every_member_settled() -> None:
    group = group_of("a", "b")
    started(group)
    group.notice("a", Notice.READY)
    group.notice("b", Notice.READY)
    group.notice("a", Notice.DRAINED)
    actions = group.notice("b", Notice.ABORTING, "drain hook timed out")
    assert of(actions, AbortMembers) == [
        AbortMembers(("a", "b"), "b is aborting: drain hook timed out", Outcome.ROLLED_BACK)
    ]
    assert group.notice("b", Notice.DRAINED) == []  # too late: never released
    group.notice("a", Notice.JOB_ENDED, JOB_FAILED)
    assert group.notice("a", Notice.SETTLED) == []
    group.notice("b", Notice.JOB_ENDED, JOB_FAILED)
    actions = group.notice("b", Notice.SETTLED)
    assert of(actions, UndrainMembers) == [UndrainMembers(("a", "b"))]
    assert of(actions, ReleaseMembers) == []


def test_a_signal_after_the_release_aborts_only_the_members_whose_job_runs() -> None:
    group = group_of("a", "b", "c")
    started(group)
    for name in ("a", "b", "c"):
        group.notice(name, Notice.READY)
    for name in ("a", "b", "c"):
        actions = group.notice(name, Notice.DRAINED)
    assert of(actions, ReleaseMembers) == [ReleaseMembers(("a", "b", "c"))]
    group.notice("a", Notice.JOB_ENDED)
    actions = group.interrupt("SIGTERM")
    assert actions == [AbortMembers(("b", "c"), "SIGTERM", Outcome.INTERRUPTED)]
    assert group.interrupt("SIGTERM") == []  # each member once
    group.notice("b", Notice.JOB_ENDED)  # the abort came too late: it switched over
    group.notice("c", Notice.JOB_ENDED, "operation aborted: migration job: canceled by client")
    for name in ("a", "b", "c"):
        actions = group.notice(name, Notice.SETTLED)
    assert of(actions, UndrainMembers) == [UndrainMembers(("a", "b", "c"))]
    group.ended("a", Outcome.SUCCEEDED, None)
    group.ended("b", Outcome.SUCCEEDED, "the abort came too late")
    group.ended("c", Outcome.INTERRUPTED, "SIGTERM")
    assert group.done
    outcome, why = group.outcome()
    assert outcome is Outcome.PARTIAL and why is not None and "c: interrupted" in why


def test_the_release_deadline_aborts_the_late_members_once() -> None:
    clock = FakeClock()
    group = group_of("a", "b", clock=clock)
    started(group)
    group.notice("a", Notice.READY)
    group.notice("b", Notice.READY)
    group.notice("a", Notice.DRAINED)
    group.notice("b", Notice.DRAINED)
    group.notice("a", Notice.JOB_ENDED)
    clock.advance(RELEASE_S)
    assert group.tick() == []
    clock.advance(1.0)
    [abort] = group.tick()
    assert isinstance(abort, AbortMembers) and abort.members == ("b",)
    assert abort.outcome is Outcome.ROLLED_BACK
    clock.advance(RELEASE_S + 1.0)
    assert group.tick() == []


def test_the_hold_timeout_aborts_every_member_and_names_the_one_not_ready() -> None:
    clock = FakeClock()
    group = group_of("a", "b", "c", clock=clock)
    started(group)
    group.notice("a", Notice.READY)
    group.notice("c", Notice.READY)
    clock.advance(HOLD_S)
    assert group.tick() == []
    clock.advance(0.5)
    actions = group.tick()
    assert [type(a) for a in actions] == [Record, AbortMembers]
    abort = actions[1]
    assert isinstance(abort, AbortMembers)
    assert abort.members == ("a", "b", "c") and abort.outcome is Outcome.ROLLED_BACK
    assert "b would not switch over" in abort.reason and "a," not in abort.reason
    assert group.tick() == []
    for name in ("a", "b", "c"):
        group.notice(name, Notice.JOB_ENDED, JOB_FAILED)
        group.ended(name, Outcome.ROLLED_BACK, abort.reason)
    assert group.done
    assert group.outcome() == (Outcome.ROLLED_BACK, abort.reason)


def test_a_member_refused_at_preflight_aborts_the_others_before_they_start() -> None:
    group = group_of("a", "b", "c")
    group.arrived("a")
    actions = group.ended("b", Outcome.REFUSED, "the destination has no such network")
    assert [type(a) for a in actions] == [Record, AbortMembers]
    abort = actions[1]
    assert isinstance(abort, AbortMembers) and abort.members == ("a", "c")
    assert group.may_start("a") is False
    assert group.arrived("c") == []  # it arrives after all: told not to start
    assert group.may_start("c") is False
    group.ended("a", Outcome.ROLLED_BACK, abort.reason)
    group.ended("c", Outcome.ROLLED_BACK, abort.reason)
    assert group.done
    outcome, why = group.outcome()
    assert outcome is Outcome.REFUSED and why is not None and "b refused" in why


def test_a_signal_before_every_member_arrived_aborts_them_all() -> None:
    group = group_of("a", "b")
    group.arrived("a")
    actions = group.interrupt("SIGINT")
    assert of(actions, AbortMembers) == [AbortMembers(("a", "b"), "SIGINT", Outcome.INTERRUPTED)]
    assert group.arrived("b") == [] and group.may_start("b") is False
    group.ended("a", Outcome.INTERRUPTED, "SIGINT")
    group.ended("b", Outcome.INTERRUPTED, "SIGINT")
    assert group.outcome() == (Outcome.INTERRUPTED, "SIGINT")


def test_a_member_passing_early_starts_the_drain_at_once() -> None:
    group = group_of("a", "b")
    started(group)
    actions = group.notice("b", Notice.PASSED_EARLY, "nic0")  # nobody said READY
    assert of(actions, DrainMembers) == [DrainMembers(("a", "b"))]
    assert group.phase is GroupPhase.DRAINING
    group.notice("b", Notice.DRAINED)  # its group_drain says so at once
    actions = group.notice("a", Notice.DRAINED)
    assert of(actions, ReleaseMembers) == [ReleaseMembers(("a",))]  # b is over already


def test_a_job_ending_unseen_at_the_floor_counts_as_passing_early() -> None:
    group = group_of("a", "b")
    started(group)
    actions = group.notice("a", Notice.JOB_ENDED)  # no covered device said so
    assert of(actions, DrainMembers) == [DrainMembers(("a", "b"))]
    actions = group.notice("b", Notice.DRAINED)
    assert of(actions, ReleaseMembers) == [ReleaseMembers(("b",))]


# --- the races group.py does not handle --------------------------------------------------------------
@pytest.mark.xfail(
    strict=True,
    reason="group.py: a member that drained on its own events (passed early) after the group's abort was "
    "decided but before it reached the member is never undrained: _maybe_undrain needs drain_started",
)
def test_a_member_that_drained_on_its_own_during_an_abort_is_undrained() -> None:
    group = group_of("a", "b")
    started(group)
    actions = group.notice("a", Notice.ABORTING, "its before-drain hook failed")
    assert of(actions, AbortMembers) == [
        AbortMembers(("a", "b"), "a is aborting: its before-drain hook failed", Outcome.ROLLED_BACK)
    ]
    # Before b carries out that abort, QEMU switches b over at the floor: its device's prepare event
    # drains the device (MigrationMachine.on_vfio: no abort of its own yet), held for the group's undrain.
    assert group.notice("b", Notice.PASSED_EARLY, "nic0") == []
    group.notice("b", Notice.ABORTING, "the group's abort")  # its abort, too late
    group.notice("b", Notice.JOB_ENDED)
    group.notice("a", Notice.JOB_ENDED, JOB_FAILED)
    group.notice("a", Notice.SETTLED)
    group.ended("a", Outcome.ABORTED, "its before-drain hook failed")
    # b's device runs again on the destination: held drained until the group undrains it. Nothing else
    # can end b's run: the group must undrain it now.
    actions = group.notice("b", Notice.SETTLED)
    assert of(actions, UndrainMembers) == [UndrainMembers(("b",))]


@pytest.mark.xfail(
    strict=True,
    reason="group.py: a member whose job starts after the group's drain reached it (MigrationMachine."
    "group_drain ignores it: no job yet) is never drained, and DRAINING has no deadline",
)
def test_a_member_whose_job_starts_after_the_drain_still_drains_or_the_group_gives_up() -> None:
    clock = FakeClock()
    group = group_of("a", "b", clock=clock)
    group.arrived("a")
    group.arrived("b")
    assert group.may_start("a") is True
    actions = group.notice("a", Notice.PASSED_EARLY, "nic0")  # a's idle guest went over at the floor
    assert of(actions, DrainMembers) == [DrainMembers(("a", "b"))]
    # b's driver carries out group_drain before b's job started: its machine ignores it.
    assert group.may_start("b") is True
    group.notice("a", Notice.DRAINED)
    assert group.notice("b", Notice.READY, "40 ms") == []  # held at the floor, never told to drain again
    clock.advance(HOLD_S + RELEASE_S + 1.0)
    actions = group.tick()
    # Either a new word to b, or the group gives up: not wait forever.
    assert of(actions, DrainMembers) or of(actions, AbortMembers), actions
