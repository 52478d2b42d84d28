"""The convergence schedule: when QEMU may switch over, as data read by small pure functions.

Like Nova's downtime steps and VDSM's convergence schedule. QEMU switches over when the data still to
send fits in (bandwidth x downtime limit), so the downtime limit is the orchestrator's lever on *when*:
held at its floor, QEMU keeps iterating in pre-copy; raised, it stops the vCPUs at its next check.
The policy's `switchover.steps` say which limit applies from when (after N seconds or N passes); the
stall detector ends a migration whose remaining data stopped shrinking; `would_converge` reads QEMU's
own estimate to tell when a gated migration may be released. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.core.hypervisor import JobStats
from orchestrator.core.policy import DowntimeStep, MigrationSettings, Switchover

# The gate: the lowest downtime limit. Not 0, although libvirt passes 0 on and QEMU takes it: with a
# threshold of 0 QEMU never computes the exact pending size (it does so only below the threshold), and
# its shortcut "nothing pending" then fires on the stale estimate at the end of every pass, so a guest
# dirtying memory fast switched over after its first pass. At 1 ms a guest that
# dirties anything is held; an idle one (nothing dirtied at all) still converges: the gate is passed early.
GATE_FLOOR_MS = 1
QEMU_DEFAULT_DOWNTIME_MS = 300  # QEMU's own default downtime-limit
FIRST_ESTIMATE_PASS = 3  # libvirt's memory_iteration from which QEMU's expected downtime is its own


@dataclass(frozen=True)
class Schedule:
    """The downtime limits of one migration and when each applies; never empty."""

    steps: tuple[DowntimeStep, ...]
    stall_timeout_s: float | None = None
    completion_timeout_s: float | None = None

    @classmethod
    def of(cls, switchover: Switchover, settings: MigrationSettings) -> Schedule:
        """The schedule of a policy with its CLI overrides.

        `settings.max_downtime_ms` caps every step (a `--max-downtime` below the policy's steps clips
        them); no steps means one, at that cap or at QEMU's default 300 ms.
        """
        cap = settings.max_downtime_ms
        steps = switchover.steps or (DowntimeStep(cap or QEMU_DEFAULT_DOWNTIME_MS),)
        if cap:
            clipped: list[DowntimeStep] = []
            for step in steps:
                capped = replace(step, downtime_ms=min(step.downtime_ms, cap))
                if not clipped or capped.downtime_ms > clipped[-1].downtime_ms:
                    clipped.append(capped)
            steps = tuple(clipped)
        return cls(steps, switchover.stall_timeout_s, settings.completion_timeout_s)

    def step_at(self, elapsed_s: float, iteration: int) -> int:
        """The index of the step in force after `elapsed_s` seconds of the job and `iteration` passes."""
        index = 0
        for number, step in enumerate(self.steps[1:], 1):
            by_time = step.after_s is not None and elapsed_s >= step.after_s
            by_passes = step.after_iterations is not None and iteration >= step.after_iterations
            if by_time or by_passes:
                index = number
        return index

    def describe(self, index: int) -> str:
        """A step in words, for the timeline."""
        step = self.steps[index]
        when = []
        if step.after_s is not None:
            when.append(f"after {step.after_s:g} s")
        if step.after_iterations is not None:
            when.append(f"after {step.after_iterations} passes")
        return f"step {index + 1}/{len(self.steps)}" + (f" ({' or '.join(when)})" if when else "")


def would_converge(stats: JobStats, downtime_ms: int) -> bool:
    """Whether QEMU would switch over now if its downtime limit were `downtime_ms`.

    QEMU's expected downtime (the data dirtied during its last pass over the bandwidth) is its own
    estimate from the third dirty-bitmap sync on; until then it echoes the limit, whatever the guest
    dirties.
    """
    return (
        stats.iteration >= FIRST_ESTIMATE_PASS
        and stats.expected_downtime_ms is not None
        and stats.expected_downtime_ms <= downtime_ms
    )


STALL_PROGRESS = 0.9  # progress: what is left after a pass falls below 90% of its lowest so far


@dataclass
class StallDetector:
    """A migration whose data left after each pass stopped shrinking (Nova's progress timeout, VDSM's
    stalling).

    What is left after a pass is what the guest dirtied during it: QEMU's expected downtime (that over
    the bandwidth) measures it from the second pass on. Within a pass the remaining data only falls,
    so sampling it would see progress where there is none. Progress is a new low, 10% under the old.
    """

    timeout_s: float
    lowest: float | None = None
    since: float | None = None  # when the lowest was seen (job seconds)

    def stalled(self, elapsed_s: float, stats: JobStats) -> bool:
        """Feed one reading; True once no progress came for `timeout_s` seconds."""
        if self.since is None:
            self.since = elapsed_s  # the first pass is progress by itself
        left = stats.expected_downtime_ms if stats.iteration >= FIRST_ESTIMATE_PASS else None
        if left is not None and (self.lowest is None or left < self.lowest * STALL_PROGRESS):
            self.lowest, self.since = left, elapsed_s
            return False
        return elapsed_s - self.since > self.timeout_s
