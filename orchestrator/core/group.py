"""A switchover group: several VMs migrated as one, their devices drained once, switched over together.

The VMs that carry RDMA devices usually serve one distributed job: when any one of them stops answering,
the whole job waits. `GroupMachine` decides, without any I/O, when a group of gated migrations (each a
`MigrationMachine` with `grouped=True`) starts its jobs, drains, releases and undrains:

    starting   every member passes its pre-flight, before hooks and arming; then every job starts
    holding    each job runs held at the gate (the downtime limit at its floor) and says when QEMU
               would converge; when every member would at once (or one switched over by itself)
    draining   every member drains its devices; when every member is drained
    released   every member's limit is raised at once: each QEMU switches over at its next check
    undraining when every member's job ended and its drained devices run again: every member undrains
    done       every member's run ended

Before the release, any member failing (refused, aborting, its job ending), a signal or the hold
deadline aborts every member, once: none has switched over, and the group is undrained once if its
drain had started. After the release a member that fails rolls back on its source alone; one that has
not switched over by the release deadline is aborted. The group is undrained exactly once, when every
member has settled or ended: a member holds its devices drained until then (their peers are the
other members' workloads).

The driver (`orchestrator.flows.group`) feeds inputs under one lock and carries out the actions after
releasing it, in the order they were decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator.core.actions import Note, Notice
from orchestrator.core.hooks import Trigger
from orchestrator.core.hypervisor import Clock
from orchestrator.core.report import Outcome

HOLD_TIMEOUT_S = 300.0  # how long members may be held before every one would converge at once
RELEASE_TIMEOUT_S = 30.0  # how long after the release a member may take to switch over
GROUP_DEVICE = "@group"  # the group's own hooks, as a device of the group's journal row


class GroupPhase(StrEnum):
    """Where a switchover group is."""

    STARTING = "starting"
    HOLDING = "holding"
    DRAINING = "draining"
    RELEASED = "released"
    ABORTING = "aborting"
    UNDRAINING = "undraining"
    DONE = "done"


# A member's outcomes that leave it where the group wants it.
_THERE = frozenset({Outcome.SUCCEEDED, Outcome.UNCHANGED})
# The phases before the release: a failure then aborts every member.
_BEFORE_RELEASE = frozenset({GroupPhase.STARTING, GroupPhase.HOLDING, GroupPhase.DRAINING})


@dataclass(frozen=True)
class Record:
    """A step of the group, recorded in its journal before the actions that follow it."""

    step: str  # "start", "drain", "release", "abort", "undrain"
    detail: str


@dataclass(frozen=True)
class StartJobs:
    """Let the members' jobs start (they wait at their start barrier)."""

    members: tuple[str, ...]


@dataclass(frozen=True)
class DrainMembers:
    """Drain every covered device of these members now."""

    members: tuple[str, ...]


@dataclass(frozen=True)
class ReleaseMembers:
    """Raise these members' downtime limits, all at once."""

    members: tuple[str, ...]


@dataclass(frozen=True)
class AbortMembers:
    """Abort these members' migrations."""

    members: tuple[str, ...]
    reason: str
    outcome: Outcome


@dataclass(frozen=True)
class UndrainMembers:
    """Undrain every device these members still hold drained."""

    members: tuple[str, ...]


@dataclass(frozen=True)
class RunGroupHooks:
    """Run the group's own drain or undrain hooks (once for the whole group)."""

    trigger: Trigger  # GROUP_DRAIN or GROUP_UNDRAIN


GroupAction = (
    Record | StartJobs | DrainMembers | ReleaseMembers | AbortMembers | UndrainMembers | RunGroupHooks | Note
)


@dataclass
class Member:
    """What the group knows of one member."""

    name: str
    arrived: bool = False  # at its start barrier: pre-flight, before hooks and arming passed
    ready: bool = False  # QEMU would converge now (held at the gate)
    drained: bool = False
    passed_early: bool = False  # switched over by itself, at the floor
    job_ended: bool = False
    job_error: str | None = None
    settled: bool = False  # job ended, drained devices run again: waiting for the group's undrain
    ended: bool = False  # its run returned
    outcome: Outcome | None = None
    aborted: bool = False  # the group told it to abort
    released_at: float | None = None
    notes: list[str] = field(default_factory=list)


class GroupMachine:
    """The decisions of one switchover group; not thread-safe (the driver holds its lock)."""

    def __init__(
        self,
        members: Sequence[str],
        clock: Clock,
        *,
        hold_timeout_s: float = HOLD_TIMEOUT_S,
        release_timeout_s: float = RELEASE_TIMEOUT_S,
        drain_hooks: int = 0,
        undrain_hooks: int = 0,
    ) -> None:
        """`drain_hooks`, `undrain_hooks`: how many group-drain and group-undrain hooks the policy has;
        each reports back through `hooks_done`."""
        if len(members) < 2:
            raise ValueError("a switchover group has at least two members")
        if len(set(members)) != len(members):
            raise ValueError("a switchover group names each member once")
        self.members = {name: Member(name) for name in members}
        self.clock = clock
        self.hold_timeout_s = hold_timeout_s
        self.release_timeout_s = release_timeout_s
        self.phase = GroupPhase.STARTING
        self.abort: tuple[str, Outcome] | None = None  # the first abort decided before the release
        self.abort_by: str | None = None  # the member whose failure made it, if one did
        self.drain_started: float | None = None  # epoch seconds
        self.released: float | None = None
        self.undrained: float | None = None
        self._hold_deadline: float | None = None  # monotonic
        self._release_deadline: float | None = None
        self._drain_deadline: float | None = None  # a backstop: drain hooks end by their own deadlines
        self._hooks = {Trigger.GROUP_DRAIN: drain_hooks, Trigger.GROUP_UNDRAIN: undrain_hooks}
        self._running = {Trigger.GROUP_DRAIN: 0, Trigger.GROUP_UNDRAIN: 0}  # group hooks not yet ended
        self._undrain_hooks_due = False  # the undrain was decided while the group drain hooks ran
        self.hooks_failed: list[str] = []

    # --- facts ------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase is GroupPhase.DONE

    def hooks_running(self) -> bool:
        """Whether a group hook still runs (or one is due to start)."""
        return any(self._running.values()) or self._undrain_hooks_due

    def may_start(self, name: str) -> bool | None:
        """A member at its start barrier: True to start its job, False to give up (the group aborts),
        None to keep waiting."""
        if self.abort is not None or self.members[name].aborted:
            return False
        return True if self.phase is not GroupPhase.STARTING else None

    def outcome(self) -> tuple[Outcome, str | None]:
        """The group's outcome once done: succeeded (every member moved), partial (some did), else
        the reason every member stayed."""
        moved = [m.name for m in self.members.values() if m.outcome is Outcome.SUCCEEDED]
        stayed = [m for m in self.members.values() if m.outcome not in _THERE]
        if not stayed:
            return (Outcome.SUCCEEDED, None) if moved else (Outcome.UNCHANGED, None)
        why = "; ".join(f"{m.name}: {m.outcome.value if m.outcome else 'not ended'}" for m in stayed)
        if moved:
            return Outcome.PARTIAL, f"{', '.join(moved)} moved, the others did not ({why})"
        if self.abort is not None:
            by = self.members[self.abort_by].outcome if self.abort_by else None
            if by in (Outcome.ABORTED, Outcome.REFUSED, Outcome.FAILED, Outcome.INTERRUPTED):
                return by, self.abort[0]  # e.g. a member's drain hook failed: the group was aborted
            return self.abort[1], self.abort[0]
        if all(m.outcome is Outcome.REFUSED for m in stayed):
            return Outcome.REFUSED, why
        worst = Outcome.FAILED if any(m.outcome is Outcome.FAILED for m in stayed) else Outcome.ROLLED_BACK
        return worst, why

    # --- inputs -----------------------------------------------------------------------------------
    def arrived(self, name: str) -> list[GroupAction]:
        """A member passed its pre-flight, before hooks and arming: it waits to start its job."""
        self.members[name].arrived = True
        return self._maybe_start()

    def _maybe_start(self) -> list[GroupAction]:
        """Every member arrived (one already on its destination is no member any more): start the jobs."""
        if self.phase is not GroupPhase.STARTING:
            return []
        if not all(m.arrived or m.outcome is Outcome.UNCHANGED for m in self.members.values()):
            return []
        names = tuple(m.name for m in self.members.values() if m.arrived)
        if not names:
            return []
        self.phase = GroupPhase.HOLDING
        self._hold_deadline = self.clock.monotonic() + self.hold_timeout_s
        return [Record("start", f"{len(names)} members ready to start: {', '.join(names)}"), StartJobs(names)]

    def notice(self, name: str, notice: Notice, detail: str = "") -> list[GroupAction]:
        """What a member's machine told the group (`TellGroup`)."""
        member = self.members[name]
        if notice is Notice.READY or notice is Notice.UNREADY:
            member.ready = notice is Notice.READY
            return self._maybe_drain(
                f"every member would switch over within its limit ({name} last: {detail})"
            )
        if notice is Notice.PASSED_EARLY:
            member.passed_early = True
            # It may be the last one the release waited for, too.
            why = f"{name} switched over at the floor (its device {detail} quiesced)"
            return self._maybe_drain(why) + self._maybe_release()
        if notice is Notice.DRAINED:
            member.drained = True
            return self._maybe_release()
        if notice is Notice.ABORTING:
            return self._failed(name, f"{name} is aborting: {detail}")
        if notice is Notice.JOB_ENDED:
            member.job_ended, member.job_error = True, detail or None
            if detail:
                return self._failed(name, f"the migration of {name} failed: {detail}")
            if self.phase in (GroupPhase.HOLDING, GroupPhase.DRAINING) and not member.passed_early:
                member.passed_early = True  # no device said so (none covered): it went over by itself
                return self._maybe_drain(f"{name} switched over at the floor") + self._maybe_release()
            return self._maybe_undrain()
        if notice is Notice.SETTLED:
            member.settled = True
            return self._maybe_undrain()
        raise ValueError(f"unknown notice {notice!r}")

    def ended(self, name: str, outcome: Outcome, error: str | None) -> list[GroupAction]:
        """A member's run returned (its report's outcome)."""
        member = self.members[name]
        member.ended, member.outcome = True, outcome
        actions: list[GroupAction] = []
        if outcome is Outcome.UNCHANGED and not member.arrived:  # already on its destination: not moved
            actions += self._maybe_start()
        elif outcome is not Outcome.SUCCEEDED:
            actions += self._failed(name, f"{name} {outcome.value}" + (f": {error}" if error else ""))
        elif self.phase is GroupPhase.HOLDING:  # it went over by itself, and nothing told the group
            member.passed_early = True
            actions += self._maybe_drain(f"{name} switched over at the floor")
        actions += self._maybe_release() + self._maybe_undrain()
        self._check_done()
        return actions

    def hooks_done(self, trigger: Trigger, failure: str | None, abort_on_failure: bool) -> list[GroupAction]:
        """One of the group's own hooks ended; `failure` says why it failed (None: it did not)."""
        self._running[trigger] -= 1
        actions: list[GroupAction] = []
        if failure is not None:
            self.hooks_failed.append(failure)
            if trigger is Trigger.GROUP_DRAIN and abort_on_failure and self.phase in _BEFORE_RELEASE:
                actions += self._abort_all(failure, Outcome.ABORTED)
        if trigger is Trigger.GROUP_DRAIN and self._running[trigger] == 0:
            actions += self._maybe_release()
            if self._undrain_hooks_due:  # never restore the job before its drain ended
                self._undrain_hooks_due = False
                actions += self._start_hooks(Trigger.GROUP_UNDRAIN)
        self._check_done()
        return actions

    def interrupt(self, reason: str) -> list[GroupAction]:
        """A signal: abort every member that has not switched over (after the release: whose job runs)."""
        if self.phase in _BEFORE_RELEASE:
            return self._abort_all(reason, Outcome.INTERRUPTED)
        if self.phase is GroupPhase.RELEASED:
            late = tuple(m.name for m in self._live() if not m.job_ended and not m.aborted)
            return self._abort(late, reason, Outcome.INTERRUPTED)
        return []

    def tick(self) -> list[GroupAction]:
        """The deadlines: the hold's (every member would converge at once) and the release's."""
        now = self.clock.monotonic()
        if self.phase is GroupPhase.HOLDING and self._hold_deadline is not None and now > self._hold_deadline:
            waiting = [m.name for m in self._live() if not m.ready]
            return self._abort_all(
                f"the group's hold timeout of {self.hold_timeout_s:g} s passed: "
                f"{', '.join(waiting) or 'a member'} would not switch over within its limit",
                Outcome.ROLLED_BACK,
            )
        if (
            self.phase is GroupPhase.DRAINING
            and self._drain_deadline is not None
            and now > self._drain_deadline
        ):
            waiting = [m.name for m in self._live() if not (m.drained or m.passed_early or m.job_ended)]
            return self._abort_all(
                f"the group's drain did not end within {self.hold_timeout_s:g} s "
                f"({', '.join(waiting) or 'the group drain hooks'} not drained)",
                Outcome.ROLLED_BACK,
            )
        if (
            self.phase is GroupPhase.RELEASED
            and self._release_deadline is not None
            and now > self._release_deadline
        ):
            self._release_deadline = None
            late = tuple(m.name for m in self._live() if not m.job_ended and not m.aborted)
            return self._abort(
                late,
                f"not switched over {self.release_timeout_s:g} s after the group's release",
                Outcome.ROLLED_BACK,
            )
        return []

    # --- internals ------------------------------------------------------------------------------
    def _live(self) -> list[Member]:
        return [m for m in self.members.values() if not m.ended]

    def _maybe_drain(self, why: str) -> list[GroupAction]:
        if self.phase is not GroupPhase.HOLDING:
            return []
        live = self._live()
        early = any(m.passed_early for m in self.members.values())
        if not early and not (live and all(m.ready and not m.job_ended for m in live)):
            return []
        self.phase = GroupPhase.DRAINING
        self.drain_started = self.clock.time()
        self._drain_deadline = self.clock.monotonic() + self.hold_timeout_s
        names = tuple(m.name for m in live)
        return [
            Record("drain", why or "every member would switch over"),
            DrainMembers(names),
            *self._start_hooks(Trigger.GROUP_DRAIN),
        ]

    def _maybe_release(self) -> list[GroupAction]:
        if self.phase is not GroupPhase.DRAINING or self._running[Trigger.GROUP_DRAIN]:
            return []
        live = self._live()
        if not all(m.drained or m.passed_early or m.job_ended for m in live):
            return []
        self.phase = GroupPhase.RELEASED
        self.released = self.clock.time()
        self._release_deadline = self.clock.monotonic() + self.release_timeout_s
        names = tuple(m.name for m in live if not m.passed_early and not m.job_ended)
        for m in live:
            m.released_at = self.released
        return [
            Record("release", f"every member drained: releasing {', '.join(names) or 'none'}"),
            ReleaseMembers(names),
            *self._maybe_undrain(),  # every member may have settled already (all passed early)
        ]

    def _maybe_undrain(self) -> list[GroupAction]:
        # Something may be drained once the group drained, or a member passed its gate early (its own
        # events drained it), even while the group was aborting.
        maybe_drained = self.drain_started is not None or any(m.passed_early for m in self.members.values())
        if not maybe_drained or self.undrained is not None:
            return []
        if self.phase in (GroupPhase.HOLDING, GroupPhase.DRAINING, GroupPhase.STARTING):
            return []  # before the release only an abort ends the drain (then the phase is ABORTING)
        if not all(m.settled or m.ended for m in self.members.values()):
            return []
        self.undrained = self.clock.time()
        self.phase = GroupPhase.UNDRAINING
        names = tuple(m.name for m in self._live())
        actions: list[GroupAction] = [
            Record("undrain", "every member's devices run again (or its job ended)"),
            UndrainMembers(names),  # none when every member ended: the group's own hooks may still run
        ]
        if self._running[Trigger.GROUP_DRAIN]:
            self._undrain_hooks_due = bool(self._hooks[Trigger.GROUP_UNDRAIN])
            return actions
        return actions + self._start_hooks(Trigger.GROUP_UNDRAIN)

    def _start_hooks(self, trigger: Trigger) -> list[GroupAction]:
        if not self._hooks[trigger]:
            return []
        self._running[trigger] = self._hooks[trigger]
        return [RunGroupHooks(trigger)]

    def _check_done(self) -> None:
        if all(m.ended for m in self.members.values()) and not self.hooks_running():
            self.phase = GroupPhase.DONE

    def _failed(self, name: str, why: str) -> list[GroupAction]:
        """A member failed: before the release every member aborts; after it, it rolls back alone."""
        if self.phase in _BEFORE_RELEASE:
            return self._abort_all(why, Outcome.ROLLED_BACK, by=name)
        if self.phase is GroupPhase.RELEASED:
            return [Note(f"after the release: {why}"), *self._maybe_undrain()]
        return self._maybe_undrain()

    def _abort_all(self, reason: str, outcome: Outcome, *, by: str | None = None) -> list[GroupAction]:
        if self.abort is None:
            self.abort, self.abort_by = (reason, outcome), by
        self.phase = GroupPhase.ABORTING
        names = tuple(m.name for m in self._live() if not m.aborted)
        actions = self._abort(names, reason, outcome)
        return [Record("abort", reason), *actions, *self._maybe_undrain()]

    def _abort(self, names: tuple[str, ...], reason: str, outcome: Outcome) -> list[GroupAction]:
        names = tuple(n for n in names if not self.members[n].aborted)
        for n in names:
            self.members[n].aborted = True
        return [AbortMembers(names, reason, outcome)] if names else []
