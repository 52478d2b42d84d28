"""The VFIO migration model: device states, their legal sequences, and drain/undrain decisions.

Pure logic: no libvirt, no I/O, no clock. The libvirt edge turns each VFIO_MIGRATION monitor event into
a `VfioEvent` (`VfioEvent.from_qmp`) and feeds it to a `MigrationTracker`, which answers at once with
"drain now", "undrain now" or nothing. The sequences follow QEMU's hw/vfio/migration.c:

- source, precopy + P2P device: running -> pre-copy -> pre-copy-p2p-prepare (QEMU >= 11.0) -> pre-copy-p2p
  -> stop-copy -> stop; QEMU 9.1-10.x is the same without the prepare state.
- source, no precopy: running -> running-p2p -> stop-copy -> stop; no P2P: ... -> stop-copy -> stop.
- source, migration failed or cancelled (or a failed transition): back to running.
- destination: resuming -> running-p2p (P2P devices) -> running when the guest resumes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar


class DeviceState(StrEnum):
    """A VFIO device's migration state, as QEMU names it (QAPI `QapiVfioMigrationState`)."""

    STOP = "stop"
    RUNNING = "running"
    STOP_COPY = "stop-copy"
    RESUMING = "resuming"
    RUNNING_P2P = "running-p2p"
    PRE_COPY = "pre-copy"
    PRE_COPY_P2P = "pre-copy-p2p"
    # QEMU >= 11.0: sent just BEFORE the (possibly slow) transition to pre-copy-p2p, to drain in time.
    PRE_COPY_P2P_PREPARE = "pre-copy-p2p-prepare"


class Role(StrEnum):
    """Which end of the migration an event comes from."""

    SOURCE = "source"
    DESTINATION = "destination"


class Action(StrEnum):
    """What the orchestrator must do for a device's dependent workloads."""

    DRAIN = "drain"
    UNDRAIN = "undrain"


@dataclass(frozen=True, slots=True)
class VfioEvent:
    """One VFIO_MIGRATION event: which device, where, in which state, and when."""

    host: str  # a label for the host ("source", a host name, a URI), for reports
    role: Role
    domain: str
    device_id: str  # QEMU's device id, which is the libvirt alias
    qom_path: str
    state: DeviceState
    qemu_time: float  # epoch seconds, QEMU's own timestamp of the event
    received: float  # epoch seconds, when the orchestrator got it

    @classmethod
    def from_qmp(
        cls,
        host: str,
        role: Role,
        domain: str,
        seconds: int,
        micros: int,
        details: str | Mapping[str, Any] | None,
        received: float,
    ) -> VfioEvent:
        """Build an event from a QMP VFIO_MIGRATION event as libvirt delivers it.

        `details` is the event's `data`: the JSON text libvirt hands the callback, or already a mapping.
        An empty `device-id` (a device added without an id) is replaced by the last component of the
        `qom-path`. Raises `ValueError`, naming the host, domain and problem, on malformed data.
        """

        def malformed(problem: str) -> ValueError:
            return ValueError(f"malformed VFIO_MIGRATION event from {host} for domain {domain}: {problem}")

        if details is None:
            raise malformed("it has no data")
        if isinstance(details, str):
            try:
                data: object = json.loads(details)
            except json.JSONDecodeError as exc:
                raise malformed(f"data is not JSON ({exc})") from None
        else:
            data = details
        if not isinstance(data, Mapping):
            raise malformed(f"data is a {type(data).__name__}, expected an object")

        fields: dict[str, str] = {}
        for key in ("device-id", "qom-path", "device-state"):
            value = data.get(key, "")
            if not isinstance(value, str):
                raise malformed(f"{key!r} is {value!r}, expected a string")
            fields[key] = value
        try:
            state = DeviceState(fields["device-state"])
        except ValueError:
            known = ", ".join(s.value for s in DeviceState)
            raise malformed(f"unknown device-state {fields['device-state']!r} (known: {known})") from None
        qom_path = fields["qom-path"]
        device_id = fields["device-id"] or qom_path.rstrip("/").rsplit("/", 1)[-1]
        if not device_id:
            raise malformed("both 'device-id' and 'qom-path' are empty")
        return cls(
            host=host,
            role=role,
            domain=domain,
            device_id=device_id,
            qom_path=qom_path,
            state=state,
            qemu_time=seconds + micros / 1_000_000,
            received=received,
        )

    def to_json(self) -> dict[str, str | float]:
        """The event as one JSON object (the NDJSON relay and the journal use it)."""
        return {
            "qemu_time": self.qemu_time,
            "received": self.received,
            "host": self.host,
            "role": self.role.value,
            "domain": self.domain,
            "device_id": self.device_id,
            "qom_path": self.qom_path,
            "state": self.state.value,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """Drain or undrain one device's workloads now, and why."""

    action: Action
    device_id: str
    event: VfioEvent | None  # None when the migration code decided on its own (a forced undrain)
    late: bool  # drained on a state after the point where prepare would have been
    reason: str


_S = DeviceState
_Previous = TypeVar("_Previous", DeviceState, DeviceState | None)
_ANY = frozenset(DeviceState)


def _with(
    always: DeviceState, edges: Mapping[_Previous, frozenset[DeviceState]]
) -> dict[_Previous, frozenset[DeviceState]]:
    """Add a state reachable from everywhere to a transition table."""
    return {previous: nexts | {always} for previous, nexts in edges.items()}


# Legal next states per previous state. The source starts in running; the destination starts with no
# state (None): its device only appears when the incoming migration loads.
LEGAL_TRANSITIONS: Mapping[Role, Mapping[DeviceState | None, frozenset[DeviceState]]] = {
    # Any state may fall back to running: a failed or cancelled migration, or a failed transition.
    Role.SOURCE: _with(
        _S.RUNNING,
        {
            _S.RUNNING: frozenset({_S.PRE_COPY, _S.RUNNING_P2P, _S.STOP_COPY}),
            # pre-copy-p2p directly: QEMU 9.1-10.x has no prepare state.
            _S.PRE_COPY: frozenset({_S.PRE_COPY_P2P_PREPARE, _S.PRE_COPY_P2P, _S.STOP_COPY}),
            # A prepare for pre-copy-p2p does not promise it: the transition may fail into any state.
            _S.PRE_COPY_P2P_PREPARE: _ANY,
            _S.PRE_COPY_P2P: frozenset({_S.STOP_COPY}),
            _S.RUNNING_P2P: frozenset({_S.STOP_COPY}),
            _S.STOP_COPY: frozenset({_S.STOP}),
            _S.STOP: frozenset(),
            _S.RESUMING: frozenset(),  # never seen on a source
        },
    ),
    # Any state may go to stop (the incoming side is torn down). resuming is accepted from any state
    # too: a retried migration's new incoming QEMU starts its device from scratch.
    Role.DESTINATION: _with(
        _S.STOP,
        _with(
            _S.RESUMING,
            {
                None: frozenset(),
                _S.RESUMING: frozenset({_S.RUNNING_P2P, _S.RUNNING}),
                _S.RUNNING_P2P: frozenset({_S.RUNNING}),
                _S.RUNNING: frozenset(),
                _S.STOP: frozenset(),
                _S.STOP_COPY: frozenset(),
                _S.PRE_COPY: frozenset(),
                _S.PRE_COPY_P2P: frozenset(),
                _S.PRE_COPY_P2P_PREPARE: frozenset(),
            },
        ),
    ),
}

# Source states that mean the P2P quiesce has begun or is over: drain now if prepare never came
# (QEMU < 11.0, a device without precopy, which goes to running-p2p, or without P2P, to stop-copy).
_LATE_DRAIN_REASONS: Mapping[DeviceState, str] = {
    state: f"{state} on the source with no pre-copy-p2p-prepare before it (late drain)"
    for state in (_S.PRE_COPY_P2P, _S.RUNNING_P2P, _S.STOP_COPY)
}
_PREPARE_REASON = "pre-copy-p2p-prepare on the source"
_UNDRAIN_REASONS: Mapping[Role, str] = {
    Role.DESTINATION: "running on the destination",
    Role.SOURCE: "running again on the source (migration failed or cancelled, or a transition failed)",
}


class DeviceTracker:
    """Follows one device id on both ends of a migration and decides when to drain and undrain it.

    Drain: on the source's pre-copy-p2p-prepare, or, if none came in this attempt, on the first of
    pre-copy-p2p / running-p2p / stop-copy (late). Undrain, exactly once per drain: when the device runs
    again, on the destination (success) or on the source (failure). The source returning to running
    ends an attempt; after an undrain a new prepare (a second attempt followed by the same tracker)
    drains again. Not thread-safe: `MigrationTracker` serialises access.
    """

    __slots__ = ("_attempt_drained", "_destination", "_drained", "_history", "_last", "_source", "device_id")

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self._source: DeviceState = DeviceState.RUNNING
        self._destination: DeviceState | None = None
        self._last: DeviceState = DeviceState.RUNNING
        self._drained = False
        # Set on drain, cleared when the source runs again: stops a late-delivered source event
        # (events of the two hosts arrive on different connections) from draining a finished attempt.
        self._attempt_drained = False
        self._history: list[VfioEvent] = []

    @property
    def state(self) -> DeviceState:
        """The state in the latest event, from either end (running before any event)."""
        return self._last

    @property
    def source_state(self) -> DeviceState:
        """The device's state on the source."""
        return self._source

    @property
    def destination_state(self) -> DeviceState | None:
        """The device's state on the destination, None until it appears there."""
        return self._destination

    @property
    def drained(self) -> bool:
        """True between a drain decision and its undrain."""
        return self._drained

    @property
    def history(self) -> tuple[VfioEvent, ...]:
        """Every event fed, in order."""
        return tuple(self._history)

    def feed(self, event: VfioEvent) -> tuple[Decision | None, str | None]:
        """Take one event of this device: return (decision or None, unexpected-transition note or None)."""
        if event.device_id != self.device_id:
            raise ValueError(f"event for device {event.device_id!r} fed to the tracker of {self.device_id!r}")
        self._history.append(event)
        return self._decide(event), self._advance(event)

    def mark_undrained(self) -> bool:
        """Record an undrain made outside the tracker; True if the device was drained until now."""
        was_drained = self._drained
        self._drained = False
        return was_drained

    def _advance(self, event: VfioEvent) -> str | None:
        """Move to the event's state; return a note if the step is not in the legal table."""
        previous: DeviceState | None
        if event.role is Role.SOURCE:
            previous, self._source = self._source, event.state
        else:
            previous, self._destination = self._destination, event.state
        self._last = event.state
        if event.state in LEGAL_TRANSITIONS[event.role][previous]:
            return None
        # Only the unusual path builds a string.
        return (
            f"unexpected VFIO transition of {self.device_id} on the {event.role} ({event.host}): "
            f"{previous or '(none)'} -> {event.state}"
        )

    def _decide(self, event: VfioEvent) -> Decision | None:
        state = event.state
        if state is DeviceState.RUNNING:
            if event.role is Role.SOURCE:
                self._attempt_drained = False
            if not self._drained:
                return None
            self._drained = False
            return Decision(Action.UNDRAIN, self.device_id, event, False, _UNDRAIN_REASONS[event.role])
        if event.role is not Role.SOURCE or self._drained:
            return None
        if state is DeviceState.PRE_COPY_P2P_PREPARE:
            return self._drain(event, late=False, reason=_PREPARE_REASON)
        late_reason = _LATE_DRAIN_REASONS.get(state)
        if late_reason is not None and not self._attempt_drained:
            return self._drain(event, late=True, reason=late_reason)
        return None

    def _drain(self, event: VfioEvent, *, late: bool, reason: str) -> Decision:
        self._drained = True
        self._attempt_drained = True
        return Decision(Action.DRAIN, self.device_id, event, late, reason)


def _covers_all(_device_id: str) -> bool:
    return True


class MigrationTracker:
    """Follows every device id that appears in one migration's events, both ends, and decides.

    `covers(device_id)` says which devices the policy acts on; it is asked once per device id. Devices
    are learnt from the events themselves (a vfio-pci added on the QEMU command line has no hostdev).
    `feed` is on the hot path (event -> hook): O(1), no logging, nothing allocated but the decision.
    Thread-safe: the event thread feeds while the migration code may undrain on a failure path.
    """

    __slots__ = ("_covers", "_devices", "_ignored", "_lock", "notes")

    def __init__(self, covers: Callable[[str], bool] = _covers_all) -> None:
        self._covers = covers
        self._devices: dict[str, DeviceTracker] = {}
        self._ignored: set[str] = set()
        self._lock = threading.Lock()
        self.notes: list[str] = []  # unexpected transitions, for the journal and the report

    @property
    def devices(self) -> Mapping[str, DeviceTracker]:
        """The tracker of every covered device seen so far, by device id."""
        return self._devices

    def feed(self, event: VfioEvent) -> Decision | None:
        """Take one event; return what to do now for its device, if anything."""
        with self._lock:
            tracker = self._devices.get(event.device_id)
            if tracker is None:
                if event.device_id in self._ignored:
                    return None
                if not self._covers(event.device_id):
                    self._ignored.add(event.device_id)
                    return None
                tracker = self._devices[event.device_id] = DeviceTracker(event.device_id)
            decision, note = tracker.feed(event)
            if note is not None:
                self.notes.append(note)
            return decision

    def still_drained(self) -> list[str]:
        """Device ids drained and not yet undrained: a failure path must undrain these itself."""
        with self._lock:
            return [device_id for device_id, tracker in self._devices.items() if tracker.drained]

    def mark_undrained(self, device_id: str) -> bool:
        """Record that the migration code undrained `device_id`, so no later event undrains it again.

        Returns True if it was drained until now: the caller that gets True owns the undrain, which
        keeps "exactly one undrain per drain" when an event and a failure path race. Raises KeyError
        for a device never seen.
        """
        with self._lock:
            return self._devices[device_id].mark_undrained()


def schema_support(schema: object) -> tuple[bool, bool]:
    """From QEMU's `query-qmp-schema`: (knows the VFIO_MIGRATION event, knows pre-copy-p2p-prepare).

    The schema names types by opaque ids, so follow the event's argument object to its
    `device-state` member's enum.
    """
    if not isinstance(schema, list):
        return False, False
    by_name = {entry.get("name"): entry for entry in schema if isinstance(entry, dict)}
    event = by_name.get("VFIO_MIGRATION")
    if event is None or event.get("meta-type") != "event":
        return False, False
    arg_type = by_name.get(event.get("arg-type"), {})
    members = arg_type.get("members", []) if isinstance(arg_type, dict) else []
    state_type = next((m.get("type") for m in members if m.get("name") == "device-state"), None)
    enum = by_name.get(state_type, {})
    values = enum.get("values", []) if isinstance(enum, dict) else []
    return True, DeviceState.PRE_COPY_P2P_PREPARE.value in values
