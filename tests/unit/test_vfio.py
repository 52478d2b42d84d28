"""Table-driven tests of the pure VFIO model: event parsing, legal sequences, drain/undrain decisions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.core.vfio import (
    LEGAL_TRANSITIONS,
    DeviceSignal,
    DeviceState,
    DeviceTracker,
    MigrationTracker,
    Role,
    Signal,
    VfioEvent,
    prepared_state,
)


def event(role: Role, device_id: str, state: DeviceState | str, t: float = 0.0) -> VfioEvent:
    return VfioEvent(
        host=str(role),
        role=role,
        domain="vm1",
        device_id=device_id,
        qom_path=f"/machine/peripheral/{device_id}",
        state=state,
        qemu_time=t,
        received=t,
    )


@pytest.mark.parametrize(
    ("role", "previous", "state", "legal"),
    [
        (Role.SOURCE, DeviceState.RUNNING, DeviceState.PRE_COPY, True),
        (Role.SOURCE, DeviceState.RUNNING, DeviceState.RUNNING_P2P, True),
        (Role.SOURCE, DeviceState.RUNNING, DeviceState.STOP_COPY, True),
        (Role.SOURCE, DeviceState.RUNNING, DeviceState.PRE_COPY_P2P_PREPARE, False),
        (Role.SOURCE, DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P_PREPARE, True),
        (Role.SOURCE, DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P, True),
        (Role.SOURCE, DeviceState.PRE_COPY, DeviceState.STOP_COPY, True),
        *[(Role.SOURCE, DeviceState.PRE_COPY_P2P_PREPARE, state, True) for state in DeviceState],
        (Role.SOURCE, DeviceState.PRE_COPY_P2P, DeviceState.STOP_COPY, True),
        (Role.SOURCE, DeviceState.PRE_COPY_P2P, DeviceState.PRE_COPY, False),
        (Role.SOURCE, DeviceState.RUNNING_P2P, DeviceState.STOP_COPY, True),
        (Role.SOURCE, DeviceState.STOP_COPY, DeviceState.STOP, True),
        (Role.SOURCE, DeviceState.STOP_COPY, DeviceState.PRE_COPY_P2P, False),
        *[(Role.SOURCE, state, DeviceState.RUNNING, True) for state in DeviceState],
        *[
            (Role.SOURCE, state, DeviceState.RESUMING, False)
            for state in DeviceState
            if state is not DeviceState.PRE_COPY_P2P_PREPARE  # from prepare anything goes
        ],
        (Role.DESTINATION, None, DeviceState.RESUMING, True),
        (Role.DESTINATION, None, DeviceState.RUNNING, False),
        (Role.DESTINATION, DeviceState.RESUMING, DeviceState.RUNNING_P2P, True),
        (Role.DESTINATION, DeviceState.RESUMING, DeviceState.RUNNING, True),
        (Role.DESTINATION, DeviceState.RESUMING, DeviceState.PRE_COPY, False),
        (Role.DESTINATION, DeviceState.RUNNING_P2P, DeviceState.RUNNING, True),
        (Role.DESTINATION, DeviceState.RUNNING, DeviceState.RUNNING_P2P, False),
        *[(Role.DESTINATION, state, DeviceState.STOP, True) for state in (None, *DeviceState)],
    ],
)
def test_legal_transitions(role: Role, previous: DeviceState | None, state: DeviceState, legal: bool) -> None:
    assert (state in LEGAL_TRANSITIONS[role][previous]) is legal


def test_transition_tables_cover_every_state() -> None:
    assert set(LEGAL_TRANSITIONS[Role.SOURCE]) == set(DeviceState)
    assert set(LEGAL_TRANSITIONS[Role.DESTINATION]) == {None, *DeviceState}


def test_device_tracker_signals_history_and_note() -> None:
    tracker = DeviceTracker("nic0")
    assert (tracker.state, tracker.source_state, tracker.destination_state) == ("running", "running", None)
    events = [
        event(Role.SOURCE, "nic0", DeviceState.PRE_COPY),
        event(Role.SOURCE, "nic0", DeviceState.PRE_COPY_P2P_PREPARE),
        event(Role.DESTINATION, "nic0", DeviceState.RUNNING_P2P),
        event(Role.SOURCE, "nic0", DeviceState.PRE_COPY_P2P),
        event(Role.SOURCE, "nic0", DeviceState.STOP_COPY),
        event(Role.DESTINATION, "nic0", DeviceState.RUNNING),
    ]
    outcomes = [tracker.feed(ev) for ev in events]
    assert outcomes[0] == (None, None)
    assert outcomes[1] == (DeviceSignal(Signal.QUIESCING, events[1]), None)
    assert outcomes[2][0] is None
    assert (
        outcomes[2][1]
        == "unexpected VFIO transition of nic0 on the destination (destination): (none) -> running-p2p"
    )
    assert outcomes[3] == (DeviceSignal(Signal.QUIESCED, events[3], late=False), None)
    assert outcomes[4] == (None, None), "quiesced once per attempt"
    assert outcomes[5] == (DeviceSignal(Signal.RUNNING, events[5]), None)
    assert tracker.history == tuple(events)
    assert tracker.source_state == DeviceState.STOP_COPY


def test_device_tracker_rejects_another_device() -> None:
    with pytest.raises(ValueError, match="'nic1' fed to the tracker of 'nic0'"):
        DeviceTracker("nic0").feed(event(Role.SOURCE, "nic1", DeviceState.PRE_COPY))


def test_source_running_signals_only_after_it_left_running() -> None:
    tracker = DeviceTracker("nic0")
    assert tracker.feed(event(Role.SOURCE, "nic0", DeviceState.RUNNING))[0] is None
    tracker.feed(event(Role.SOURCE, "nic0", DeviceState.PRE_COPY))
    signal, _ = tracker.feed(event(Role.SOURCE, "nic0", DeviceState.RUNNING))
    assert signal is not None and signal.signal is Signal.RUNNING


@pytest.mark.parametrize(
    ("state", "target"),
    [
        ("pre-copy-p2p-prepare", "pre-copy-p2p"),
        ("running-p2p-prepare", "running-p2p"),
        ("stop-copy-prepare", None),
        ("pre-copy", None),
        ("prepare", None),
    ],
)
def test_prepared_state(state: str, target: str | None) -> None:
    assert prepared_state(state) == target


def test_covers_is_asked_once_per_device() -> None:
    asked: list[str] = []

    def covers(device_id: str) -> bool:
        asked.append(device_id)
        return device_id.startswith("nic")

    tracker = MigrationTracker(covers)
    for state in ("pre-copy", "pre-copy-p2p-prepare", "pre-copy-p2p"):
        tracker.feed(event(Role.SOURCE, "nic0", state))
        tracker.feed(event(Role.SOURCE, "gpu0", state))
    assert asked == ["nic0", "gpu0"]
    assert list(tracker.devices) == ["nic0"]


QOM = "/machine/peripheral/hostdev0"


@pytest.mark.parametrize(
    ("details", "device_id", "qom_path", "state"),
    [
        (
            json.dumps({"device-id": "hostdev0", "qom-path": QOM, "device-state": "pre-copy-p2p-prepare"}),
            "hostdev0",
            QOM,
            DeviceState.PRE_COPY_P2P_PREPARE,
        ),
        (
            {"device-id": "hostdev0", "qom-path": QOM, "device-state": "running"},
            "hostdev0",
            QOM,
            DeviceState.RUNNING,
        ),
        (
            {"device-id": "", "qom-path": "/machine/peripheral-anon/device[3]", "device-state": "stop-copy"},
            "device[3]",
            "/machine/peripheral-anon/device[3]",
            DeviceState.STOP_COPY,
        ),
        ({"qom-path": QOM, "device-state": "resuming"}, "hostdev0", QOM, DeviceState.RESUMING),
        ({"device-id": "ua-nic", "device-state": "running-p2p"}, "ua-nic", "", DeviceState.RUNNING_P2P),
    ],
)
def test_from_qmp(details: Any, device_id: str, qom_path: str, state: DeviceState) -> None:
    ev = VfioEvent.from_qmp("src-host", Role.SOURCE, "vm1", 1700000000, 250000, details, 1700000000.5)
    assert (ev.device_id, ev.qom_path, ev.state) == (device_id, qom_path, state)
    assert ev.qemu_time == 1700000000.25
    assert ev.received == 1700000000.5


@pytest.mark.parametrize(
    ("details", "message"),
    [
        (None, "has no data"),
        ("{not json", "data is not JSON"),
        ("[1, 2]", "data is a list, expected an object"),
        ({"device-id": "nic0", "qom-path": QOM}, "unusable device-state ''"),
        ({"device-id": "nic0", "qom-path": QOM, "device-state": "PRE-COPY"}, "unusable device-state"),
        ({"device-id": "nic0", "qom-path": QOM, "device-state": "x" * 65}, "unusable device-state"),
        ({"device-id": "nic0", "qom-path": QOM, "device-state": 3}, "'device-state' is 3, expected a string"),
        ({"device-id": 7, "qom-path": QOM, "device-state": "running"}, "'device-id' is 7"),
        ({"device-id": "nic0", "qom-path": None, "device-state": "running"}, "'qom-path' is None"),
        (
            {"device-id": "", "qom-path": "", "device-state": "running"},
            "both 'device-id' and 'qom-path' are empty",
        ),
    ],
)
def test_from_qmp_rejects_malformed(details: Any, message: str) -> None:
    with pytest.raises(
        ValueError, match="malformed VFIO_MIGRATION event from src-host for domain vm1"
    ) as info:
        VfioEvent.from_qmp("src-host", Role.SOURCE, "vm1", 0, 0, details, 0.0)
    assert message in str(info.value)


def test_unusable_state_message_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"known: stop, running, .*pre-copy-p2p-prepare"):
        VfioEvent.from_qmp("h", Role.SOURCE, "vm1", 0, 0, {"device-id": "x", "device-state": "No!"}, 0.0)


def test_a_state_unknown_here_is_kept_not_dropped() -> None:
    ev = VfioEvent.from_qmp(
        "h", Role.SOURCE, "vm1", 0, 0, {"device-id": "x", "device-state": "pre-copy-p2p-v2"}, 0.0
    )
    assert ev.state == "pre-copy-p2p-v2" and not isinstance(ev.state, DeviceState)


def test_event_to_json() -> None:
    ev = VfioEvent.from_qmp(
        "dst-host",
        Role.DESTINATION,
        "vm1",
        10,
        500000,
        '{"device-id": "hostdev0", "qom-path": "/machine/peripheral/hostdev0", "device-state": "running"}',
        11.0,
    )
    record = ev.to_json()
    assert record == {
        "qemu_time": 10.5,
        "received": 11.0,
        "host": "dst-host",
        "role": "destination",
        "domain": "vm1",
        "device_id": "hostdev0",
        "qom_path": "/machine/peripheral/hostdev0",
        "state": "running",
    }
    assert json.loads(json.dumps(record)) == record


# QEMU's first design of the feature, from its review thread: a separate event, its device-state the
# state about to be entered (the line as QEMU would write it on its monitor).
FIRST_DESIGN = (
    '{"timestamp": {"seconds": 1700000000, "microseconds": 250000}, "event": "VFIO_MIGRATION_PREPARE", '
    '"data": {"device-id": "nic0", "qom-path": "/machine/peripheral/nic0", "device-state": "pre-copy-p2p"}}'
)


def test_a_separate_prepare_event_is_the_prepare_of_the_state_it_names() -> None:
    message = json.loads(FIRST_DESIGN)
    ev = VfioEvent.from_qmp(
        "src", Role.SOURCE, "vm1", 1700000000, 250000, message["data"], 1.0, message["event"]
    )
    assert ev.state is DeviceState.PRE_COPY_P2P_PREPARE and ev.device_id == "nic0"
    tracker = MigrationTracker()
    signal = tracker.feed(ev)
    assert signal is not None and signal.signal is Signal.QUIESCING, "drained on it, as on the prepare state"
    again = {**message["data"], "device-state": "pre-copy-p2p-prepare"}  # said both ways: read once
    assert VfioEvent.from_qmp("src", Role.SOURCE, "vm1", 0, 0, again, 1.0, message["event"]).state == ev.state
