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
- at most one UndrainMembers, only after a drain (or a member passing early: its devices drain on their
  own events), only when every member settled or ended, naming every live one;
- once every member ended: the group is done, undrained exactly once if anything drained, and its
  outcome SUCCEEDED iff every member's was, PARTIAL iff some but not all were;
- and at the end of every run (`teardown`), that the members behaving well from there on (and the
  deadlines passing) bring the group to done: no member waits for an undrain that never comes.

`GroupStates` includes the four orders that once left a group hung (the examples at the end, one
each): the member the release waits for last passing early instead of saying DRAINED; the group's own
drain hooks ending after every member settled; a member's job starting after the group's drain reached
it; and a member that passed early draining its devices on their own events after the group decided to
abort it, before that abort reached it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
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
    RunGroupHooks,
    StartJobs,
    UndrainMembers,
)
from orchestrator.core.hooks import Trigger
from orchestrator.core.report import Outcome

HOLD_S = 60.0
RELEASE_S = 5.0
JOB_FAILED = "operation failed: migration failed"
NAMES = ("vm0", "vm1", "vm2", "vm3")
# A failure in about a tenth of the times a rule could fail (not at 0: hypothesis draws that often).
DICE = st.integers(min_value=0, max_value=9)
RARE = st.integers(min_value=0, max_value=29)  # a signal, always possible: rarer still
FAIL = 3


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
    drained_on_its_own: bool = False  # passed early: its devices drained on their own events
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

    # Orders that once hung the group (see the module's docstring), each a flag to turn off when
    # bisecting a failure.
    # LAST_PASSES_EARLY: the member the release waits for last may pass early (QEMU switched over at the
    # floor while its drain hooks ran) instead of saying DRAINED. LATE_START: the group's drain may reach
    # a member before its job started (its machine ignores it). LATE_ABORT: a member may pass early and
    # drain on its own after the group decided to abort it, before that abort reached it.
    # SLOW_GROUP_HOOKS: the group's drain hooks may still run when every member settled or ended.
    LAST_PASSES_EARLY = True
    LATE_START = True
    LATE_ABORT = True
    SLOW_GROUP_HOOKS = True

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
        self.was_done = False
        # The group's own hooks: how many the policy has, how many still run (from RunGroupHooks), started.
        self.hooks = {Trigger.GROUP_DRAIN: 0, Trigger.GROUP_UNDRAIN: 0}
        self.hooks_running = {Trigger.GROUP_DRAIN: 0, Trigger.GROUP_UNDRAIN: 0}
        self.hooks_started: set[Trigger] = set()

    @initialize(
        n=st.integers(min_value=2, max_value=4),
        covered=st.lists(st.booleans(), min_size=4, max_size=4),
        head_start=st.sampled_from(["none", "arrived", "started"]),
        drain_hooks=st.integers(min_value=0, max_value=2),
        undrain_hooks=st.integers(min_value=0, max_value=1),
    )
    def make_group(
        self, n: int, covered: list[bool], head_start: str, drain_hooks: int, undrain_hooks: int
    ) -> None:
        """`head_start`: the runs that begin with every member arrived (or its job started too) spend
        their steps on what follows. `drain_hooks`, `undrain_hooks`: the group's own hooks."""
        names = NAMES[:n]
        self.hooks = {Trigger.GROUP_DRAIN: drain_hooks, Trigger.GROUP_UNDRAIN: undrain_hooks}
        self.group = GroupMachine(
            names,
            self.clock,
            hold_timeout_s=HOLD_S,
            release_timeout_s=RELEASE_S,
            drain_hooks=drain_hooks,
            undrain_hooks=undrain_hooks,
        )
        self.sims = {name: Sim(name, covered=c) for name, c in zip(names, covered, strict=False)}
        if head_start != "none":
            for name in names:
                self.arrive(name)
        if head_start == "started":
            for name in names:
                self.start_job(name)

    # --- the model, from the emitted actions ------------------------------------------------------
    def live(self) -> set[str]:
        return {s.name for s in self.sims.values() if not s.ended}

    def feed(self, what: str, actions: list[GroupAction]) -> list[GroupAction]:
        """Check and record the actions one input produced, in the order they were decided."""
        self.inputs.append(what)
        if self.was_done:  # nothing more to decide
            assert all(isinstance(a, Note) for a in actions), (what, actions)
        self.was_done = self.group.done
        for action in actions:
            self.check(action)
            self.log.append(action)
        return actions

    def after_record(self, step: str) -> None:
        """Every command follows its step's Record (journaled before the actions that follow it)."""
        last = self.log[-1] if self.log else None
        assert isinstance(last, Record) and last.step == step, (step, last)

    def check(self, action: GroupAction) -> None:
        sims, live = self.sims, self.live()
        if isinstance(action, StartJobs):
            assert self.started_at is None, "StartJobs twice"
            self.after_record("start")
            # Every member arrived, but one already on its destination (UNCHANGED before it arrived).
            assert all(s.arrived or s.outcome is Outcome.UNCHANGED for s in sims.values()), "not arrived"
            assert not self.aborted, "StartJobs after an abort"
            assert action.members and set(action.members) == {s.name for s in sims.values() if s.arrived}
            assert set(action.members) == live
            self.started_at = self.clock.monotonic()
            for name in action.members:
                sims[name].named_start = True
        elif isinstance(action, DrainMembers):
            assert self.drain is None, "DrainMembers twice"
            assert self.started_at is not None, "DrainMembers before StartJobs"
            assert not self.aborted and self.release is None
            self.after_record("drain")
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
            self.after_record("release")
            assert self.drain is not None, "ReleaseMembers before a drain"
            assert not self.abort_before_release and not self.aborted, "ReleaseMembers after an abort"
            assert not self.hooks_running[Trigger.GROUP_DRAIN], "released while the group drain hooks run"
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
                self.after_record("abort")
                assert self.log[-1] == Record("abort", action.reason)
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
            # Only when a member may hold drained devices: the group drained, or a member passed early.
            assert self.drain is not None or any(s.passed_early for s in sims.values()), "nothing drained"
            self.after_record("undrain")
            assert all(s.settled or s.ended for s in sims.values()), "undrained while a member is unsettled"
            assert set(action.members) == live
            self.undrain = action.members
            for name in action.members:
                sims[name].told_undrain = True
                sims[name].inbox.append("undrain")
        elif isinstance(action, RunGroupHooks):
            trigger = action.trigger
            assert trigger not in self.hooks_started, f"{trigger} hooks twice"
            assert self.hooks[trigger], f"{trigger} hooks the policy does not have"
            if trigger is Trigger.GROUP_DRAIN:
                assert isinstance(self.log[-1], DrainMembers), "the group drain hooks, not with its drain"
            else:
                assert self.undrain is not None, "the group undrain hooks before the undrain"
                assert not self.hooks_running[Trigger.GROUP_DRAIN], "undrain hooks while drain hooks run"
            self.hooks_started.add(trigger)
            self.hooks_running[trigger] = self.hooks[trigger]
        else:
            assert isinstance(action, Record | Note), action

    @invariant()
    def done_when_every_member_ended(self) -> None:
        ended = [s for s in self.sims.values() if s.ended]
        undrain_hooks_due = (
            self.undrain is not None
            and bool(self.hooks[Trigger.GROUP_UNDRAIN])
            and Trigger.GROUP_UNDRAIN not in self.hooks_started
        )
        hooks_over = not any(self.hooks_running.values()) and not undrain_hooks_due
        assert self.group.done is (bool(self.sims) and len(ended) == len(self.sims) and hooks_over)
        if not self.group.done:
            return
        assert self.group.phase is GroupPhase.DONE
        if self.drain is not None or any(s.drained_on_its_own for s in self.sims.values()):
            assert self.undrain is not None, "drained, never undrained"
        outcome, why = self.group.outcome()
        # A member already on its destination (UNCHANGED) is where the group wants it, unmoved.
        moved = [s for s in ended if s.outcome is Outcome.SUCCEEDED]
        there = [s for s in ended if s.outcome in (Outcome.SUCCEEDED, Outcome.UNCHANGED)]
        if len(there) == len(ended):
            assert (outcome, why) == (Outcome.SUCCEEDED if moved else Outcome.UNCHANGED, None)
        elif moved:
            assert outcome is Outcome.PARTIAL, outcome
        else:
            assert outcome not in (Outcome.SUCCEEDED, Outcome.PARTIAL, Outcome.UNCHANGED), outcome
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
        if self.abort_before_release or name in self.aborted:
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
        self.inputs.append(f"{name} carries out {command}")
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
        # Its devices drain on their own events, unless its machine is aborting (without the race: unless
        # the group decided to abort it, as if that abort always reached it first).
        own_drain = not sim.aborting and not sim.undrained and (self.LATE_ABORT or sim.told_abort is None)
        if sim.gate == "closed" and own_drain:
            sim.holds_drained = sim.drained_on_its_own = True
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
            return self.LATE_START or s.inbox[0] != "drain" or s.job != "not-started" or s.gave_up or s.ended

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
            if s.covered
            and s.job == "running"
            and s.gate in ("closed", "draining")
            and (self.LAST_PASSES_EARLY or not self.release_waits_only_for(s))
        ]

    def release_waits_only_for(self, sim: Sim) -> bool:
        """Whether the group drains, and every live member but `sim` is drained or gone over."""
        if self.drain is None or self.release is not None or self.aborted:
            return False

        def over(s: Sim) -> bool:
            return (s.told_drain and s.said_drained) or s.passed_early or s.job_ended

        return not over(sim) and all(over(s) for s in self.sims.values() if not s.ended and s is not sim)

    def can_say_drained(self) -> list[str]:
        return [
            s.name
            for s in self.sims.values()
            if not s.said_drained
            and not s.ended
            and (
                s.drained_due == "early"
                or (s.drained_due == "gate" and s.gate == "draining" and not s.aborting)
            )
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
        if self.held_by_group_hooks():
            return []
        return [s.name for s in self.sims.values() if s.job == "ended" and not s.settled and not s.ended]

    def held_by_group_hooks(self) -> bool:
        """Without SLOW_GROUP_HOOKS: no member settles or ends while the group's drain hooks run before
        the release (they end first)."""
        if self.SLOW_GROUP_HOOKS or self.drain is None or self.release is not None or self.aborted:
            return False
        return bool(self.hooks_running[Trigger.GROUP_DRAIN])

    def outcomes(self, sim: Sim) -> list[Outcome]:
        """How its run may end now (nothing while it cannot)."""
        if sim.ended or sim.job == "running" or sim.holds_drained:
            return []
        if sim.job == "ended":
            if sim.job_error:  # SUCCEEDED: libvirt failed after the destination took over
                return [
                    Outcome.ROLLED_BACK,
                    Outcome.ABORTED,
                    Outcome.INTERRUPTED,
                    Outcome.FAILED,
                    Outcome.SUCCEEDED,
                ]
            return [Outcome.SUCCEEDED, Outcome.FAILED]
        if sim.gave_up:
            assert sim.told_abort is not None
            return [sim.told_abort]
        if not sim.arrived:  # pre-flight (or already on its destination), before hooks, or a signal
            return [Outcome.REFUSED, Outcome.UNCHANGED, Outcome.ABORTED, Outcome.INTERRUPTED]
        return []  # waiting at its start barrier

    def can_end(self) -> list[str]:
        if self.held_by_group_hooks():
            return []
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
    @rule(data=st.data(), dice=DICE)
    def rule_aborting(self, data: st.DataObject, dice: int) -> None:
        if dice == FAIL:
            self.abort_self(data.draw(st.sampled_from(self.can_abort()), label="member"), "a hook failed")

    @precondition(lambda self: bool(self.can_end_job()))
    @rule(data=st.data(), dice=DICE)
    def rule_job_ended(self, data: st.DataObject, dice: int) -> None:
        name = data.draw(st.sampled_from(self.can_end_job()), label="member")
        endings, sim = self.job_endings(self.sims[name]), self.sims[name]
        if True in endings:  # it may succeed: mostly it does
            self.end_job(name, dice != FAIL)
        elif sim.aborting or dice == FAIL:  # an aborted job fails; one held at the gate rarely does
            self.end_job(name, False)

    @precondition(lambda self: bool(self.can_settle()))
    @rule(data=st.data())
    def rule_settled(self, data: st.DataObject) -> None:
        self.settle(data.draw(st.sampled_from(self.can_settle()), label="member"))

    @precondition(lambda self: bool(self.can_end()))
    @rule(data=st.data(), dice=DICE)
    def rule_ended(self, data: st.DataObject, dice: int) -> None:
        name = data.draw(st.sampled_from(self.can_end()), label="member")
        if not self.sims[name].arrived and dice != FAIL:  # refused at pre-flight, a signal, a hook: rarely
            return
        self.end(name, data.draw(st.sampled_from(self.outcomes(self.sims[name])), label="outcome"))

    def can_end_group_hook(self) -> list[Trigger]:
        return [t for t, running in self.hooks_running.items() if running]

    def group_hook_done(self, trigger: Trigger, failed: bool, abort_on_failure: bool) -> None:
        live, before = self.live(), set(self.aborted)
        before_release = self.release is None and not self.abort_before_release
        self.hooks_running[trigger] -= 1
        failure = f"{trigger} hook exited with status 1" if failed else None
        actions = self.feed(
            f"hooks_done({trigger}, {failure!r}, {abort_on_failure})",
            self.group.hooks_done(trigger, failure, abort_on_failure),
        )
        aborts = [a for a in actions if isinstance(a, AbortMembers)]
        if failed and abort_on_failure and trigger is Trigger.GROUP_DRAIN and before_release and not before:
            assert [set(a.members) for a in aborts] == ([live] if live else [])
            assert all(a.outcome is Outcome.ABORTED for a in aborts)
        else:
            assert aborts == [], aborts

    @precondition(lambda self: bool(self.can_end_group_hook()))
    @rule(data=st.data(), dice=DICE, abort_on_failure=st.booleans())
    def rule_group_hook_done(self, data: st.DataObject, dice: int, abort_on_failure: bool) -> None:
        trigger = data.draw(st.sampled_from(self.can_end_group_hook()), label="trigger")
        self.group_hook_done(trigger, dice == FAIL, abort_on_failure)

    @rule(dice=RARE)
    def rule_interrupt(self, dice: int) -> None:
        if dice != FAIL:
            return
        live = self.live()
        before = set(self.aborted)
        actions = self.feed("interrupt", self.group.interrupt("SIGTERM"))
        aborts = [a for a in actions if isinstance(a, AbortMembers)]
        if self.release is None and not before:  # the first abort before the release: every live member
            assert [set(a.members) for a in aborts] == ([live] if live else [])
            assert all(a.outcome is Outcome.INTERRUPTED for a in aborts)
        elif self.release is not None and self.undrain is None:  # only the members whose job runs
            late = {n for n in live if not self.sims[n].job_ended} - before
            assert [set(a.members) for a in aborts] == ([late] if late else [])
            assert all(a.outcome is Outcome.INTERRUPTED for a in aborts)
        else:
            assert aborts == [], aborts

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, RELEASE_S + 1.0]), dice=DICE)
    def rule_tick(self, dt: float, dice: int) -> None:
        self.clock.advance(HOLD_S + 1.0 if dice == FAIL else dt)  # rarely past the hold deadline at once
        self.tick()

    def tick(self) -> list[GroupAction]:
        now, live, before = self.clock.monotonic(), self.live(), set(self.aborted)
        holding = self.started_at is not None and self.drain is None and not self.aborted
        hold_over = holding and self.started_at is not None and now > self.started_at + HOLD_S
        draining = self.drain is not None and self.release is None and not self.aborted
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
        elif draining and aborts:  # none today; a deadline on the drain, aborting every member, may come
            assert [set(a.members) for a in aborts] == [live] and aborts[0].outcome is Outcome.ROLLED_BACK
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
                    self.stuck()
        assert self.group.done
        self.done_when_every_member_ended()

    def stuck(self) -> None:
        stuck = {s.name: (s.job, s.gate) for s in self.sims.values() if not s.ended}
        story = f"{stuck}\ninputs: {self.inputs}\nactions: {self.log}"
        held = [s.name for s in self.sims.values() if s.holds_drained and not s.told_undrain]
        if held:  # a member's run cannot return: its devices stay drained
            raise AssertionError(f"{held} wait for an undrain that never comes ({self.group.phase}): {story}")
        raise AssertionError(f"the group is stuck in {self.group.phase}: {story}")

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
        for trigger in self.can_end_group_hook():
            self.group_hook_done(trigger, False, True)
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


STATEFUL = settings(stateful_step_count=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestGroupStates = GroupStates.TestCase
TestGroupStates.settings = STATEFUL


# --- examples ---------------------------------------------------------------------------------------
def group_of(*names: str, clock: FakeClock | None = None) -> GroupMachine:
    return GroupMachine(names, clock or FakeClock(), hold_timeout_s=HOLD_S, release_timeout_s=RELEASE_S)


def phase(group: GroupMachine) -> GroupPhase:
    return group.phase  # read anew (not narrowed by an earlier assert)


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
    assert [type(a) for a in actions] == [Record, ReleaseMembers] and actions[1] == ReleaseMembers(("a", "b"))
    assert group.notice("a", Notice.JOB_ENDED) == []
    assert group.notice("b", Notice.JOB_ENDED) == []
    assert group.notice("a", Notice.SETTLED) == []
    actions = group.notice("b", Notice.SETTLED)
    assert [type(a) for a in actions] == [Record, UndrainMembers] and actions[1] == UndrainMembers(("a", "b"))
    assert group.ended("a", Outcome.SUCCEEDED, None) == []
    assert phase(group) is GroupPhase.UNDRAINING
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


# --- the orders that once hung a group --------------------------------------------------------------------
def test_the_last_member_passing_early_while_the_group_drains_releases_the_others() -> None:
    group = group_of("a", "b")
    started(group)
    group.notice("a", Notice.READY)
    assert of(group.notice("b", Notice.READY), DrainMembers) == [DrainMembers(("a", "b"))]
    group.notice("a", Notice.DRAINED)
    # QEMU switches b over at the floor while b's drain hooks still run: b never says DRAINED (its gate
    # passed early), and a is held at the floor until the group releases it.
    actions = group.notice("b", Notice.PASSED_EARLY, "nic0")
    assert of(actions, ReleaseMembers) == [ReleaseMembers(("a",))]


def test_the_group_drain_hooks_ending_last_release_and_undrain_the_group() -> None:
    group = GroupMachine(
        ("a", "b"),
        FakeClock(),
        hold_timeout_s=HOLD_S,
        release_timeout_s=RELEASE_S,
        drain_hooks=1,
        undrain_hooks=1,
    )
    started(group)
    actions = group.notice("a", Notice.PASSED_EARLY, "nic0")  # its device drains on its own events
    assert of(actions, DrainMembers) == [DrainMembers(("a", "b"))]
    assert of(actions, RunGroupHooks) == [RunGroupHooks(Trigger.GROUP_DRAIN)]
    group.notice("b", Notice.PASSED_EARLY, "nic0")  # so does b's, while the group drain hook runs
    for name in ("a", "b"):
        group.notice(name, Notice.JOB_ENDED)
        group.notice(name, Notice.SETTLED)  # its device runs again: held drained for the group's undrain
    actions = group.hooks_done(Trigger.GROUP_DRAIN, None, abort_on_failure=True)
    assert of(actions, ReleaseMembers) == [ReleaseMembers(())]
    # Nothing else will come: neither member's run returns before the group undrains it.
    assert of(actions, UndrainMembers) == [UndrainMembers(("a", "b"))]
    assert of(actions, RunGroupHooks) == [RunGroupHooks(Trigger.GROUP_UNDRAIN)]


def test_a_member_that_drained_on_its_own_during_an_abort_is_undrained() -> None:
    group = group_of("a", "b")
    started(group)
    actions = group.notice("a", Notice.ABORTING, "its before-drain hook failed")
    assert of(actions, AbortMembers) == [
        AbortMembers(("a", "b"), "a is aborting: its before-drain hook failed", Outcome.ROLLED_BACK)
    ]
    # Before b carries out that abort, QEMU switches b over at the floor: its device's prepare event
    # drains the device (MigrationMachine.on_vfio: no abort of its own yet), held for the group's undrain.
    group.notice("b", Notice.PASSED_EARLY, "nic0")
    group.notice("b", Notice.ABORTING, "the group's abort")  # its abort, too late
    group.notice("b", Notice.JOB_ENDED)
    group.notice("a", Notice.JOB_ENDED, JOB_FAILED)
    group.notice("a", Notice.SETTLED)
    group.ended("a", Outcome.ABORTED, "its before-drain hook failed")
    # b's device runs again on the destination: held drained until the group undrains it. Nothing else
    # can end b's run: the group must undrain it now.
    actions = group.notice("b", Notice.SETTLED)
    assert of(actions, UndrainMembers) == [UndrainMembers(("b",))]


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
    actions = group.notice("b", Notice.READY, "40 ms")  # held at the floor: b never drains by itself
    clock.advance(HOLD_S + RELEASE_S + 1.0)
    actions += group.tick()
    # Either a new word to b, or the group gives up: not wait forever.
    assert of(actions, DrainMembers) or of(actions, AbortMembers), actions
