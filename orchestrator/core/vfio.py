"""The VFIO migration model: device states, their legal sequences, and what each event signals.

Pure logic: no libvirt, no I/O, no clock. The libvirt edge turns each VFIO_MIGRATION monitor event into
a `VfioEvent` (`VfioEvent.from_qmp`) and feeds it to a `MigrationTracker`, which follows every device
on both ends and answers with what the event means for the device's workloads: it is about to go quiet
(a prepare state), it went quiet with no warning (QEMU < 11.0), or it runs again. Whether that drains or
undrains anything is the migration's decision (`orchestrator.core.phases`). The sequences follow QEMU's
hw/vfio/migration.c:

- source, precopy + P2P device: running -> pre-copy -> pre-copy-p2p-prepare (QEMU >= 11.0) -> pre-copy-p2p
  -> stop-copy -> stop; QEMU 9.1-10.x is the same without the prepare state.
- source, no precopy: running -> running-p2p -> stop-copy -> stop; no P2P: ... -> stop-copy -> stop.
- source, migration failed or cancelled (or a failed transition): back to running.
- destination: resuming -> running-p2p (P2P devices) -> running when the guest resumes.

QEMU's QAPI documents prepare states in general ("states with a 'prepare' suffix ... the device is just
about to transition to the corresponding state"), so any `X-prepare` whose X is a P2P state is the
prepare for X, and a state this model does not know is kept (and noted), never dropped. QEMU's first
design of the feature (in its review thread) sent a separate event, VFIO_MIGRATION_PREPARE, whose
`device-state` is the state about to be entered: it reads as that state's prepare (`from_qmp`).
"""

from __future__ import annotations

import json
import re
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


class Signal(StrEnum):
    """What an event means for a device's dependent workloads."""

    QUIESCING = "quiescing"  # a prepare state on the source: the device is about to stop answering
    QUIESCED = "quiesced"  # the source device reached a quiet state (P2P or stop-copy) for the first time
    RUNNING = "running"  # the device runs again: on the destination, or on the source after a failure


EVENT = "VFIO_MIGRATION"
PREPARE_EVENT = "VFIO_MIGRATION_PREPARE"  # QEMU's first design: device-state = the state about to come
EVENTS = (EVENT, PREPARE_EVENT)
# The states in which a device no longer answers its peers (the P2P states and stop-copy).
P2P_STATES = frozenset({DeviceState.PRE_COPY_P2P, DeviceState.RUNNING_P2P})
QUIET_STATES = P2P_STATES | {DeviceState.STOP_COPY}
_PREPARE_SUFFIX = "-prepare"
_STATE_WORD = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def prepared_state(state: str) -> DeviceState | None:
    """The P2P state that a prepare state announces (`pre-copy-p2p-prepare` -> pre-copy-p2p), else None."""
    if not state.endswith(_PREPARE_SUFFIX):
        return None
    target = state[: -len(_PREPARE_SUFFIX)]
    return DeviceState(target) if target in P2P_STATES else None


def known_state(state: str) -> DeviceState | None:
    """The DeviceState for `state`, None for a state this model does not know."""
    try:
        return DeviceState(state)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class VfioEvent:
    """One VFIO_MIGRATION event: which device, where, in which state, and when.

    `state` is a `DeviceState` member when the state is known, else QEMU's text as it came.
    """

    host: str  # a label for the host ("source", a host name, a URI), for reports
    role: Role
    domain: str
    device_id: str  # QEMU's device id, which is the libvirt alias
    qom_path: str
    state: str
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
        name: str = EVENT,
    ) -> VfioEvent:
        """Build an event from a QMP VFIO_MIGRATION event as libvirt delivers it (`name`
        VFIO_MIGRATION_PREPARE: QEMU's first design, read as the prepare of the state it names).

        `details` is the event's `data`: the JSON text libvirt hands the callback, or already a mapping.
        An empty `device-id` (a device added without an id) is replaced by the last component of the
        `qom-path`. A state this model does not know is kept as text. Raises `ValueError`, naming the
        host, domain and problem, on malformed data.
        """

        def malformed(problem: str) -> ValueError:
            return ValueError(f"malformed {name} event from {host} for domain {domain}: {problem}")

        if details is None:
            raise malformed("it has no data")
        if isinstance(details, str):
            try:
                data: object = json.loads(details)
            except json.JSONDecodeError as exc:
                raise malformed(f"data is not JSON ({exc})") from None
            except RecursionError:
                raise malformed("data is nested too deeply") from None
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
        raw_state = fields["device-state"]
        if name == PREPARE_EVENT and raw_state and not raw_state.endswith(_PREPARE_SUFFIX):
            raw_state += _PREPARE_SUFFIX  # "about to enter pre-copy-p2p" is pre-copy-p2p-prepare
        state: str | None = known_state(raw_state)
        if state is None and _STATE_WORD.match(raw_state):
            state = raw_state  # a newer QEMU's state: kept, and noted by the tracker
        if state is None:
            known = ", ".join(s.value for s in DeviceState)
            raise malformed(f"unusable device-state {raw_state[:80]!r} (known: {known})")
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
            "state": str(self.state),
        }


@dataclass(frozen=True, slots=True)
class DeviceSignal:
    """What one event means for its device: `late` when it went quiet with no prepare before it."""

    signal: Signal
    event: VfioEvent
    late: bool = False


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


def is_legal(role: Role, previous: str | None, state: str) -> bool:
    """Whether `previous -> state` is in QEMU's sequence for this end (prepare states generalised)."""
    if previous is not None and (prepared_state(previous) is not None or known_state(previous) is None):
        return True  # a prepare promises nothing, and after a state unknown here nothing can be judged
    edges = LEGAL_TRANSITIONS[role][known_state(previous) if previous is not None else None]
    target = prepared_state(state)
    if target is not None and role is Role.SOURCE:
        return state in edges or target in edges
    known = known_state(state)
    return known is not None and known in edges


class DeviceTracker:
    """Follows one device id on both ends of a migration and says what each of its events signals.

    QUIESCING on a source prepare state; QUIESCED the first time the source reaches a quiet state
    (late when no prepare came before it); RUNNING when the device runs again, on the destination or
    on the source after it had left running. The source returning to running starts over.
    """

    __slots__ = ("_destination", "_history", "_last", "_prepared", "_quiesced", "_source", "device_id")

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self._source: str = DeviceState.RUNNING
        self._destination: str | None = None
        self._last: str = DeviceState.RUNNING
        self._prepared = False  # a prepare state came since the source last ran
        self._quiesced = False  # the source reached a quiet state since it last ran
        self._history: list[VfioEvent] = []

    @property
    def state(self) -> str:
        """The state in the latest event, from either end (running before any event)."""
        return self._last

    @property
    def source_state(self) -> str:
        """The device's state on the source."""
        return self._source

    @property
    def destination_state(self) -> str | None:
        """The device's state on the destination, None until it appears there."""
        return self._destination

    @property
    def history(self) -> tuple[VfioEvent, ...]:
        """Every event fed, in order."""
        return tuple(self._history)

    def feed(self, event: VfioEvent) -> tuple[DeviceSignal | None, str | None]:
        """Take one event of this device: (what it signals or None, a note on an unexpected step or None)."""
        if event.device_id != self.device_id:
            raise ValueError(f"event for device {event.device_id!r} fed to the tracker of {self.device_id!r}")
        self._history.append(event)
        return self._signal(event), self._advance(event)

    def _advance(self, event: VfioEvent) -> str | None:
        """Move to the event's state; return a note if the step is not in QEMU's sequence."""
        previous: str | None
        if event.role is Role.SOURCE:
            previous, self._source = self._source, event.state
        else:
            previous, self._destination = self._destination, event.state
        self._last = event.state
        if is_legal(event.role, previous, event.state):
            return None
        # Only the unusual path builds a string.
        unknown = "" if known_state(event.state) or prepared_state(event.state) else " (a state unknown here)"
        return (
            f"unexpected VFIO transition of {self.device_id} on the {event.role} ({event.host}): "
            f"{previous or '(none)'} -> {event.state}{unknown}"
        )

    def _signal(self, event: VfioEvent) -> DeviceSignal | None:
        state = event.state
        if state == DeviceState.RUNNING:
            if event.role is Role.DESTINATION:
                return DeviceSignal(Signal.RUNNING, event)
            if self._source == DeviceState.RUNNING:
                return None  # it never left running: nothing resumed
            self._prepared = self._quiesced = False
            return DeviceSignal(Signal.RUNNING, event)
        if event.role is not Role.SOURCE:
            return None
        if prepared_state(state) is not None:
            self._prepared = True
            return DeviceSignal(Signal.QUIESCING, event)
        if state in QUIET_STATES and not self._quiesced:
            self._quiesced = True
            return DeviceSignal(Signal.QUIESCED, event, late=not self._prepared)
        return None


def _covers_all(_device_id: str) -> bool:
    return True


class MigrationTracker:
    """Follows every device id that appears in one migration's events, both ends.

    `covers(device_id)` says which devices the policy acts on; it is asked once per device id. Devices
    are learnt from the events themselves (a vfio-pci added on the QEMU command line has no hostdev).
    `feed` is on the hot path (event -> hook): O(1), no logging, nothing allocated but the signal.
    Not thread-safe: the migration serialises access.
    """

    __slots__ = ("_covers", "_devices", "_ignored", "notes")

    def __init__(self, covers: Callable[[str], bool] = _covers_all) -> None:
        self._covers = covers
        self._devices: dict[str, DeviceTracker] = {}
        self._ignored: set[str] = set()
        self.notes: list[str] = []  # unexpected transitions, for the journal and the report

    @property
    def devices(self) -> Mapping[str, DeviceTracker]:
        """The tracker of every covered device seen so far, by device id."""
        return self._devices

    def covers(self, device_id: str) -> bool:
        """Whether the policy acts on this device (asked of the policy once per id)."""
        if device_id in self._devices:
            return True
        if device_id in self._ignored:
            return False
        if self._covers(device_id):
            self._devices[device_id] = DeviceTracker(device_id)
            return True
        self._ignored.add(device_id)
        return False

    def feed(self, event: VfioEvent) -> DeviceSignal | None:
        """Take one event; return what it signals for its device, if anything."""
        if not self.covers(event.device_id):
            return None
        signal, note = self._devices[event.device_id].feed(event)
        if note is not None:
            self.notes.append(note)
        return signal


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
