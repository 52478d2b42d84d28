"""The simulated VFIO device's model (orchestrator.lab.simulator): each device's state, and the
VFIO_MIGRATION sequence of QEMU's hw/vfio/migration.c that the migration's own monitor traffic drives,
as steps for the proxy to run: it says what to send, and the proxy does the I/O.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.lab.sim_settings import DeviceConfig, SimConfig


@dataclass
class Device:
    """A simulated device's live state."""

    config: DeviceConfig
    emits: bool
    state: str = "running"
    quiet: bool = False  # inside a P2P transition: the device has stopped answering
    probe: socket.socket | None = None
    probe_path: Path | None = None


@dataclass
class Step:
    """One step of a scripted sequence: emit an event, wait, or act on the migration."""

    kind: str  # "emit" | "wait" | "quiet" | "cancel" | "forward"
    device: Device | None = None
    state: str = ""
    seconds: float = 0.0
    line: bytes = b""  # for "forward": a line of QEMU's output, held behind earlier steps


@dataclass
class Simulator:
    """The device model driven by monitor traffic; returns what to send, never does I/O itself."""

    config: SimConfig
    devices: list[Device] = field(default_factory=list)
    role: str | None = None  # "source" during an outgoing migration, "destination" while incoming
    migration_status: str | None = None

    def __post_init__(self) -> None:
        self.devices = [Device(config=d, emits=self.config.events_on(d)) for d in self.config.devices]

    def event(self, device: Device, state: str) -> bytes | None:
        """Move `device` to `state`; the VFIO_MIGRATION line to send, if the device emits."""
        if state != "pre-copy-p2p-prepare":
            device.state = state
            if state in self.config.answering:
                device.quiet = False
        if not device.emits:
            return None
        data = {
            "device-id": device.config.device_id,
            "qom-path": device.config.qom_path,
            "device-state": state,
        }
        if self.config.prepare_event and state.endswith("-prepare"):
            return qmp_event(
                "VFIO_MIGRATION_PREPARE", {**data, "device-state": state.removesuffix("-prepare")}
            )
        return qmp_event("VFIO_MIGRATION", data)

    def on_command(self, command: Mapping[str, Any]) -> None:
        """libvirt -> QEMU: note what the migration is doing."""
        name = command.get("execute")
        if name == "migrate":
            self.role = "source"
        elif name == "migrate-incoming":
            self.role = "destination"

    def on_event(self, message: Mapping[str, Any]) -> tuple[list[Step], list[Step]]:
        """QEMU -> libvirt event: steps to run before forwarding it, and steps after."""
        name = message.get("event")
        data = message.get("data") or {}
        before: list[Step] = []
        after: list[Step] = []
        if name == "MIGRATION":
            status = data.get("status")
            self.migration_status = status
            if self.role == "source":
                if status == "setup":
                    after = [Step("emit", d, "pre-copy") for d in self.devices if d.config.precopy]
                elif status == "completed":
                    after = [Step("emit", d, "stop") for d in self.devices if d.state == "stop-copy"]
                    self.role = None
                elif status in ("failed", "cancelled"):
                    after = [Step("emit", d, "running") for d in self.devices if d.state != "running"]
                    self.role = None
            elif self.role == "destination" and status == "active":
                after = [Step("emit", d, "resuming") for d in self.devices if d.state != "resuming"]
        elif name == "STOP" and self.role == "source" and self.migration_status in ("active", "device"):
            before = self.switchover()
        elif name == "RESUME":
            before = self.resume()
            if self.role == "destination":
                self.role = None
        return before, after

    def switchover(self) -> list[Step]:
        """vCPUs paused for switchover: each device's P2P transition (in turn, as QEMU's vm-state
        handlers run one by one), then stop-copy."""
        steps: list[Step] = []
        for device in self.devices:
            if not device.config.p2p:
                continue
            target = "pre-copy-p2p" if device.state == "pre-copy" else "running-p2p"
            if target == "pre-copy-p2p" and self.config.prepare_state:
                steps.append(Step("emit", device, "pre-copy-p2p-prepare"))
            steps += [Step("quiet", device), Step("wait", seconds=self.config.transition_s)]
            if self.config.fail_transition:
                # The transition failed: the device falls back, and QEMU fails the migration.
                return [*steps, Step("emit", device, self.config.fail_transition), Step("cancel")]
            steps.append(Step("emit", device, target))
        steps += [Step("quiet", d) for d in self.devices]
        steps += [Step("emit", d, "stop-copy") for d in self.devices]
        return steps

    def resume(self) -> list[Step]:
        """vCPUs resume: devices not yet running go through running-p2p (if P2P) to running."""
        steps: list[Step] = []
        waking = [d for d in self.devices if d.state != "running"]
        steps += [Step("emit", d, "running-p2p") for d in waking if d.config.p2p and d.state != "running-p2p"]
        steps += [Step("emit", d, "running") for d in waking]
        return steps

    def answering(self, device: Device) -> bool:
        """Whether the device answers its peers now."""
        return not device.quiet and device.state in self.config.answering


def qmp_event(name: str, data: Mapping[str, Any], now: float | None = None) -> bytes:
    """A QMP event line as QEMU writes it."""
    t = time.time() if now is None else now
    seconds = int(t)
    message = {
        "timestamp": {"seconds": seconds, "microseconds": int((t - seconds) * 1_000_000)},
        "event": name,
        "data": data,
    }
    return json.dumps(message).encode() + b"\r\n"


def restamp(line: bytes) -> bytes:
    """An event held back by a blocked transition carries the time it was let out, as in QEMU."""
    if not line.startswith(b'{"timestamp"'):
        return line
    try:
        message = json.loads(line)
        return qmp_event(message["event"], message.get("data") or {})
    except (ValueError, KeyError, TypeError):
        return line


def add_prepare_state(schema: list[dict[str, Any]]) -> bool:
    """Make a QEMU 10 schema (query-qmp-schema) claim the 11.0 prepare state; True if changed."""
    for entry in schema:
        values = entry.get("values") or []
        is_vfio_states = (
            entry.get("meta-type") == "enum" and values and {"pre-copy-p2p", "resuming"} <= set(values)
        )
        if is_vfio_states and "pre-copy-p2p-prepare" not in values:
            values.append("pre-copy-p2p-prepare")
            entry.setdefault("members", []).append({"name": "pre-copy-p2p-prepare"})
            return True
    return False
