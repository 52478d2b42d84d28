"""What a switchover group did: its steps, its stall, and each member's migration (`Report`).

The group's stall is what the distributed job saw: from the first member's device going quiet (or the
group's drain, if earlier: drained workloads are stalled too) to the last device whose workloads run
again (its undrain ended, or it ran again undrained). Each member shows its downtime, the limit it was
released with, the margin between the two, and its release lag (release to its first device quiet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.core.errors import ExitCode
from orchestrator.core.hooks import HookResult
from orchestrator.core.report import EXIT_CODES, Outcome, Report


@dataclass
class GroupMember:
    """One member's line in the group's report."""

    report: Report
    limit_ms: int | None = None  # its downtime limit when released (None: never released)

    @property
    def released_quiet_at(self) -> float | None:
        """When its first device went quiet (QEMU's time), None if none did."""
        times = [d.quiet_at for d in self.report.devices.values() if d.quiet_at is not None]
        return min(times) if times else None

    @property
    def margin_ms(self) -> int | None:
        """Its limit minus its downtime: how far inside its limit it switched over."""
        if self.limit_ms is None or self.report.downtime_ms is None:
            return None
        return self.limit_ms - self.report.downtime_ms


@dataclass
class GroupReport:
    """Everything a switchover group did; what `--json` prints and the journal's summary holds."""

    group_id: str
    name: str
    policy: str
    outcome: Outcome = Outcome.RUNNING
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0
    drain_started: float | None = None  # epoch seconds: the group's drain decided
    released: float | None = None  # every member drained, every limit raised
    undrained: float | None = None  # the group's undrain decided
    members: list[GroupMember] = field(default_factory=list)
    steps: list[tuple[float, str, str]] = field(default_factory=list)  # (at, step, detail)
    notes: list[str] = field(default_factory=list)
    hooks: list[HookResult] = field(default_factory=list)  # the group's own (group-drain, group-undrain)
    dry_run: bool = False
    undrain_failed: bool = False  # a group-undrain hook failed: the job's workloads may still be drained

    @property
    def exit_code(self) -> ExitCode:
        """The outcome's, unless a workload may still be drained (an undrain failed): then 9."""
        if self.undrain_failed or any(m.report.undrain_failed for m in self.members):
            return ExitCode.NEEDS_ADMIN
        return EXIT_CODES[self.outcome]

    @property
    def changed(self) -> bool:
        return any(m.report.changed for m in self.members)

    def stall(self) -> tuple[float, float] | None:
        """The job's stall window (epoch seconds), None when nothing was drained or went quiet."""
        starts = [d.quiet_at for m in self.members for d in m.report.devices.values() if d.quiet_at]
        if self.drain_started is not None:
            starts.append(self.drain_started)
        ends = [
            end
            for m in self.members
            for d in m.report.devices.values()
            if (end := d.undrain_finished or d.running_at) is not None
        ]
        if not starts or not ends:
            return None
        return min(starts), max(ends)

    @property
    def stall_ms(self) -> float | None:
        window = self.stall()
        return None if window is None else round((window[1] - window[0]) * 1000, 3)

    def release_lag_ms(self, member: GroupMember) -> float | None:
        """From the release to the member's first device going quiet."""
        quiet = member.released_quiet_at
        if self.released is None or quiet is None:
            return None
        return round((quiet - self.released) * 1000, 3)

    def to_json(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "group": self.name,
            "policy": self.policy,
            "outcome": self.outcome.value,
            "changed": self.changed,
            "exit_code": int(self.exit_code),
            "error": self.error,
            "dry_run": self.dry_run,
            "undrain_failed": self.undrain_failed,
            "started": self.started,
            "ended": self.ended,
            "drain_started": self.drain_started,
            "released": self.released,
            "undrained": self.undrained,
            "stall_ms": self.stall_ms,
            "steps": [{"at": at, "step": step, "detail": detail} for at, step, detail in self.steps],
            "notes": list(self.notes),
            "hooks": [hook.to_json() for hook in self.hooks],
            "members": [
                {
                    **m.report.to_json(),
                    "limit_ms": m.limit_ms,
                    "margin_ms": m.margin_ms,
                    "release_lag_ms": self.release_lag_ms(m),
                }
                for m in self.members
            ],
        }
