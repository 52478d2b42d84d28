"""Table-driven tests of the pure VFIO model: event parsing, legal sequences, drain/undrain decisions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.vfio import (
    LEGAL_TRANSITIONS,
    Action,
    Decision,
    DeviceState,
    DeviceTracker,
    MigrationTracker,
    Role,
    VfioEvent,
)

_ROLES = {"src": Role.SOURCE, "dst": Role.DESTINATION}


def event(role: Role, device_id: str, state: DeviceState | str, t: float = 0.0) -> VfioEvent:
    return VfioEvent(
        host=str(role),
        role=role,
        domain="vm1",
        device_id=device_id,
        qom_path=f"/machine/peripheral/{device_id}",
        state=DeviceState(state),
        qemu_time=t,
        received=t,
    )


# Each step: "<src|dst> <device id> <state> [drain|late-drain|undrain] [unexpected]".
# The sequences are those of QEMU's hw/vfio/migration.c, as LAB.md lists them.
SEQUENCES: dict[str, list[str]] = {
    "QEMU 11.0, precopy + P2P: drain on prepare, undrain when the destination runs": [
        "src nic0 pre-copy",
        "dst nic0 resuming",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "dst nic0 running-p2p",
        "dst nic0 running undrain",
        "src nic0 stop",
    ],
    "QEMU 10.x, no prepare: late drain on pre-copy-p2p": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p late-drain",
        "src nic0 stop-copy",
        "dst nic0 resuming",
        "dst nic0 running-p2p",
        "dst nic0 running undrain",
        "src nic0 stop",
    ],
    "no precopy: late drain on running-p2p": [
        "src nic0 running-p2p late-drain",
        "src nic0 stop-copy",
        "src nic0 stop",
        "dst nic0 resuming",
        "dst nic0 running-p2p",
        "dst nic0 running undrain",
    ],
    "precopy, no P2P: late drain on stop-copy": [
        "src nic0 pre-copy",
        "src nic0 stop-copy late-drain",
        "src nic0 stop",
        "dst nic0 resuming",
        "dst nic0 running undrain",
    ],
    "neither precopy nor P2P: late drain on stop-copy": [
        "src nic0 stop-copy late-drain",
        "dst nic0 resuming",
        "dst nic0 running undrain",
        "src nic0 stop",
    ],
    "migration fails after the drain: undrain when the source runs again": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "src nic0 running undrain",
    ],
    "failed transition: prepare falls back to running": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 running undrain",
    ],
    "failed transition: prepare goes to another state, already drained": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 stop-copy",
        "src nic0 running undrain",
    ],
    "cancelled in pre-copy before any drain: nothing to undrain": [
        "src nic0 pre-copy",
        "dst nic0 resuming",
        "src nic0 running",
        "dst nic0 stop",
    ],
    "duplicate prepare: a single drain": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p-prepare",
        "src nic0 pre-copy-p2p",
        "dst nic0 running-p2p unexpected",
        "dst nic0 running undrain",
    ],
    "undrain exactly once, even with running repeated on both ends": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "dst nic0 resuming",
        "dst nic0 running undrain",
        "dst nic0 running unexpected",
        "src nic0 running",
        "src nic0 running",
    ],
    "source events delivered after the destination runs do not drain again": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "dst nic0 resuming",
        "dst nic0 running undrain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "src nic0 stop",
    ],
    "second attempt in the same tracker drains again on its prepare": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 running undrain",
        "src nic0 pre-copy",
        "dst nic0 resuming",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic0 pre-copy-p2p",
        "src nic0 stop-copy",
        "dst nic0 running undrain",
    ],
    "second attempt without prepare drains late again": [
        "src nic0 stop-copy late-drain",
        "src nic0 running undrain",
        "src nic0 stop-copy late-drain",
        "dst nic0 resuming",
        "dst nic0 running undrain",
    ],
    "two devices are tracked independently": [
        "src nic0 pre-copy",
        "src nic0 pre-copy-p2p-prepare drain",
        "src nic1 running-p2p late-drain",
        "src nic0 pre-copy-p2p",
        "src nic1 stop-copy",
        "src nic0 stop-copy",
        "dst nic1 resuming",
        "dst nic0 resuming",
        "dst nic1 running undrain",
        "dst nic0 running-p2p",
        "dst nic0 running undrain",
    ],
    "a device the policy does not cover gets no decision and no note": [
        "src gpu0 pre-copy-p2p-prepare",
        "src gpu0 resuming",
        "src nic0 pre-copy-p2p-prepare unexpected drain",
        "dst gpu0 running",
        "dst nic0 running undrain unexpected",
    ],
    "transitions outside the table are noted, decisions still made": [
        "dst nic0 running unexpected",
        "src nic0 resuming unexpected",
        "src nic0 stop-copy unexpected late-drain",
        "src nic0 pre-copy unexpected",
        "src nic0 running undrain",
    ],
}


def _parse(step: str) -> tuple[VfioEvent, str | None, bool]:
    role, device_id, state, *marks = step.split()
    unexpected = "unexpected" in marks
    actions = [mark for mark in marks if mark != "unexpected"]
    assert len(actions) <= 1, step
    return event(_ROLES[role], device_id, state), (actions[0] if actions else None), unexpected


def _describe(decision: Decision | None) -> str | None:
    if decision is None:
        return None
    if decision.action is Action.DRAIN and decision.late:
        return "late-drain"
    return str(decision.action)


@pytest.mark.parametrize("steps", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_sequence(steps: list[str]) -> None:
    tracker = MigrationTracker(covers=lambda device_id: device_id != "gpu0")
    for number, step in enumerate(steps, 1):
        ev, expected_action, expected_unexpected = _parse(step)
        notes_before = len(tracker.notes)
        decision = tracker.feed(ev)
        assert _describe(decision) == expected_action, f"step {number}: {step}"
        assert (len(tracker.notes) > notes_before) == expected_unexpected, (
            f"step {number}: {step}: {tracker.notes}"
        )
        if decision is not None:
            assert decision.event is ev
            assert decision.device_id == ev.device_id
            assert decision.reason
    # Every drain of a complete sequence is paired with an undrain.
    assert tracker.still_drained() == []
    assert "gpu0" not in tracker.devices


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


def test_device_tracker_state_history_and_note() -> None:
    tracker = DeviceTracker("nic0")
    assert (tracker.state, tracker.source_state, tracker.destination_state) == (
        DeviceState.RUNNING,
        DeviceState.RUNNING,
        None,
    )
    events = [
        event(Role.SOURCE, "nic0", DeviceState.PRE_COPY),
        event(Role.SOURCE, "nic0", DeviceState.PRE_COPY_P2P_PREPARE),
        event(Role.DESTINATION, "nic0", DeviceState.RUNNING_P2P),
    ]
    outcomes = [tracker.feed(ev) for ev in events]
    assert outcomes[0] == (None, None)
    drain, note = outcomes[1]
    assert drain == Decision(Action.DRAIN, "nic0", events[1], False, "pre-copy-p2p-prepare on the source")
    assert note is None
    assert outcomes[2][0] is None
    assert (
        outcomes[2][1]
        == "unexpected VFIO transition of nic0 on the destination (destination): (none) -> running-p2p"
    )
    assert tracker.history == tuple(events)
    assert tracker.state is DeviceState.RUNNING_P2P
    assert tracker.source_state is DeviceState.PRE_COPY_P2P_PREPARE
    assert tracker.drained


def test_device_tracker_rejects_another_device() -> None:
    with pytest.raises(ValueError, match="'nic1' fed to the tracker of 'nic0'"):
        DeviceTracker("nic0").feed(event(Role.SOURCE, "nic1", DeviceState.PRE_COPY))


def test_still_drained_and_forced_undrain() -> None:
    tracker = MigrationTracker()
    for device_id in ("nic0", "nic1", "nic2"):
        tracker.feed(event(Role.SOURCE, device_id, DeviceState.PRE_COPY))
    tracker.feed(event(Role.SOURCE, "nic0", DeviceState.PRE_COPY_P2P_PREPARE))
    tracker.feed(event(Role.SOURCE, "nic1", DeviceState.PRE_COPY_P2P_PREPARE))
    assert tracker.still_drained() == ["nic0", "nic1"]
    # The migration code aborts and undrains itself: it owns the undrain only if it gets True.
    assert tracker.mark_undrained("nic0") is True
    assert tracker.mark_undrained("nic0") is False
    assert tracker.mark_undrained("nic2") is False
    assert tracker.still_drained() == ["nic1"]
    # The source then reports running: no second undrain for nic0, the one owed for nic1.
    assert tracker.feed(event(Role.SOURCE, "nic0", DeviceState.RUNNING)) is None
    undrain = tracker.feed(event(Role.SOURCE, "nic1", DeviceState.RUNNING))
    assert undrain is not None
    assert undrain.action is Action.UNDRAIN
    assert tracker.still_drained() == []
    with pytest.raises(KeyError):
        tracker.mark_undrained("never-seen")


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
        ({"device-id": "nic0", "qom-path": QOM}, "unknown device-state ''"),
        ({"device-id": "nic0", "qom-path": QOM, "device-state": "bogus"}, "unknown device-state 'bogus'"),
        ({"device-id": "nic0", "qom-path": QOM, "device-state": "PRE-COPY"}, "unknown device-state"),
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


def test_unknown_state_message_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"known: stop, running, .*pre-copy-p2p-prepare"):
        VfioEvent.from_qmp("h", Role.SOURCE, "vm1", 0, 0, {"device-id": "x", "device-state": "nope"}, 0.0)


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
