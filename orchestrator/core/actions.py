"""What the phase machine decides, as values: the actions a driver carries out, the job's state, where
the VM runs, and the one function that decides a migration's outcome from the facts.

Shared by `orchestrator.core.phases` (one migration) and `orchestrator.core.group` (a switchover group),
which both answer their inputs with these actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orchestrator.core.hooks import Trigger
from orchestrator.core.report import Outcome


class JobState(StrEnum):
    """The libvirt job, as far as the migration knows."""

    NOT_STARTED = "not-started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Location(StrEnum):
    """Where the VM runs, asked of both hosts after the job."""

    SOURCE = "source"
    DESTINATION = "destination"
    BOTH = "both"
    NEITHER = "neither"


@dataclass(frozen=True)
class RunHooks:
    """Run the drain or undrain hooks of one device now."""

    trigger: Trigger
    device_id: str
    state: str  # the {state} placeholder: the device state that triggered it
    qom_path: str
    qemu_time: float | None  # QEMU's timestamp of that event, None when the orchestrator decided alone
    reason: str


@dataclass(frozen=True)
class AbortJob:
    """Abort the running libvirt job."""

    reason: str


@dataclass(frozen=True)
class SetDowntime:
    """Set QEMU's downtime limit."""

    ms: int
    why: str


@dataclass(frozen=True)
class Note:
    """A remark for the timeline, the report and the journal (only the timeline and the journal when
    the report says it anyway, as its error)."""

    text: str
    timeline_only: bool = False


class Notice(StrEnum):
    """What a member of a switchover group tells its group (see `orchestrator.core.group`)."""

    READY = "ready"  # QEMU would switch over within the downtime limit now: held at the gate
    UNREADY = "unready"  # no longer would (the guest dirtied faster)
    DRAINED = "drained"  # every covered device drained at the group's word: it may be released
    PASSED_EARLY = "passed-early"  # QEMU switched over at the floor (an idle guest): the group's moment
    ABORTING = "aborting"  # the member decided to abort (a hook, a timeout, a stall)
    JOB_ENDED = "job-ended"  # the libvirt job ended (detail: its error, empty when it succeeded)
    SETTLED = "settled"  # the job ended and every drained device runs again: held for the group's undrain


@dataclass(frozen=True)
class TellGroup:
    """Tell the member's switchover group something (only a grouped machine says this)."""

    notice: Notice
    detail: str = ""


Action = RunHooks | AbortJob | SetDowntime | Note | TellGroup


def decide_outcome(
    job: JobState, job_error: str | None, abort: tuple[str, Outcome] | None, location: Location | None
) -> tuple[Outcome, str | None]:
    """The outcome of a migration and its error, from the facts; the one place an outcome is decided.

    `abort` is the first abort decided (reason and the outcome it stands for); `location` is where the
    VM runs after the job (None when the job never started: then it is where it was).
    """
    reason = abort[0] if abort else None
    stopped = abort[1] if abort else Outcome.ROLLED_BACK
    if job is JobState.NOT_STARTED:
        return (stopped, reason) if abort else (Outcome.ROLLED_BACK, job_error)
    if location is Location.DESTINATION:
        if job is JobState.SUCCEEDED:
            if reason is not None:  # QEMU switched over before the abort reached it (e.g. prepare mode)
                return Outcome.SUCCEEDED, f"the abort came too late, the VM had switched over ({reason})"
            return Outcome.SUCCEEDED, None
        # libvirt reported a failure after the destination took over (its finish or confirm phase).
        return Outcome.SUCCEEDED, f"the VM runs on the destination, although libvirt said: {job_error}"
    if location is Location.SOURCE and job is JobState.FAILED:
        return stopped, reason or job_error
    where = {
        Location.SOURCE: "the job reported success but the VM runs on the source",
        Location.BOTH: "the VM runs on both hosts",
        Location.NEITHER: "the VM runs on neither host",
        None: "the job has not ended",
    }[location]
    detail = reason or job_error
    return Outcome.FAILED, f"{where}" + (f" ({detail})" if detail else "")
