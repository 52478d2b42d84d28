"""A migration's story as it happens: every record it writes to the journal, and the report's timeline,
notes and hook runs.

`Story` is the one writer of both for one migration, from any of its threads: the event thread, the
hook supervisor's and armed hooks' readers, the job's thread and the caller's. VFIO events that needed
no action can be deferred (see `defer`): they are recorded, oldest first, before whatever is recorded
next, or at the next poll.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.core.digest import sha256_hex
from orchestrator.core.hooks import HookResult
from orchestrator.core.hypervisor import Clock
from orchestrator.core.interfaces import JournalLike, RunLogLike
from orchestrator.core.phases import Phase
from orchestrator.core.report import Report, TimelineEntry
from orchestrator.core.request import Request
from orchestrator.core.vfio import Role, VfioEvent


class Story:
    """One migration's records: its journal entries and its report's timeline, notes and hooks."""

    def __init__(
        self,
        journal: JournalLike,
        report: Report,
        clock: Clock,
        on_entry: Callable[[TimelineEntry], None] | None = None,
    ) -> None:
        self.journal = journal
        self.report = report
        self.id = report.migration_id
        self.clock = clock
        self.on_entry = on_entry
        self._lock = threading.Lock()  # the report's lists, appended to from several threads
        # VFIO events that needed no action, recorded (journal, timeline) a little later: see `defer`
        self._deferred: collections.deque[VfioEvent] = collections.deque()
        self._bookkeeping = threading.Lock()  # one flush at a time, in order
        # Record `event` later (with whatever is recorded next, or at the next poll): on the event
        # thread this costs one append, so that the next device's event is not held up by records.
        self.defer: Callable[[VfioEvent], None] = self._deferred.append

    # --- the journal's migration record ----------------------------------------------------------
    def begin(
        self, request: Request, parent: str | None, supervisor: int | None, kind: str
    ) -> RunLogLike | None:
        """The migration's first record (its run log begins); that run log, if the journal keeps one.
        `supervisor`: the hook supervisor's process, which records each hook's start and end there."""
        policy = request.policy
        text = _policy_text(policy.path)
        self.journal.begin_migration(
            self.id,
            kind,
            request.domain,
            request.source_uri,
            request.destination_uri,
            str(policy.path) if policy.path else policy.name,
            self.report.started,
            parent=parent,
            drain_mode=request.switchover.drain.value,
            policy_text=text,
            policy_sha256=sha256_hex(text.encode()) if text is not None else None,
            supervisor=supervisor,
        )
        return self.journal.run_log(self.id)

    def finish(self, changed: bool | None, exit_code: int) -> None:
        """Record how the migration ended (the report's outcome, error, end and summary)."""
        report = self.report
        self.journal.finish_migration(
            self.id, report.outcome.value, changed, report.error, exit_code, report.ended, report.to_json()
        )

    def report_lost(self) -> None:
        """Put in the report the first record the journal could not write (or the import that failed)."""
        lost = self.journal.failures
        if lost:
            more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
            self.report.journal_error = lost[0] + more

    def device_action(self, device: str, action: str, status: str, detail: str | None = None) -> str | None:
        """Record a drain or undrain starting (durable before it returns) or ending; why it could not be
        written, if it could not."""
        return self.journal.record_device_action(self.id, device, action, status, self.clock.time(), detail)

    # --- what happened ----------------------------------------------------------------------------
    def phase(self, phase: Phase) -> None:
        """A phase change."""
        self.flush()
        at = self.clock.time()
        self.journal.record_phase(self.id, phase.value, at)
        if phase is not Phase.DONE:
            self.entry(at, "orchestrator", "phase", f"phase {phase.value}")

    def decision(self, text: str, *, journaled: bool = False) -> None:
        """A decision of the migration's, on the timeline (and, `journaled`, in the journal as a note)."""
        self.entry(self.clock.time(), "orchestrator", "decision", text)
        if journaled:
            self.journal.record_event(
                self.id, "orchestrator", None, "note", text, None, None, None, self.clock.time(), None
            )

    def hook(self, result: HookResult) -> None:
        """One hook run."""
        self.flush()
        self.journal.record_hook(self.id, result.to_json())
        self.entry(result.started, "orchestrator", "hook", _hook_text(result))
        with self._lock:
            self.report.hooks.append(result)

    def entry(self, at: float, host: str, kind: str, text: str) -> None:
        """One line of the timeline (after the deferred events)."""
        self.flush()
        self._timeline(at, host, kind, text)

    def _timeline(self, at: float, host: str, kind: str, text: str) -> None:
        entry = TimelineEntry(at, host, kind, text)
        with self._lock:
            self.report.timeline.append(entry)
        if self.on_entry is not None:
            self.on_entry(entry)

    def note(self, text: str, *, report: bool = True) -> None:
        """A note: on the timeline, in the journal, and (`report`) in the report's notes."""
        now = self.clock.time()
        if report:
            with self._lock:
                self.report.notes.append(text)
        self.entry(now, "orchestrator", "note", text)
        self.journal.record_event(self.id, "orchestrator", None, "note", text, None, None, None, now, None)

    def flush(self) -> None:
        """Record the deferred events, oldest first (any thread; cheap when there are none)."""
        if not self._deferred:
            return
        with self._bookkeeping:
            while self._deferred:
                self._vfio_now(self._deferred.popleft())

    def vfio(self, event: VfioEvent) -> None:
        """A VFIO device's migration event."""
        self.flush()
        self._vfio_now(event)

    def _vfio_now(self, event: VfioEvent) -> None:
        self.journal.record_event(
            self.id,
            event.host,
            event.role.value,
            "vfio",
            "VFIO_MIGRATION",
            event.device_id,
            str(event.state),
            event.qemu_time,
            event.received,
            {"qom_path": event.qom_path},
        )
        self._timeline(event.qemu_time, event.host, "event", f"{event.device_id} -> {event.state}")

    def qemu(
        self, host: str, role: Role, name: str, qemu_time: float, received: float, data: dict[str, Any] | None
    ) -> None:
        """A QEMU monitor event (MIGRATION, RESUME, STOP, ...)."""
        self.flush()
        self.journal.record_event(
            self.id, host, role.value, "qemu", name, None, None, qemu_time, received, data
        )
        status = (data or {}).get("status")
        self.entry(qemu_time, host, "event", f"{name} {status}" if status else name)


def _hook_text(result: HookResult) -> str:
    device = f" {result.device_id}" if result.device_id else " (armed process)" if result.arming else ""
    status = "ok" if result.ok else (result.error or "failed")
    return f"{result.trigger}{device}: {result.label} ({result.duration_ms:.0f} ms, {status})"


def _policy_text(path: Path | None) -> str | None:
    """The policy file's text, journaled so that `recover` runs the very hooks the migration used."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
