"""What a migration did, in the one vocabulary the migration, the journal, the CLI and Ansible share.

Pure records: no libvirt, no I/O. `Outcome` is the only outcome vocabulary of the project (the journal
stores its values, the CLI prints them, the Ansible modules read them back from `--json`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from orchestrator.core.errors import ExitCode

if TYPE_CHECKING:
    from orchestrator.core.hooks import HookResult
    from orchestrator.core.hypervisor import JobStats


class Outcome(StrEnum):
    """How a migration ended (`running` while it has not, in the journal)."""

    RUNNING = "running"  # journal only: not ended yet, or its process died before `recover` ran
    PLANNED = "planned"  # --dry-run: the pre-flight passed, nothing was changed
    UNCHANGED = "unchanged"  # already on the destination: nothing to do (Ansible's changed=false)
    SUCCEEDED = "succeeded"  # the VM runs on the destination
    ROLLED_BACK = "rolled-back"  # failed, cancelled or timed out; the VM runs on the source
    ABORTED = "aborted"  # a hook with on_failure=abort failed; the VM runs on the source
    INTERRUPTED = "interrupted"  # Ctrl-C/SIGTERM (or the process died); the VM runs where the journal says
    # The VM does not run where it should (e.g. shut off after its daemon died): an admin must look.
    FAILED = "failed"
    REFUSED = "refused"  # the pre-flight said no (bad input, events off, a job running): nothing was changed
    PARTIAL = "partial"  # an evacuation that left selected VMs on the source

    @property
    def moved(self) -> bool:
        """Whether the VM ended up on the destination because of this migration."""
        return self is Outcome.SUCCEEDED


EXIT_CODES: Mapping[Outcome, ExitCode] = {
    Outcome.RUNNING: ExitCode.ERROR,
    Outcome.PLANNED: ExitCode.OK,
    Outcome.UNCHANGED: ExitCode.OK,
    Outcome.SUCCEEDED: ExitCode.OK,
    Outcome.ROLLED_BACK: ExitCode.MIGRATION_FAILED,
    Outcome.ABORTED: ExitCode.HOOK_FAILED,
    Outcome.INTERRUPTED: ExitCode.INTERRUPTED,
    Outcome.FAILED: ExitCode.NEEDS_ADMIN,
    Outcome.REFUSED: ExitCode.BAD_INPUT,
    Outcome.PARTIAL: ExitCode.PARTIAL,
}


@dataclass(frozen=True)
class Progress:
    """What a progress line shows; `fraction` never goes backwards."""

    fraction: float = 0.0
    memory_processed: int = 0
    memory_total: int = 0
    memory_remaining: int = 0
    vfio_transferred: int = 0
    elapsed_ms: int = 0
    iteration: int = 0
    dirty_rate_bps: int = 0
    expected_downtime_ms: int | None = None

    def advance(self, stats: JobStats) -> Progress:
        """The progress after one more reading of the job's statistics."""
        total = stats.memory_total or self.memory_total
        if total and stats.memory_remaining is not None:
            fraction = 1.0 - stats.memory_remaining / total
        else:
            fraction = stats.memory_processed / total if total else 0.0
        return Progress(
            fraction=max(self.fraction, min(max(fraction, 0.0), 1.0)),
            memory_processed=max(self.memory_processed, stats.memory_processed),
            memory_total=total,
            memory_remaining=stats.memory_remaining or 0,
            vfio_transferred=max(self.vfio_transferred, stats.vfio_transferred),
            elapsed_ms=stats.elapsed_ms or self.elapsed_ms,
            iteration=stats.iteration,
            dirty_rate_bps=stats.dirty_rate_bps,
            expected_downtime_ms=stats.expected_downtime_ms,
        )


@dataclass(frozen=True)
class TimelineEntry:
    """One line of a migration's timeline: an event, a hook, a decision or a note, when and where."""

    at: float  # epoch seconds
    host: str  # "source" | "destination" | "orchestrator"
    kind: str  # "event" | "hook" | "decision" | "note"
    text: str

    def to_json(self, start: float) -> dict[str, Any]:
        """With the time since the migration started."""
        return {"t": round(self.at - start, 6), "host": self.host, "kind": self.kind, "text": self.text}


@dataclass
class DeviceRecord:
    """One device's drain, as the report, `--json` and the journal show it; only what happened.

    `quiet_at` is when the device stopped answering its peers, as well as the run knows it, and
    `quiet_bound` says how well: "exact" (QEMU's timestamp of its prepare event: the transition starts
    right after it), "at least" (QEMU < 11.0 sends no prepare: the latest event known to precede the
    transition, the previous device's P2P state or the gate's release; the lead is then at least the
    one shown) or "at most" (nothing known before it: its own first P2P state, when the transition had
    ended; the lead is then at most the one shown). A device with no drain hook reports no drain
    (`trigger` "observed only"); a failed drain reports no lead and no drained time.
    """

    device_id: str
    mode: str  # the policy's drain mode
    trigger: str = ""  # what drained it: "gate", "start", "prepare", "late", "prepare (gate passed early)"
    drain_started: float | None = None  # epoch seconds
    drain_finished: float | None = None  # every drain hook ended
    drain_ok: bool | None = None
    quiet_at: float | None = None
    quiet_bound: str | None = None  # "exact", "at least" or "at most" (see above)
    quiet_source: str | None = None  # the event `quiet_at` was taken from, in words
    undrain_started: float | None = None
    undrain_finished: float | None = None
    undrain_reason: str = ""
    late: bool = False
    running_at: float | None = None  # QEMU's time of the event that said it runs again (None: none came)

    @property
    def lead_ms(self) -> float | None:
        """The drain's lead: how long before the device went quiet its drain had finished (negative: it
        finished after; the device raced it). None without a successful drain."""
        if self.drain_finished is None or self.quiet_at is None or self.drain_ok is not True:
            return None
        return round((self.quiet_at - self.drain_finished) * 1000, 3)

    @property
    def drained_ms(self) -> float | None:
        """How long the device's workloads stayed drained (drain finished to undrain started); None
        when the drain failed or never ran."""
        if self.drain_finished is None or self.undrain_started is None or self.drain_ok is not True:
            return None
        return round((self.undrain_started - self.drain_finished) * 1000, 3)

    def to_json(self) -> dict[str, Any]:
        """One JSON object, with the derived lead and drained time."""
        return {**asdict(self), "lead_ms": self.lead_ms, "drained_ms": self.drained_ms}


@dataclass
class Report:
    """Everything a migration did; what `--json` prints and the journal's summary holds."""

    migration_id: str
    domain: str
    source: str
    destination: str
    policy: str
    drain_mode: str = "prepare"
    outcome: Outcome = Outcome.RUNNING
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    job_s: float | None = None
    downtime_ms: int | None = None
    gate: str | None = None  # gated mode: how the gate went ("opened", "passed early", "never opened")
    # Where the VM runs once the migration is over, as both hosts said: "source", "destination", "both",
    # "neither" (None: the run never got that far, e.g. a refusal; it runs where it ran)
    location: str | None = None
    timeline: list[TimelineEntry] = field(default_factory=list)
    hooks: list[HookResult] = field(default_factory=list)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    undrain_failed: bool = False
    journal_error: str | None = None  # a journal record that could not be written

    @property
    def changed(self) -> bool:
        """Whether the VM moved (Ansible's `changed`): only a successful migration changes anything."""
        return self.outcome.moved

    @property
    def exit_code(self) -> ExitCode:
        """The CLI's exit code for this report."""
        if self.undrain_failed:
            return ExitCode.NEEDS_ADMIN
        code = EXIT_CODES[self.outcome]
        if code is ExitCode.OK and self.journal_error:
            return ExitCode.ENVIRONMENT  # the journal's trouble (its run log keeps the record meanwhile)
        return code

    def failed_hooks(self) -> list[HookResult]:
        """The hook runs that failed, in order."""
        return [hook for hook in self.hooks if not hook.ok]

    def to_json(self) -> dict[str, Any]:
        """One JSON document."""
        return {
            "migration_id": self.migration_id,
            "domain": self.domain,
            "source": self.source,
            "destination": self.destination,
            "policy": self.policy,
            "drain_mode": self.drain_mode,
            "outcome": self.outcome.value,
            "changed": self.changed,
            "exit_code": int(self.exit_code),
            "error": self.error,
            "gate": self.gate,
            "location": self.location,
            "timings": {
                "total_s": round(self.ended - self.started, 3) if self.ended else None,
                "job_s": None if self.job_s is None else round(self.job_s, 3),
                "downtime_ms": self.downtime_ms,
            },
            "devices": {name: record.to_json() for name, record in self.devices.items()},
            "timeline": [entry.to_json(self.started) for entry in sorted(self.timeline, key=lambda e: e.at)],
            "hooks": [hook.to_json() for hook in self.hooks],
            "notes": self.notes,
            "plan": self.plan,
            "journal_error": self.journal_error,
        }


_TAIL_CHARS = 300  # of a failed hook's output, in its one line


def hook_failure(hook: HookResult) -> str:
    """One line for a failed hook: which, for what, why, and the end of what it printed."""
    device = f" for {hook.device_id}" if hook.device_id else ""
    tail = " | ".join(line.strip() for line in hook.output_tail.strip().splitlines()[-3:] if line.strip())
    if len(tail) > _TAIL_CHARS:
        tail = "..." + tail[-_TAIL_CHARS:]
    return f"{hook.trigger} hook {hook.label}{device}: {hook.error or 'failed'}" + (
        f"; its output: {tail}" if tail else "; it printed nothing"
    )
