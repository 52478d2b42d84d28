"""What the CLI prints: tables and JSON on stdout, and a migration's story on stderr as it happens.

Typed against the report classes, imported only for type checking: `orchestrator --help` must not pay
for importing the migration machinery. Output is plain text (no colour: it is often piped), and lines
carry syslog priorities when stderr goes to journald, so `journalctl -p err` finds the errors.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from orchestrator.core.group_report import GroupReport
    from orchestrator.core.records import MigrationRecord, MigrationRow
    from orchestrator.core.report import Progress, Report, TimelineEntry
    from orchestrator.flows.evacuation import EvacuationReport

PROGRESS_EVERY_S = 5.0  # a progress line this often when stderr is not a terminal


class Outlasting:
    """A text stream that outlasts its reader: a write or flush that fails because the terminal went
    away (EIO once an ssh session died, EPIPE once a reader closed) is dropped, as is everything after
    it, instead of ending the command in the middle of a migration (the journal keeps the story)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.gone: str | None = None  # why it stopped writing

    def write(self, text: str) -> int:
        if self.gone is None:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self.gone = exc.strerror or str(exc)
        return len(text)

    def flush(self) -> None:
        if self.gone is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self.gone = exc.strerror or str(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def outlast_the_terminal() -> None:
    """From now on, stdout and stderr outlive their reader (see `Outlasting`): what changes the world
    must finish, undrain and record whatever becomes of the terminal."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, Outlasting):
            setattr(sys, name, Outlasting(stream))


def emit_json(document: Any) -> None:
    """Write one JSON document to stdout."""
    import json

    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def table(headers: list[str], rows: list[list[str]], out: TextIO | None = None) -> None:
    """A plain aligned table (stdout unless `out`)."""
    out = out or sys.stdout
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n")


def priority(level: int) -> str:
    """A syslog priority prefix when stderr is connected to journald (systemd sets JOURNAL_STREAM),
    so `journalctl -p err` finds our errors; nothing on a terminal or in a pipe."""
    return f"<{level}>" if os.environ.get("JOURNAL_STREAM") else ""


def info(message: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    sys.stderr.write(priority(6) + message + "\n")
    sys.stderr.flush()


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def progress_text(progress: Progress) -> str:
    """A migration's progress in one line: how far, which pass, what is left, how fast it dirties."""
    parts = [f"{progress.fraction * 100:5.1f}%", f"{progress.elapsed_ms / 1000:.1f} s"]
    if progress.iteration:
        parts.append(f"pass {progress.iteration}")
    if progress.memory_total:
        parts.append(f"remaining {_mib(progress.memory_remaining)} of {_mib(progress.memory_total)}")
    if progress.dirty_rate_bps:
        parts.append(f"dirtying {_mib(progress.dirty_rate_bps)}/s")
    if progress.expected_downtime_ms is not None:
        parts.append(f"expected downtime {progress.expected_downtime_ms} ms")
    if progress.vfio_transferred:
        parts.append(f"vfio {_mib(progress.vfio_transferred)}")
    return "  ".join(parts)


class LiveMigration:
    """A migration told on stderr as it happens: its plan, then a line per event, decision, hook (with
    its result) and note, and its progress, redrawn in place on a terminal and a line every
    PROGRESS_EVERY_S otherwise (journald, Ansible, `| tee`). Thread-safe: lines come from libvirt's
    event thread, hook threads and the job's thread."""

    def __init__(self, out: TextIO | None = None, *, tty: bool | None = None, prefix: str = "") -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.prefix = prefix
        self._lock = threading.Lock()
        self._start: float | None = None
        self._bar = ""  # the progress bar shown on a terminal's last line
        self._last_progress = 0.0

    def plan(self, lines: Sequence[str]) -> None:
        """The plan, before anything is changed."""
        with self._lock:
            for line in lines:
                self._write(f"plan: {line}")

    def entry(self, entry: TimelineEntry) -> None:
        """One timeline entry, the moment it happens."""
        with self._lock:
            self._start = self._start or entry.at
            self._write(f"{entry.at - self._start:8.3f}s  {entry.host:<12} {entry.text}")

    def progress(self, progress: Progress) -> None:
        """The job's progress (called about ten times a second)."""
        with self._lock:
            text = progress_text(progress)
            if self.tty:
                width = 24
                done = int(progress.fraction * width)
                self._bar = f"[{'#' * done}{'.' * (width - done)}] {text}"
                self.out.write(f"\r{self.prefix}{self._bar}\033[K")
                self.out.flush()
            elif (now := time.monotonic()) - self._last_progress >= PROGRESS_EVERY_S:
                self._last_progress = now
                self._write(f"progress: {text}")

    def close(self) -> None:
        """Leave the terminal's last line clean."""
        with self._lock:
            if self.tty and self._bar:
                self.out.write("\r\033[K")
                self.out.flush()
            self._bar = ""

    def _write(self, line: str) -> None:
        if self.tty and self._bar:
            self.out.write("\r\033[K")  # the line replaces the bar, which is redrawn after it
        self.out.write(f"{priority(6)}{self.prefix}{line}\n")
        if self.tty and self._bar:
            self.out.write(f"{self.prefix}{self._bar}")
        self.out.flush()


class LiveEvacuation:
    """An evacuation told on stderr as it happens: the plan, a line per VM started and ended and per
    event of its migration (prefixed with the VM's name), and a status: redrawn in place on a
    terminal, a line every PROGRESS_EVERY_S otherwise."""

    def __init__(self, out: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._status = ""
        self._last_status = 0.0

    def line(self, text: str) -> None:
        """One line of the evacuation's story."""
        with self._lock:
            if self.tty and self._status:
                self.out.write("\r\033[K")
            self.out.write(f"{priority(6)}{text}\n")
            if self.tty and self._status:
                self.out.write(self._status)
            self.out.flush()

    def status(self, counts: dict[str, int], progress: dict[str, float]) -> None:
        """The counts of VMs done, running, queued and failed, and each running one's progress."""
        running = " ".join(f"{name} {fraction * 100:.0f}%" for name, fraction in sorted(progress.items()))
        text = (
            f"done {counts['done']}  running {counts['running']}  queued {counts['queued']}  "
            f"failed {counts['failed']}  {running}".rstrip()
        )
        with self._lock:
            if self.tty:
                self._status = text
                self.out.write(f"\r{text}\033[K")
                self.out.flush()
                return
            if (now := time.monotonic()) - self._last_status >= PROGRESS_EVERY_S:
                self._last_status = now
                self.out.write(f"{priority(6)}progress: {text}\n")
                self.out.flush()

    def close(self) -> None:
        """Leave the terminal's last line clean."""
        with self._lock:
            if self.tty and self._status:
                self.out.write("\r\033[K")
                self.out.flush()
            self._status = ""


def show_report(report: Report) -> None:
    """A migration's result on stdout: the plan (when nothing moved), devices, hooks, outcome.

    The timeline itself was told on stderr as it happened, and `orchestrator history ID` shows it again.
    """
    from orchestrator.core.report import hook_failure  # loaded already: `report` comes from there

    out = sys.stdout
    if report.plan and report.outcome.value in ("planned", "unchanged"):
        for line in report.plan:
            out.write(f"  {line}\n")
    if report.devices:
        rows = []
        for device in report.devices.values():
            started = report.started
            bound = {"at least": ">=", "at most": "<="}.get(device.quiet_bound or "", "")
            rows.append(
                [
                    device.device_id,
                    device.trigger or "-",
                    "failed" if device.drain_ok is False else _at(device.drain_finished, started),
                    _at(device.quiet_at, started),
                    "-" if device.lead_ms is None else f"{bound}{device.lead_ms:+.1f} ms",
                    "-" if device.drained_ms is None else f"{device.drained_ms:.0f} ms",
                    _at(device.undrain_finished, started),
                ]
            )
        out.write("\n")
        table(["DEVICE", "DRAINED BY", "DRAIN DONE", "QUIET AT", "LEAD", "DRAINED FOR", "UNDRAIN DONE"], rows)
        if any(d.lead_ms is not None for d in report.devices.values()):
            out.write(
                "(LEAD: how long before the device went quiet its drain had finished; >= and <= when QEMU "
                "sent no prepare event and the quiet time is bounded)\n"
            )
    if report.hooks:
        out.write("\n")
        table(
            ["HOOK", "DEVICE", "START", "DURATION", "RESULT"],
            [
                [
                    f"{hook.trigger} {hook.label}" + (" (armed process)" if hook.arming else ""),
                    hook.device_id or ("every device" if hook.arming else "-"),
                    _at(hook.started, report.started),
                    f"{hook.duration_ms:.0f} ms",
                    "ok" if hook.ok else (hook.error or "failed"),
                ]
                for hook in report.hooks
            ],
        )
    parts = [report.outcome.value, f"drain {report.drain_mode}"]
    if report.gate:
        parts.append(f"gate {report.gate}")
    if report.ended:
        parts.append(f"total {report.ended - report.started:.2f} s")
    if report.downtime_ms is not None:
        parts.append(f"downtime {report.downtime_ms} ms")
    if report.error:
        parts.append(report.error)
    out.write(f"\nmigration {report.migration_id} of {report.domain}: " + ", ".join(parts) + "\n")
    for hook in report.failed_hooks():
        out.write(f"failed: {hook_failure(hook)}\n")
    for note in report.notes:
        out.write(f"note: {note}\n")


def show_group(report: GroupReport) -> None:
    """A switchover group's result on stdout: one line per member, the group's steps and stall."""
    out = sys.stdout
    rows = []
    for member in report.members:
        r = member.report
        rows.append(
            [
                r.domain,
                r.outcome.value,
                r.destination,
                "-" if r.downtime_ms is None else f"{r.downtime_ms} ms",
                "-" if member.limit_ms is None else f"{member.limit_ms} ms",
                "-" if member.margin_ms is None else f"{member.margin_ms} ms",
                "-" if (lag := report.release_lag_ms(member)) is None else f"{lag:.0f} ms",
                r.migration_id,
            ]
        )
    out.write("\n")
    table(
        ["MEMBER", "OUTCOME", "DESTINATION", "DOWNTIME", "LIMIT", "MARGIN", "RELEASE LAG", "MIGRATION"], rows
    )
    for at, step, detail in report.steps:
        out.write(f"{_at(at, report.started)} {step}: {detail}\n")
    parts = [report.outcome.value, f"{len(report.members)} members"]
    if report.stall_ms is not None:
        parts.append(
            f"stall {report.stall_ms:.0f} ms (first device quiet or drained to the last running again)"
        )
    if report.ended:
        parts.append(f"total {report.ended - report.started:.2f} s")
    if report.error:
        parts.append(report.error)
    out.write(f"\ngroup {report.group_id} {report.name}: " + ", ".join(parts) + "\n")
    for note in report.notes:
        out.write(f"note: {note}\n")


def _where(report: Report) -> str:
    """Where the VM runs after the migration, in words (its URI for one host)."""
    location = report.location or "source"
    uri = {"source": report.source, "destination": report.destination}.get(location)
    return f"the {location} ({uri})" if uri else {"both": "both hosts"}.get(location, "neither host")


def _at(when: float | None, start: float) -> str:
    return "-" if when is None else f"+{when - start:.3f}s"


def failure_line(report: Report, journal: str | None = None) -> str | None:
    """The one line a failed migration leaves on stderr (what went wrong, what to do), None if it did not.

    `journal`: the journal's path when it is not the default one (the hint then names it)."""
    if int(report.exit_code) == 0:
        return None
    where = f" --journal '{journal}'" if journal else ""
    history = f"see: orchestrator history {report.migration_id}{where}"
    if report.undrain_failed:
        failed = [h for h in report.failed_hooks() if h.trigger == "undrain"]
        devices = ", ".join(sorted({h.device_id or "?" for h in failed}))
        why = failed[0].error if failed else "failed"
        return (
            f"{report.domain}: the undrain of {devices} failed ({why}): its workloads may still be "
            f"drained; restore them by hand, {history}"
        )
    if report.journal_error and report.outcome.value in ("succeeded", "unchanged", "planned"):
        outcome = report.outcome.value
        return f"{report.domain} {outcome}, but its record is not in the journal: {report.journal_error}"
    hints = {
        "rolled-back": f"{report.domain} still runs on {report.source}; {history}",
        "aborted": f"{report.domain} still runs on {report.source}, devices undrained; fix the hook, retry",
        "interrupted": f"{report.domain} runs on {_where(report)}; {history}",
        "failed": f"check where {report.domain} runs (virsh -c '{report.source}' list --all, and on "
        f"'{report.destination}'); {history}",
    }
    what = report.error or report.outcome.value
    return f"migration of {report.domain} {report.outcome.value}: {what}; " + hints.get(
        report.outcome.value, history
    )


def show_evacuation(report: EvacuationReport) -> None:
    """An evacuation's plan and the outcome per VM, as tables."""
    out = sys.stdout
    grouped = any(p.group for p in report.plan)  # a GROUP column only when a switchover group moves
    if report.plan:
        table(
            ["ORDER", "VM", "MIB", "DESTINATION", *(["GROUP"] if grouped else []), "WHY"],
            [
                [str(p.order), p.domain, str(p.memory_mib), p.destination]
                + ([p.group or ""] if grouped else [])
                + [p.reason]
                for p in report.plan
            ],
        )
    for u in report.unplaced:
        out.write(f"does not fit: {u.domain} ({u.memory_mib} MiB): {u.reason}\n")
    for unreachable in report.unreachable:
        out.write(f"unreachable: {unreachable['uri']}: {unreachable['error']}\n")
    for note in report.notes:
        out.write(f"note: {note}\n")
    if report.results:
        out.write("\n")
        table(
            ["VM", "DESTINATION", *(["GROUP"] if grouped else []), "OUTCOME", "SECONDS", "TRIES", "ERROR"],
            [
                [r.domain, r.destination]
                + ([r.group or ""] if grouped else [])
                + [r.outcome, f"{r.seconds:.1f}", str(r.attempts), r.error or ""]
                for r in sorted(report.results, key=lambda r: r.domain)
            ],
        )
    state = "empty" if report.empty else f"not empty: {', '.join(report.left)}"
    out.write(f"\nevacuation {report.evacuation_id}: {report.source} is {state}")
    out.write(f" ({report.message})\n" if report.message else "\n")


def evacuation_failure_line(report: EvacuationReport) -> str:
    """The one line an evacuation that did not empty its host leaves on stderr: what is left, and what
    would move it (a re-run only helps what a re-run can change)."""
    state = "interrupted" if report.interrupted else ("not empty: " + ", ".join(report.left))
    line = f"evacuation {report.evacuation_id} of {report.source}: {state}"
    if report.message:
        line += f"; {report.message}"
    refused = sorted(r.domain for r in report.results if r.outcome == "refused")
    failed = sorted(
        r.domain for r in report.results if r.outcome not in ("refused", "succeeded", "unchanged", "planned")
    )
    todo = []
    if refused:
        todo.append(f"fix what refused {', '.join(refused)} (the ERROR column), then re-run")
    if report.unplaced:
        todo.append("free memory on a destination or add one (--to), then re-run")
    if report.interrupted or failed:
        todo.append("re-run the same command to move the rest")
    return line + "; " + "; ".join(todo or ["see: orchestrator history " + report.evacuation_id])


def time_text(epoch: float) -> str:
    """Local time, to the second."""
    import datetime

    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def show_record(record: MigrationRecord, items: Sequence[MigrationRow] = ()) -> None:
    """One journaled migration: its line, then its timeline (events with their statuses, phases, device
    actions and hook runs) in time order; for an evacuation, first the migration of each of its VMs."""
    m = record.migration
    outcome = m.outcome.value if m.outcome else "running"
    recovered = f", recovered {time_text(m.recovered)}" if m.recovered else ""
    sys.stdout.write(
        f"migration {m.id} ({m.kind.value}{', of evacuation ' + m.parent if m.parent else ''}): {m.domain} "
        f"{m.source_uri} -> {m.destination_uri}, policy {m.policy}, drain {m.drain_mode or 'prepare'}, "
        f"{outcome}{recovered}" + (f": {m.error}" if m.error else "") + "\n\n"
    )
    if items:
        table(
            ["ID", "DOMAIN", "OUTCOME", "SECONDS", "DESTINATION", "ERROR"],
            [
                [
                    item.id,
                    item.domain,
                    item.outcome.value if item.outcome else "running",
                    f"{item.ended - item.started:.1f}" if item.ended else "-",
                    item.destination_uri,
                    item.error or "",
                ]
                for item in items
            ],
        )
        sys.stdout.write("\n(each one's timeline: orchestrator history ID)\n\n")
    rows: list[tuple[float, list[str]]] = []
    for event in record.events:
        when = event.qemu_time or event.received
        if event.kind.value == "vfio":
            what = f"{event.device_id} -> {event.state}"
        else:
            status = (event.data or {}).get("status") if isinstance(event.data, dict) else None
            what = f"{event.name} {status}" if status else event.name
        rows.append((when, [f"{when - m.started:.3f}s", event.host or "-", what]))
    for action in record.device_actions:
        text = f"{action.action.value} {action.device_id}: {action.status.value}"
        rows.append(
            (
                action.at,
                [
                    f"{action.at - m.started:.3f}s",
                    "orchestrator",
                    text + (f" ({action.detail})" if action.detail else ""),
                ],
            )
        )
    for run in record.hook_runs:
        status = "ok" if run.ok else (run.error or "failed")
        device = f" {run.device_id}" if run.device_id else ""
        label = f"hook {run.trigger}{device} {run.label} ({run.duration_ms or 0:.0f} ms, {status})"
        rows.append((run.started, [f"{run.started - m.started:.3f}s", "orchestrator", label]))
    table(["+TIME", "HOST", "WHAT"], [row for _t, row in sorted(rows, key=lambda r: r[0])])
