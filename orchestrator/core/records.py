"""The journal's vocabulary: what a migration's records are, as `history` and `recover` read them.

Rows are built from SQLite rows (`of`), whose columns carry the fields' names; a run log not yet
imported is read through the very same rows (the journal imports it into memory first), so there is
one conversion of each kind.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any, Final, TypeVar

from orchestrator.core.report import Outcome


class MigrationKind(StrEnum):
    """What a migrations row records."""

    MIGRATE = "migrate"  # one `orchestrator migrate`
    EVACUATE_ITEM = "evacuate-item"  # one VM of an evacuation; `parent` is the evacuation's id
    EVACUATION = "evacuation"  # one `orchestrator evacuate`: its items point to it (domain: the selection)
    GROUP = "group"  # one switchover group: its members point to it (domain: the group's name)
    GROUP_MEMBER = "group-member"  # one VM of a switchover group; `parent` is the group's id


class EventKind(StrEnum):
    """What an events row records."""

    VFIO = "vfio"  # a VFIO_MIGRATION event
    QEMU = "qemu"  # another QEMU monitor event
    NOTE = "note"  # the orchestrator's own remark (an unexpected transition, a decision, a phase)


class DeviceAction(StrEnum):
    """What a device_actions row records: a drain or an undrain of one device."""

    DRAIN = "drain"
    UNDRAIN = "undrain"


class ActionStatus(StrEnum):
    """A device action's progress. `starting` is written before any of its hooks starts; `done` and
    `failed` once every hook has ended; `ended` is recover's word for an undrain whose hooks ran to
    their end after the orchestrator died (the supervisor recorded it). `spawned` is only read: older
    orchestrators wrote it once an undrain's hooks had all started."""

    STARTING = "starting"
    SPAWNED = "spawned"
    DONE = "done"
    FAILED = "failed"
    ENDED = "ended"


ENDS: Final = frozenset({ActionStatus.DONE, ActionStatus.FAILED, ActionStatus.ENDED})
_Row = TypeVar("_Row")


def _of(cls: type[_Row], row: sqlite3.Row, **converted: Any) -> _Row:
    """A row object from an SQLite row: each field from the column of its name (None when an older
    schema has no such column), or from `converted`."""
    names = set(row.keys())
    values = {
        f.name: converted[f.name] if f.name in converted else row[f.name] if f.name in names else None
        for f in fields(cls)  # type: ignore[arg-type]
    }
    return cls(**values)


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class MigrationRow:
    """One migrations row: what was migrated, where, and how it ended."""

    id: str
    kind: MigrationKind
    domain: str
    source_uri: str
    destination_uri: str
    policy: str
    started: float
    ended: float | None
    outcome: Outcome | None
    changed: bool | None
    error: str | None
    exit_code: int | None
    summary: Any  # the report as `--json` printed it, None until the migration ended
    parent: str | None  # the evacuation this is one item of
    pid: int  # the orchestrator process that recorded it
    host: str  # ... and its host name
    drain_mode: str | None = None
    policy_sha256: str | None = None
    policy_text: str | None = None  # the policy file as the migration began (what `recover` runs)
    phase: str | None = None  # the last phase the migration entered
    recovered: float | None = None  # when `recover` finished what its process left undone

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end, None while running."""
        return None if self.ended is None else self.ended - self.started

    def to_json(self) -> dict[str, object]:
        """The row as one JSON object (without the policy's text)."""
        doc: dict[str, object] = asdict(self)
        del doc["policy_text"]
        return {**doc, "duration_s": self.duration_s}

    @classmethod
    def of(cls, row: sqlite3.Row) -> MigrationRow:
        """From an SQLite row."""
        return _of(
            cls,
            row,
            kind=MigrationKind(row["kind"]),
            outcome=None if row["outcome"] is None else Outcome(row["outcome"]),
            changed=None if row["changed"] is None else bool(row["changed"]),
            summary=_from_json(row["summary"]),
        )


@dataclass(frozen=True)
class EventRow:
    """One recorded event or note, in the migration's sequence."""

    seq: int
    host: str
    role: str | None  # 'source' or 'destination'; None for a note about the whole migration
    kind: EventKind
    name: str  # the QEMU event's name, or the note's text
    device_id: str | None
    state: str | None
    qemu_time: float | None
    received: float
    data: Any

    def to_json(self) -> dict[str, object]:
        """The event as one JSON object."""
        return asdict(self)

    @classmethod
    def of(cls, row: sqlite3.Row) -> EventRow:
        """From an SQLite row."""
        return _of(cls, row, kind=EventKind(row["kind"]), data=_from_json(row["data"]))


@dataclass(frozen=True)
class HookRunRow:
    """One recorded hook run, in the migration's sequence."""

    seq: int
    trigger: str
    device_id: str | None
    label: str
    argv: tuple[str, ...]
    attempt: int
    started: float
    ended: float | None
    duration_ms: float | None
    exit_code: int | None
    timed_out: bool
    error: str | None
    output_tail: str | None

    @property
    def ok(self) -> bool:
        """True if the hook exited with status 0 before its deadline (as HookResult.ok)."""
        return self.error is None and self.exit_code == 0 and not self.timed_out

    def to_json(self) -> dict[str, object]:
        """The hook run as one JSON object."""
        return {**asdict(self), "argv": list(self.argv), "ok": self.ok}

    @classmethod
    def of(cls, row: sqlite3.Row) -> HookRunRow:
        """From an SQLite row."""
        return _of(cls, row, argv=tuple(json.loads(row["argv"])), timed_out=bool(row["timed_out"]))


@dataclass(frozen=True)
class DeviceActionRow:
    """One recorded drain or undrain step of a device, in the migration's sequence."""

    seq: int
    device_id: str
    action: DeviceAction
    status: ActionStatus
    at: float
    detail: str | None

    def to_json(self) -> dict[str, object]:
        """The step as one JSON object."""
        return asdict(self)

    @classmethod
    def of(cls, row: sqlite3.Row) -> DeviceActionRow:
        """From an SQLite row."""
        return _of(cls, row, action=DeviceAction(row["action"]), status=ActionStatus(row["status"]))


@dataclass(frozen=True)
class MigrationRecord:
    """A migration with its events, hook runs and device actions, each in sequence order."""

    migration: MigrationRow
    events: tuple[EventRow, ...]
    hook_runs: tuple[HookRunRow, ...]
    device_actions: tuple[DeviceActionRow, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The migration's fields plus its events, hook runs and device actions."""
        return {
            **self.migration.to_json(),
            "events": [event.to_json() for event in self.events],
            "hook_runs": [run.to_json() for run in self.hook_runs],
            "device_actions": [action.to_json() for action in self.device_actions],
        }


def still_drained(actions: Iterable[DeviceActionRow]) -> dict[str, str | None]:
    """Devices a migration may have left drained, from its device actions: a drain that started and no
    undrain that ended after it. Maps each device to the detail of its last drain."""
    drained: dict[str, str | None] = {}
    for row in sorted(actions, key=lambda r: r.seq):
        if row.action is DeviceAction.DRAIN and row.status is ActionStatus.STARTING:
            drained[row.device_id] = row.detail
        elif row.action is DeviceAction.UNDRAIN and row.status in ENDS:
            drained.pop(row.device_id, None)
    return drained
