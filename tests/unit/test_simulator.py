"""The VFIO device simulator without QEMU: its settings, the state machine fed with a migration's
monitor traffic as dicts, and the monitor proxy over real sockets (the fake "QEMU" and "libvirt"
ends stand in for processes this test cannot start; the lab tests run the real ones)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.lab.sim_model import Device, Simulator, Step, add_prepare_state, qmp_event, restamp
from orchestrator.lab.sim_settings import (
    STATES,
    ConfigError,
    DeviceConfig,
    SimConfig,
    device_options,
    domain_name,
    global_migration_events,
    monitor_fd,
    vfio_devices,
    without_vfio_devices,
)
from orchestrator.lab.simulator import Proxy, main

EVENTS_ON = ["-global", "vfio-pci.migration-events=on"]


def nics(*options: str) -> list[str]:
    """QEMU's arguments for vfio-pci devices nic0, nic1, ..., each with its extra options ("" for none)."""
    argv = []
    for index, extra in enumerate(options):
        argv += [
            "-device",
            f"vfio-pci,id=nic{index},host=0000:5e:00.{index}" + (f",{extra}" if extra else ""),
        ]
    return argv


ONE = nics("")
TWO = nics("", "")
TIMEOUT = 10.0  # generous bound on every blocking receive; never a pacing sleep

# --- settings ---------------------------------------------------------------------------------


def test_from_env_defaults() -> None:
    config = SimConfig.from_env({}, [])
    assert config == SimConfig(
        devices=(),
        prepare_state=True,
        transition_s=0.3,
        fail_transition=None,
        answering=frozenset({"running", "pre-copy"}),
        fabric=None,
        global_events=None,
    )


def test_from_env_every_setting(tmp_path: Path) -> None:
    env = {
        "ORCH_SIM_OVERRIDES": " nic0:precopy=off , ,nic1:p2p=off",
        "ORCH_SIM_BEHAVIOUR": "10.0",
        "ORCH_SIM_PRECOPY": "yes",
        "ORCH_SIM_P2P": "TRUE",
        "ORCH_SIM_TRANSITION_MS": "1250",
        "ORCH_SIM_FAIL_TRANSITION": "running",
        "ORCH_SIM_ANSWERING": "running, running-p2p",
        "ORCH_SIM_FABRIC": str(tmp_path),
    }
    argv = ["-name", "guest=vm1", *nics("migration-events=on", "", "migration-events=off"), *EVENTS_ON]
    config = SimConfig.from_env(env, argv)
    assert config.devices == (
        DeviceConfig("nic0", precopy=False, p2p=True, events=True),
        DeviceConfig("nic1", precopy=True, p2p=False, events=None),
        DeviceConfig("nic2", precopy=True, p2p=True, events=False),
    )
    assert config.devices[0].qom_path == "/machine/peripheral/nic0"
    assert not config.prepare_state
    assert config.transition_s == 1.25
    assert config.fail_transition == "running"
    assert config.answering == {"running", "running-p2p"}
    assert config.fabric == tmp_path
    assert config.global_events is True


@pytest.mark.parametrize(
    ("env", "device"),
    [
        ({"ORCH_SIM_PRECOPY": "off"}, DeviceConfig("nic0", precopy=False, p2p=True, events=None)),
        ({"ORCH_SIM_P2P": "0"}, DeviceConfig("nic0", precopy=True, p2p=False, events=None)),
        (
            {"ORCH_SIM_PRECOPY": "off", "ORCH_SIM_OVERRIDES": "nic0:precopy=on"},
            DeviceConfig("nic0", precopy=True, p2p=True, events=None),
        ),
        (
            {"ORCH_SIM_P2P": "off", "ORCH_SIM_OVERRIDES": "nic0:p2p=on,nic0:precopy=off"},
            DeviceConfig("nic0", precopy=False, p2p=True, events=None),
        ),
    ],
)
def test_device_overrides_beat_the_global_settings(env: dict[str, str], device: DeviceConfig) -> None:
    config = SimConfig.from_env(env, ONE)
    assert config.devices == (device,)


def test_negative_transition_means_none() -> None:
    assert SimConfig.from_env({"ORCH_SIM_TRANSITION_MS": "-5"}, []).transition_s == 0.0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ORCH_SIM_PRECOPY": "maybe"}, "ORCH_SIM_PRECOPY"),
        ({"ORCH_SIM_P2P": ""}, "ORCH_SIM_P2P"),
        ({"ORCH_SIM_BEHAVIOUR": "9.0"}, "ORCH_SIM_BEHAVIOUR"),
        ({"ORCH_SIM_TRANSITION_MS": "0.3"}, "ORCH_SIM_TRANSITION_MS"),
        ({"ORCH_SIM_TRANSITION_MS": "fast"}, "ORCH_SIM_TRANSITION_MS"),
        ({"ORCH_SIM_FAIL_TRANSITION": "broken"}, "ORCH_SIM_FAIL_TRANSITION"),
        ({"ORCH_SIM_OVERRIDES": "nic0:speed=fast"}, "ORCH_SIM_OVERRIDES"),
        ({"ORCH_SIM_OVERRIDES": "nic0:precopy"}, "ORCH_SIM_OVERRIDES"),
        ({"ORCH_SIM_OVERRIDES": "nic0,nic1:precopy=maybe"}, "ORCH_SIM_OVERRIDES"),
        ({"ORCH_SIM_OVERRIDES": "nic0:migration-events=off"}, "goes in its -device options"),
        ({"ORCH_SIM_OVERRIDES": "nic1:precopy=off"}, "ORCH_SIM_OVERRIDES names nic1, which no vfio-pci"),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        SimConfig.from_env(env, ONE)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (nics("migration-events=sometimes"), "-device id=nic0: migration-events"),
        (["-device", "vfio-pci,host=0000:5e:00.0"], "-device vfio-pci without id="),
        ([*ONE, *ONE], "id=nic0: the id is used twice"),
    ],
)
def test_invalid_devices(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        SimConfig.from_env({}, argv)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], None),
        (["-name", "guest=vm1", "-S"], None),
        (["-global", "vfio-pci.migration-events=on"], True),
        (["-global", "vfio-pci.migration-events=off"], False),
        (["--global", "vfio-pci.migration-events=true"], True),
        (["-global", "driver=vfio-pci,property=migration-events,value=on"], True),
        (["-global", "driver=vfio-pci,property=migration-events,value=false"], False),
        (["-global", "vfio-pci.migration-events=on", "-global", "vfio-pci.migration-events=off"], False),
        (
            [
                "-global",
                "driver=vfio-pci,property=migration-events,value=off",
                "-global",
                "vfio-pci.migration-events=on",
            ],
            True,
        ),
        (["-global", "vfio-pci.x-pre-copy-dirty-page-tracking=off"], None),
        (["-global", "virtio-net-pci.migration-events=on"], None),
        (["-global", "driver=virtio-net-pci,property=migration-events,value=on"], None),
        (["-global", "driver=vfio-pci,property=migration-events"], None),
        (["-set", "vfio-pci.migration-events=on"], None),
        (["vfio-pci.migration-events=on", "-global"], None),
    ],
)
def test_global_migration_events(argv: list[str], expected: bool | None) -> None:
    assert global_migration_events(argv) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("vfio-pci,id=nic0,host=0000:5e:00.0", {"driver": "vfio-pci", "id": "nic0", "host": "0000:5e:00.0"}),
        ("driver=vfio-pci-nohotplug,id=a,,b", {"driver": "vfio-pci-nohotplug", "id": "a,b"}),
        (
            "vfio-pci,id=nic1,migration-events=off",
            {"driver": "vfio-pci", "id": "nic1", "migration-events": "off"},
        ),
        (
            '{"driver": "vfio-pci", "id": "nic2", "migration-events": true, "bus": "pcie.0"}',
            {"driver": "vfio-pci", "id": "nic2", "migration-events": "on", "bus": "pcie.0"},
        ),
        ("virtio-net-pci", {"driver": "virtio-net-pci"}),
        ("{broken", {}),
    ],
)
def test_device_options(value: str, expected: dict[str, str]) -> None:
    assert device_options(value) == expected


def test_vfio_devices_are_taken_out_of_qemus_arguments() -> None:
    argv = [
        "-name",
        "guest=vm1",
        "-device",
        "virtio-net-pci,id=net0",
        "-device",
        "vfio-pci,id=nic0,host=0000:5e:00.0",
        "--device",
        '{"driver":"vfio-pci-nohotplug","id":"nic1","host":"0000:5e:00.1"}',
        "-device",
        '{"driver":"virtio-rng-pci","id":"rng0"}',
        *EVENTS_ON,
        "-device",
        "vfio-pci,id=nic2,host=0000:5e:00.2,migration-events=off",
    ]
    assert [options["id"] for options in vfio_devices(argv)] == ["nic0", "nic1", "nic2"]
    assert without_vfio_devices(argv) == [
        "-name",
        "guest=vm1",
        "-device",
        "virtio-net-pci,id=net0",
        "-device",
        '{"driver":"virtio-rng-pci","id":"rng0"}',
        *EVENTS_ON,
    ]
    config = SimConfig.from_env({}, argv)
    assert [(d.device_id, config.events_on(d)) for d in config.devices] == [
        ("nic0", True),
        ("nic1", True),
        ("nic2", False),
    ]


class Exec(Exception):
    """Raised by the stand-in for os.execv: this test process must not become QEMU."""


@pytest.mark.parametrize(
    ("argv", "qemu_argv"),
    [
        # a capability probe or a guest without vfio-pci device: QEMU's arguments untouched
        (
            ["-qmp", "unix:/x.sock,server=on,wait=off", *EVENTS_ON],
            ["-qmp", "unix:/x.sock,server=on,wait=off", *EVENTS_ON],
        ),
        # vfio-pci devices but no monitor fd from libvirt: QEMU runs without them, nothing simulated
        (["-S", *ONE, *EVENTS_ON], ["-S", *EVENTS_ON]),
    ],
)
def test_main_without_simulation(
    argv: list[str], qemu_argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def execv(path: str, args: list[str]) -> None:
        raise Exec(path, args)

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setenv("ORCH_SIM_QEMU", "/usr/bin/qemu-system-x86_64")
    with pytest.raises(Exec) as raised:
        main(argv)
    assert raised.value.args == ("/usr/bin/qemu-system-x86_64", ["/usr/bin/qemu-system-x86_64", *qemu_argv])


def test_main_refuses_an_override_without_its_device(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORCH_SIM_OVERRIDES", "nic7:p2p=off")
    with pytest.raises(SystemExit) as raised:
        main(["-chardev", "socket,id=charmonitor,fd=99,server=on,wait=off", *ONE])
    assert raised.value.code == 1
    assert "ORCH_SIM_OVERRIDES names nic7" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            [
                "-name",
                "guest=vm1",
                "-chardev",
                "socket,id=charmonitor,fd=23,server=on,wait=off",
                "-mon",
                "chardev=charmonitor,id=monitor,mode=control",
            ],
            (3, 23),
        ),
        (["-qmp", "unix:/var/lib/libvirt/qemu/capabilities.monitor.sock,server=on,wait=off"], None),
        (["-chardev", "socket,id=charmonitor,path=/run/mon.sock,server=on,wait=off"], None),
        (["-chardev", "socket,id=charserial0,fd=24,server=on"], None),
        (["socket,id=charmonitor,fd=23"], None),
        ([], None),
    ],
)
def test_monitor_fd(argv: list[str], expected: tuple[int, int] | None) -> None:
    assert monitor_fd(argv) == expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-name", "guest=vm1,debug-threads=on", "-S"], "vm1"),
        (["-name", "debug-threads=on,guest=vm2"], "vm2"),
        (["-name", "vm3"], "vm3"),
        (["-name", "vm4,process=qemu-vm4"], "vm4"),
        (["-S", "-machine", "q35"], "unknown"),
    ],
)
def test_domain_name(argv: list[str], expected: str) -> None:
    assert domain_name(argv) == expected


@pytest.mark.parametrize(
    ("own", "global_", "expected"),
    [
        (None, None, False),
        (None, True, True),
        (None, False, False),
        (True, None, True),
        (True, False, True),
        (False, True, False),
        (False, None, False),
    ],
)
def test_device_property_beats_global(own: bool | None, global_: bool | None, expected: bool) -> None:
    device = DeviceConfig("nic0", precopy=True, p2p=True, events=own)
    assert SimConfig(devices=(device,), global_events=global_).events_on(device) is expected


# --- the state machine ------------------------------------------------------------------------


def command(name: str) -> dict[str, Any]:
    return {"execute": name, "id": f"libvirt-{name}"}


def event(name: str, status: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"timestamp": {"seconds": 1, "microseconds": 0}, "event": name}
    if status is not None:
        message["data"] = {"status": status}
    return message


def mig(status: str) -> dict[str, Any]:
    return event("MIGRATION", status)


# Monitor traffic of real libvirt-driven migrations (LAB.md), as the proxy sees it.
SOURCE = [
    command("migrate"),
    mig("setup"),
    mig("active"),
    event("MIGRATION_PASS"),
    event("STOP"),
    mig("pre-switchover"),
    mig("device"),
    mig("completed"),
    event("SHUTDOWN"),
]
CANCELLED = [command("migrate"), mig("setup"), mig("active"), mig("cancelling"), mig("cancelled")]
# After a failed transition QEMU fails the migration and the source runs on.
FAILED = [*SOURCE[:5], mig("cancelling"), mig("cancelled"), event("RESUME")]
DESTINATION = [command("migrate-incoming"), mig("setup"), mig("active"), mig("completed"), event("RESUME")]


@dataclass
class Run:
    """Feeds monitor traffic to a Simulator and executes its steps as the proxy would, recording
    everything in order: what libvirt receives, and the quiet/wait/cancel steps between."""

    sim: Simulator
    trace: list[str] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)  # decoded VFIO_MIGRATION data
    answering_at_waits: list[set[str]] = field(default_factory=list)

    def feed(self, traffic: Sequence[Mapping[str, Any]]) -> Run:
        for message in traffic:
            if "execute" in message:
                self.sim.on_command(message)
                continue
            before, after = self.sim.on_event(message)
            self.execute(before)
            status = (message.get("data") or {}).get("status")
            self.trace.append(f"{message['event']} {status}" if status else message["event"])
            self.execute(after)
        return self

    def execute(self, steps: Sequence[Step]) -> None:
        for step in steps:
            if step.kind == "emit":
                assert step.device is not None
                line = self.sim.event(step.device, step.state)
                if line is None:
                    self.trace.append(f"({step.device.config.device_id} {step.state})")
                    continue
                assert line.endswith(b"\r\n")
                message = json.loads(line)
                assert message["event"] in ("VFIO_MIGRATION", "VFIO_MIGRATION_PREPARE")
                self.seen.append(message["data"])
                prefix = "PREPARE " if message["event"] == "VFIO_MIGRATION_PREPARE" else ""
                self.trace.append(f"{prefix}{message['data']['device-id']} {message['data']['device-state']}")
            elif step.kind == "quiet":
                assert step.device is not None
                step.device.quiet = True
                self.trace.append(f"quiet {step.device.config.device_id}")
            elif step.kind == "wait":
                self.trace.append(f"wait {step.seconds}")
                self.answering_at_waits.append(self.answering())
            else:
                self.trace.append(step.kind)

    def answering(self) -> set[str]:
        """The devices that answer their peers now."""
        return {d.config.device_id for d in self.sim.devices if self.sim.answering(d)}

    def device(self, device_id: str) -> Device:
        return next(d for d in self.sim.devices if d.config.device_id == device_id)


def simulate(
    env: Mapping[str, str],
    traffic: Sequence[Mapping[str, Any]],
    argv: Sequence[str] = EVENTS_ON,
    devices: Sequence[str] = ONE,
) -> Run:
    return Run(Simulator(SimConfig.from_env(env, [*devices, *argv]))).feed(traffic)


SOURCE_TAIL = ["STOP", "MIGRATION pre-switchover", "MIGRATION device", "MIGRATION completed"]

SEQUENCES = {
    "source 11.0, precopy + P2P": (
        ONE,
        {},
        SOURCE,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "MIGRATION active",
            "MIGRATION_PASS",
            "nic0 pre-copy-p2p-prepare",
            "quiet nic0",
            "wait 0.3",
            "nic0 pre-copy-p2p",
            "quiet nic0",
            "nic0 stop-copy",
            *SOURCE_TAIL,
            "nic0 stop",
            "SHUTDOWN",
        ],
    ),
    "source 10.0": (
        ONE,
        {"ORCH_SIM_BEHAVIOUR": "10.0", "ORCH_SIM_TRANSITION_MS": "100"},
        SOURCE,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "MIGRATION active",
            "MIGRATION_PASS",
            "quiet nic0",
            "wait 0.1",
            "nic0 pre-copy-p2p",
            "quiet nic0",
            "nic0 stop-copy",
            *SOURCE_TAIL,
            "nic0 stop",
            "SHUTDOWN",
        ],
    ),
    "source 11.0, its first design: a prepare event of its own": (
        ONE,
        {"ORCH_SIM_BEHAVIOUR": "11.0-event", "ORCH_SIM_TRANSITION_MS": "100"},
        SOURCE,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "MIGRATION active",
            "MIGRATION_PASS",
            "PREPARE nic0 pre-copy-p2p",
            "quiet nic0",
            "wait 0.1",
            "nic0 pre-copy-p2p",
            "quiet nic0",
            "nic0 stop-copy",
            *SOURCE_TAIL,
            "nic0 stop",
            "SHUTDOWN",
        ],
    ),
    "source without precopy": (
        ONE,
        {"ORCH_SIM_PRECOPY": "off"},
        SOURCE,
        [
            "MIGRATION setup",
            "MIGRATION active",
            "MIGRATION_PASS",
            "quiet nic0",
            "wait 0.3",
            "nic0 running-p2p",
            "quiet nic0",
            "nic0 stop-copy",
            *SOURCE_TAIL,
            "nic0 stop",
            "SHUTDOWN",
        ],
    ),
    "source without P2P": (
        ONE,
        {"ORCH_SIM_P2P": "off"},
        SOURCE,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "MIGRATION active",
            "MIGRATION_PASS",
            "quiet nic0",
            "nic0 stop-copy",
            *SOURCE_TAIL,
            "nic0 stop",
            "SHUTDOWN",
        ],
    ),
    "source, two devices transition in turn": (
        TWO,
        {"ORCH_SIM_TRANSITION_MS": "200"},
        SOURCE,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "nic1 pre-copy",
            "MIGRATION active",
            "MIGRATION_PASS",
            "nic0 pre-copy-p2p-prepare",
            "quiet nic0",
            "wait 0.2",
            "nic0 pre-copy-p2p",
            "nic1 pre-copy-p2p-prepare",
            "quiet nic1",
            "wait 0.2",
            "nic1 pre-copy-p2p",
            "quiet nic0",
            "quiet nic1",
            "nic0 stop-copy",
            "nic1 stop-copy",
            *SOURCE_TAIL,
            "nic0 stop",
            "nic1 stop",
            "SHUTDOWN",
        ],
    ),
    "source, mixed devices (no precopy, no P2P)": (
        TWO,
        {"ORCH_SIM_OVERRIDES": "nic0:precopy=off,nic1:p2p=off", "ORCH_SIM_TRANSITION_MS": "0"},
        SOURCE,
        [
            "MIGRATION setup",
            "nic1 pre-copy",
            "MIGRATION active",
            "MIGRATION_PASS",
            "quiet nic0",
            "wait 0.0",
            "nic0 running-p2p",
            "quiet nic0",
            "quiet nic1",
            "nic0 stop-copy",
            "nic1 stop-copy",
            *SOURCE_TAIL,
            "nic0 stop",
            "nic1 stop",
            "SHUTDOWN",
        ],
    ),
    "failed transition falls back and cancels": (
        ONE,
        {"ORCH_SIM_FAIL_TRANSITION": "running"},
        FAILED,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "MIGRATION active",
            "MIGRATION_PASS",
            "nic0 pre-copy-p2p-prepare",
            "quiet nic0",
            "wait 0.3",
            "nic0 running",
            "cancel",
            "STOP",
            "MIGRATION cancelling",
            "MIGRATION cancelled",
            "RESUME",
        ],
    ),
    "failed transition of the first of two devices": (
        TWO,
        {"ORCH_SIM_FAIL_TRANSITION": "stop"},
        FAILED,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "nic1 pre-copy",
            "MIGRATION active",
            "MIGRATION_PASS",
            "nic0 pre-copy-p2p-prepare",
            "quiet nic0",
            "wait 0.3",
            "nic0 stop",
            "cancel",
            "STOP",
            "MIGRATION cancelling",
            "MIGRATION cancelled",
            "nic0 running",
            "nic1 running",
            "RESUME",
        ],
    ),
    "cancelled in pre-copy": (
        ONE,
        {},
        CANCELLED,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "MIGRATION active",
            "MIGRATION cancelling",
            "MIGRATION cancelled",
            "nic0 running",
        ],
    ),
    "failed in pre-copy": (
        ONE,
        {},
        [*CANCELLED[:3], mig("failed")],
        ["MIGRATION setup", "nic0 pre-copy", "MIGRATION active", "MIGRATION failed", "nic0 running"],
    ),
    "destination": (
        ONE,
        {},
        DESTINATION,
        [
            "MIGRATION setup",
            "MIGRATION active",
            "nic0 resuming",
            "MIGRATION completed",
            "nic0 running-p2p",
            "nic0 running",
            "RESUME",
        ],
    ),
    "destination without P2P": (
        ONE,
        {"ORCH_SIM_P2P": "off"},
        DESTINATION,
        [
            "MIGRATION setup",
            "MIGRATION active",
            "nic0 resuming",
            "MIGRATION completed",
            "nic0 running",
            "RESUME",
        ],
    ),
    "events off for one device only": (
        nics("", "migration-events=off"),
        {"ORCH_SIM_TRANSITION_MS": "0"},
        SOURCE,
        [
            "MIGRATION setup",
            "nic0 pre-copy",
            "(nic1 pre-copy)",
            "MIGRATION active",
            "MIGRATION_PASS",
            "nic0 pre-copy-p2p-prepare",
            "quiet nic0",
            "wait 0.0",
            "nic0 pre-copy-p2p",
            "(nic1 pre-copy-p2p-prepare)",
            "quiet nic1",
            "wait 0.0",
            "(nic1 pre-copy-p2p)",
            "quiet nic0",
            "quiet nic1",
            "nic0 stop-copy",
            "(nic1 stop-copy)",
            *SOURCE_TAIL,
            "nic0 stop",
            "(nic1 stop)",
            "SHUTDOWN",
        ],
    ),
    "STOP and RESUME outside a migration are only forwarded": (
        ONE,
        {},
        [event("STOP"), event("RESUME"), mig("setup"), mig("completed")],
        ["STOP", "RESUME", "MIGRATION setup", "MIGRATION completed"],
    ),
    "STOP before the migration is active": (
        ONE,
        {},
        [command("migrate"), mig("setup"), event("STOP")],
        ["MIGRATION setup", "nic0 pre-copy", "STOP"],
    ),
}


@pytest.mark.parametrize(("devices", "env", "traffic", "expected"), SEQUENCES.values(), ids=SEQUENCES.keys())
def test_sequences(
    devices: list[str], env: dict[str, str], traffic: list[dict[str, Any]], expected: list[str]
) -> None:
    run = simulate(env, traffic, devices=devices)
    assert run.trace == expected
    for data in run.seen:
        assert set(data) == {"device-id", "qom-path", "device-state"}
        assert data["qom-path"] == f"/machine/peripheral/{data['device-id']}"
        assert data["device-state"] in STATES


def test_migration_role_ends_with_the_migration() -> None:
    run = simulate({}, SOURCE)
    assert run.sim.role is None
    # A later pause of the guest (virsh suspend) is no switchover.
    assert run.sim.on_event(event("STOP")) == ([], [])
    run = simulate({}, DESTINATION)
    assert run.sim.role is None
    assert run.device("nic0").state == "running"


@pytest.mark.parametrize(
    ("traffic", "final"),
    [(SOURCE, "stop"), (CANCELLED, "running"), (FAILED, "running"), (DESTINATION, "running")],
)
def test_a_device_that_does_not_emit_still_changes_state(traffic: list[dict[str, Any]], final: str) -> None:
    silent = simulate({}, traffic, argv=[], devices=TWO)
    assert silent.seen == []
    loud = simulate({}, traffic, devices=TWO)
    assert loud.seen, "the same traffic makes an emitting device speak"
    for device_id in ("nic0", "nic1"):
        assert silent.device(device_id).state == loud.device(device_id).state == final
    assert [s.strip("()") for s in silent.trace] == loud.trace


@pytest.mark.parametrize("state", STATES)
def test_answering_per_state(state: str) -> None:
    sim = Simulator(SimConfig.from_env({}, ONE))
    device = sim.devices[0]
    device.state = state
    assert sim.answering(device) is (state in ("running", "pre-copy"))
    device.quiet = True
    assert not sim.answering(device), "a device inside a P2P transition never answers"


def test_answering_follows_the_migration() -> None:
    run = Run(Simulator(SimConfig.from_env({}, [*TWO, *EVENTS_ON])))
    assert run.answering() == {"nic0", "nic1"}
    run.feed(SOURCE[:4])
    assert run.answering() == {"nic0", "nic1"}, "pre-copy still answers"
    run.feed(SOURCE[4:5])
    # Each transition silences its device; the other one answers until its own turn.
    assert run.answering_at_waits == [{"nic1"}, set()]
    assert run.answering() == set()
    run.feed(SOURCE[5:])
    assert run.answering() == set()


def test_answering_again_after_a_failed_transition() -> None:
    run = simulate({"ORCH_SIM_FAIL_TRANSITION": "running"}, FAILED[:5])
    assert run.answering_at_waits == [set()]
    assert run.device("nic0").state == "running"
    assert run.sim.answering(run.device("nic0"))


def test_answering_states_are_configurable() -> None:
    run = simulate({"ORCH_SIM_ANSWERING": "running,pre-copy,pre-copy-p2p"}, SOURCE[:5])
    nic0 = run.device("nic0")
    assert run.answering_at_waits == [set()], "never during the transition itself"
    assert nic0.state == "stop-copy"
    assert not run.sim.answering(nic0)
    nic0.state, nic0.quiet = "pre-copy", False
    assert run.sim.event(nic0, "pre-copy-p2p") is not None
    assert run.sim.answering(nic0), "pre-copy-p2p answers when configured to"


def _schema() -> list[dict[str, Any]]:
    return [
        {"name": "query-migrate", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
        {"name": "10", "meta-type": "enum", "values": ["none", "setup", "active"]},
        {
            "name": "42",
            "meta-type": "enum",
            "values": list(STATES[:-1]),
            "members": [{"name": s} for s in STATES[:-1]],
        },
    ]


def test_add_prepare_state() -> None:
    schema = _schema()
    assert add_prepare_state(schema)
    expected = _schema()
    expected[2]["values"].append("pre-copy-p2p-prepare")
    expected[2]["members"].append({"name": "pre-copy-p2p-prepare"})
    assert schema == expected
    assert not add_prepare_state(schema), "already there: left alone"
    assert schema == expected


def test_add_prepare_state_without_members_and_without_the_enum() -> None:
    schema: list[dict[str, Any]] = [
        {"name": "7", "meta-type": "enum", "values": ["resuming", "pre-copy-p2p"]}
    ]
    assert add_prepare_state(schema)
    assert schema[0]["members"] == [{"name": "pre-copy-p2p-prepare"}]
    other = _schema()[:2]
    assert not add_prepare_state(other)
    assert other == _schema()[:2]


@pytest.mark.parametrize(
    ("now", "seconds", "micros"),
    [(1700000000.25, 1700000000, 250000), (1700000000.0, 1700000000, 0), (12.5, 12, 500000)],
)
def test_qmp_event_format(now: float, seconds: int, micros: int) -> None:
    line = qmp_event("VFIO_MIGRATION", {"device-id": "nic0"}, now)
    assert line.endswith(b"}\r\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {
        "timestamp": {"seconds": seconds, "microseconds": micros},
        "event": "VFIO_MIGRATION",
        "data": {"device-id": "nic0"},
    }


def test_qmp_event_now() -> None:
    before = time.time()
    stamp = json.loads(qmp_event("STOP", {}))["timestamp"]
    after = time.time()
    assert 0 <= stamp["microseconds"] < 1_000_000
    assert int(before) <= stamp["seconds"] + stamp["microseconds"] / 1e6 <= after


def test_restamp() -> None:
    old = qmp_event("STOP", {}, 1000.5)
    fresh = json.loads(restamp(old))
    assert fresh["event"] == "STOP"
    assert fresh["timestamp"]["seconds"] >= int(time.time()) - 1
    for line in (b'{"return": {}, "id": "x"}\r\n', b'{"timestamp": broken\r\n', b"not json\r\n"):
        assert restamp(line) == line


# --- the proxy, over real sockets ------------------------------------------------------------


class LineReader:
    """Whole lines from a stream socket, each within TIMEOUT."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.buffer = b""

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            assert data, f"closed; partial: {self.buffer!r}"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line + b"\n"

    def message(self) -> dict[str, Any]:
        decoded = json.loads(self.line())
        assert isinstance(decoded, dict)
        return decoded


def vfio_state(message: Mapping[str, Any]) -> str | None:
    if message.get("event") != "VFIO_MIGRATION":
        return None
    return str(message["data"]["device-state"])


def stamp(message: Mapping[str, Any]) -> float:
    return float(message["timestamp"]["seconds"]) + float(message["timestamp"]["microseconds"]) / 1e6


def line(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


@dataclass
class Wire:
    """A Proxy serving in a thread between a fake QEMU end and a fake libvirt client."""

    proxy: Proxy
    thread: threading.Thread
    qemu: socket.socket
    libvirt: socket.socket
    from_qemu: LineReader  # what the proxy sent to QEMU
    from_proxy: LineReader  # what the proxy sent to libvirt
    errors: list[BaseException]

    def roundtrip(self) -> None:
        """Both directions once: the proxy is serving (and its probes are open)."""
        self.libvirt.sendall(b'{"execute": "query-status", "id": "sync"}\r\n')
        assert self.from_qemu.message()["id"] == "sync"
        self.qemu.sendall(b'{"return": {"status": "running"}, "id": "sync"}\r\n')
        assert self.from_proxy.message()["id"] == "sync"

    def start_outgoing(self) -> None:
        """libvirt starts a migration; QEMU reports setup (device -> pre-copy) and active."""
        self.libvirt.sendall(line({"execute": "migrate", "arguments": {"uri": "fd:migrate"}, "id": "m"}))
        assert self.from_qemu.message()["execute"] == "migrate"
        self.qemu.sendall(line(mig("setup")))
        assert self.from_proxy.message()["data"] == {"status": "setup"}
        assert vfio_state(self.from_proxy.message()) == "pre-copy"
        self.qemu.sendall(line(mig("active")))
        assert self.from_proxy.message()["data"] == {"status": "active"}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sim-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def wire(short_dir: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[Wire] = []

    def make(**settings: Any) -> Wire:
        settings.setdefault("devices", (DeviceConfig("nic0", precopy=True, p2p=True, events=True),))
        sim = Simulator(SimConfig(**settings))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(short_dir / "mon.sock"))
        listener.listen(1)
        qemu, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proxy = Proxy(listener, proxy_end, sim, "vm1")
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                proxy.serve()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        libvirt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        libvirt.connect(str(short_dir / "mon.sock"))
        made.append(Wire(proxy, thread, qemu, libvirt, LineReader(qemu), LineReader(libvirt), errors))
        return made[-1]

    yield make
    for w in made:
        w.libvirt.close()  # the proxy stops when libvirt hangs up
        w.thread.join(TIMEOUT)
        assert not w.thread.is_alive(), "the proxy did not stop when libvirt closed the monitor"
        w.qemu.close()
        w.proxy.qemu.close()
        if w.proxy.libvirt is not None:
            w.proxy.libvirt.close()
        assert not w.errors, w.errors


def test_proxy_relays_lines_unchanged_both_ways(wire: Any) -> None:
    w = wire()
    greeting = (
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}}, "capabilities": []}}\r\n'
    )
    w.qemu.sendall(greeting)
    assert w.from_proxy.line() == greeting
    for sent in (
        b'{"execute": "qmp_capabilities", "id": "libvirt-1"}\r\n',
        b'{"execute":"query-status","id":"libvirt-2"}\n',
        b"not json at all\r\n",
    ):
        w.libvirt.sendall(sent)
        assert w.from_qemu.line() == sent
    # A command split across writes reaches QEMU whole.
    w.libvirt.sendall(b'{"execute": "query-migrate", ')
    w.libvirt.sendall(b'"id": "libvirt-3"}\r\n')
    assert w.from_qemu.line() == b'{"execute": "query-migrate", "id": "libvirt-3"}\r\n'
    for sent in (
        b'{"return": {}, "id": "libvirt-1"}\r\n',
        b'{"return": {"status": "running", "running": true}, "id": "libvirt-2"}\r\n',
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RTC_CHANGE", "data": {"offset": 0}}\r\n',
        b"garbage from qemu\r\n",
    ):
        w.qemu.sendall(sent)
        assert w.from_proxy.line() == sent


def test_proxy_passes_file_descriptors_to_qemu(wire: Any) -> None:
    w = wire()
    read_end, write_end = os.pipe()
    try:
        getfd = b'{"execute": "getfd", "arguments": {"fdname": "migrate"}, "id": "libvirt-7"}\r\n'
        socket.send_fds(w.libvirt, [getfd], [write_end])
        os.close(write_end)
        received = b""
        fds: list[int] = []
        while not received.endswith(b"\n"):
            data, new_fds, _flags, _addr = socket.recv_fds(w.qemu, 65536, 4)
            assert data
            received += data
            fds += new_fds
        assert received == getfd
        assert len(fds) == 1
        os.write(fds[0], b"migration stream")
        os.close(fds[0])
        assert os.read(read_end, 100) == b"migration stream"
        assert os.read(read_end, 100) == b"", "the proxy kept no copy of the descriptor open"
    finally:
        os.close(read_end)
    w.roundtrip()


def test_proxy_holds_stop_back_for_the_transition(wire: Any) -> None:
    w = wire(transition_s=0.3)
    w.start_outgoing()
    held_stop = event("STOP")  # stamped in 1970: the proxy restamps what it held back
    w.qemu.sendall(line(held_stop) + b'{"return": {}, "id": "libvirt-9"}\r\n')
    prepare = w.from_proxy.message()
    assert vfio_state(prepare) == "pre-copy-p2p-prepare"
    p2p = w.from_proxy.message()
    assert vfio_state(p2p) == "pre-copy-p2p"
    assert stamp(p2p) - stamp(prepare) >= 0.3 - 2e-6
    stop_copy = w.from_proxy.message()
    assert vfio_state(stop_copy) == "stop-copy"
    stop = w.from_proxy.message()
    assert stop["event"] == "STOP"
    assert stamp(stop) >= stamp(prepare)
    assert stamp(stop) >= stamp(stop_copy)
    assert w.from_proxy.message() == {"return": {}, "id": "libvirt-9"}, "later output stays in order"
    w.qemu.sendall(line(mig("completed")))
    completed = w.from_proxy.message()
    assert completed == mig("completed"), "output after the transition is not restamped"
    assert vfio_state(w.from_proxy.message()) == "stop"


def test_proxy_cancels_the_migration_after_a_failed_transition(wire: Any) -> None:
    w = wire(transition_s=0.05, fail_transition="running")
    w.start_outgoing()
    w.qemu.sendall(line(event("STOP")))
    assert vfio_state(w.from_proxy.message()) == "pre-copy-p2p-prepare"
    assert w.from_qemu.line() == b'{"execute": "migrate_cancel", "id": "vfio-sim-cancel"}\r\n'
    assert vfio_state(w.from_proxy.message()) == "running"
    assert w.from_proxy.message()["event"] == "STOP"
    # QEMU answers the injected command: libvirt never sees that reply, only its own.
    w.qemu.sendall(b'{"return": {}, "id": "vfio-sim-cancel"}\r\n{"return": {}, "id": "libvirt-10"}\r\n')
    assert w.from_proxy.message() == {"return": {}, "id": "libvirt-10"}
    w.qemu.sendall(line(mig("cancelling")) + line(mig("cancelled")) + line(event("RESUME")))
    assert [w.from_proxy.message().get("event") for _ in range(3)] == ["MIGRATION", "MIGRATION", "RESUME"]
    w.roundtrip()
    assert w.proxy.swallow_ids == set()


def test_proxy_adds_the_prepare_state_to_the_schema(wire: Any) -> None:
    w = wire()
    w.libvirt.sendall(b'{"execute": "query-qmp-schema", "id": "libvirt-4"}\r\n')
    w.from_qemu.line()
    enum = {"name": "42", "meta-type": "enum", "values": ["running", "resuming", "pre-copy-p2p"]}
    w.qemu.sendall(line({"return": [enum], "id": "libvirt-4"}))
    reply = w.from_proxy.message()
    assert reply["id"] == "libvirt-4"
    assert reply["return"][0]["values"][-1] == "pre-copy-p2p-prepare"


def test_proxy_leaves_the_schema_alone_for_10_0(wire: Any) -> None:
    w = wire(prepare_state=False)
    w.libvirt.sendall(b'{"execute": "query-qmp-schema", "id": "libvirt-4"}\r\n')
    w.from_qemu.line()
    reply = line(
        {
            "return": [{"name": "42", "meta-type": "enum", "values": ["resuming", "pre-copy-p2p"]}],
            "id": "libvirt-4",
        }
    )
    w.qemu.sendall(reply)
    assert w.from_proxy.line() == reply


def test_liveness_socket_answers_only_while_running(wire: Any, short_dir: Path) -> None:
    """`alive STATE` while it answers; inside the P2P transition and after it, `quiet STATE` (the lab's
    annotation for the peers' report), which a peer does not count as an answer."""
    w = wire(transition_s=0.5, fabric=short_dir / "fabric")
    w.roundtrip()
    probe_path = short_dir / "fabric" / "vm1" / f"nic0@{os.getpid()}.sock"
    assert probe_path.exists()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(str(short_dir / "peer.sock"))
    peer.settimeout(TIMEOUT)

    def ask() -> bytes:
        peer.sendto(b"ping", str(probe_path))
        return peer.recv(64)

    def unanswered(said: bytes) -> None:
        # Any reply is queued before the proxy's next monitor output, which the caller has just
        # received: the one reply is the device saying it is quiet, and nothing else is queued.
        peer.settimeout(0)
        assert peer.recv(64) == said
        with pytest.raises(BlockingIOError):
            peer.recv(64)
        peer.settimeout(TIMEOUT)

    try:
        assert ask() == b"alive running"
        w.start_outgoing()
        assert ask() == b"alive pre-copy"
        w.qemu.sendall(line(event("STOP")))
        assert vfio_state(w.from_proxy.message()) == "pre-copy-p2p-prepare"
        peer.sendto(b"ping", str(probe_path))  # inside the 500 ms transition
        assert vfio_state(w.from_proxy.message()) == "pre-copy-p2p"
        unanswered(b"quiet pre-copy")
        assert vfio_state(w.from_proxy.message()) == "stop-copy"
        assert w.from_proxy.message()["event"] == "STOP"
        peer.sendto(b"ping", str(probe_path))
        w.roundtrip()
        unanswered(b"quiet stop-copy")
    finally:
        peer.close()
    w.libvirt.close()
    w.thread.join(TIMEOUT)
    assert not probe_path.exists(), "the proxy removes its liveness socket when it ends"
