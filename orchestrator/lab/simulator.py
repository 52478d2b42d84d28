"""A simulated VFIO device, usable as a libvirt domain's `<emulator>`.

No VFIO hardware exists in the lab, so this program stands between libvirt and the real QEMU:

1. libvirt starts it with QEMU's arguments and an already-listening monitor socket passed as
   `-chardev socket,id=charmonitor,fd=N,server=on,wait=off`.
2. It removes every vfio-pci device from those arguments (there is no VFIO hardware to give
   QEMU), gives QEMU one end of a socket pair as the monitor instead, forks a proxy that accepts
   libvirt's connection on fd N, and then execs the real QEMU (so the PID libvirt forked stays
   QEMU's).
3. The proxy relays the monitor both ways (file descriptors libvirt passes with SCM_RIGHTS
   included) and, driven by the real migration's own monitor traffic, injects VFIO_MIGRATION
   events that reproduce QEMU's hw/vfio/migration.c sequence for each simulated device, at QMP
   message boundaries. A P2P transition blocks QEMU's later output for its duration, as the real
   ioctl would block QEMU.

The simulated devices are the domain's vfio-pci devices on QEMU's command line, declared as a user
adds one through libvirt's QEMU passthrough (`<qemu:arg value='-device'/><qemu:arg
value='vfio-pci,id=nic0,host=0000:5e:00.0'/>` in `<qemu:commandline>`): every `-device` whose driver
is vfio-pci or vfio-pci-nohotplug, in keyval or JSON syntax. Each needs an `id=` (the QEMU id its
events carry); its own `migration-events` option beats `-global`, as in QEMU. The simulator runs
only when there is such a device and libvirt passed a monitor fd; otherwise it just execs QEMU.

The other settings come from the environment, which libvirt fills from the domain's `<qemu:env>`
entries, so they travel with the domain when it migrates:

- ORCH_SIM_OVERRIDES: per-device overrides of the settings below, comma-separated
  `id:key=value[:key=value]` entries with keys `precopy` and `p2p`; example: `nic1:precopy=off`.
  An id with no vfio-pci `-device` is an error.
- ORCH_SIM_BEHAVIOUR: `11.0` (emits pre-copy-p2p-prepare before the P2P transition, default),
  `10.0` (QEMU 9.1-10.x: no prepare state) or `11.0-event` (QEMU's first design of the feature: the
  prepare as an event of its own, VFIO_MIGRATION_PREPARE, device-state the state about to come).
- ORCH_SIM_PRECOPY, ORCH_SIM_P2P: `on` (default) or `off`: the device's migration features.
- ORCH_SIM_TRANSITION_MS: how long the transition into P2P takes (default 300).
- ORCH_SIM_FAIL_TRANSITION: a device state (e.g. `running`): the transition into P2P fails after
  its duration, the device falls back to that state, and the migration fails (the simulator
  cancels it, as QEMU's migration_file_set_error() would fail it).
- ORCH_SIM_ANSWERING: states in which the device answers its peers (default `running,pre-copy`);
  it also stops answering the moment a P2P transition begins.
- ORCH_SIM_FABRIC: a directory; the device then answers liveness probes on a datagram socket
  `<dir>/<domain>/<device-id>@<pid>.sock` (send anything, get `alive <state>` back while it answers,
  `quiet <state>` inside its P2P transition and after it, nothing otherwise): the stand-in for the
  device's RDMA peers observes that. The event proxy runs at real-time priority (lab/realtime.py).
- ORCH_SIM_QEMU: the real QEMU binary (default: qemu-system-x86_64 on PATH).

Like QEMU, a device emits events only when its `migration-events` property is on:
`-global vfio-pci.migration-events=on` (or the `driver=,property=,value=` form) in the command
line, or `migration-events=on` in that device's own `-device` options.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import selectors
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.lab.realtime import make_realtime

BEHAVIOURS = ("11.0", "10.0", "11.0-event")  # QEMU 11.0, 9.1-10.x, and 11.0's first design
STATES = (
    "stop",
    "running",
    "stop-copy",
    "resuming",
    "running-p2p",
    "pre-copy",
    "pre-copy-p2p",
    "pre-copy-p2p-prepare",
)
_ON = {"on", "true", "yes", "1"}
_OFF = {"off", "false", "no", "0"}
_MAX_FDS = 16
OVERRIDES = "ORCH_SIM_OVERRIDES"
# vfio-pci-nohotplug is a vfio-pci subtype: -global vfio-pci.* reaches it too.
VFIO_DRIVERS = frozenset({"vfio-pci", "vfio-pci-nohotplug"})
_OVERRIDE_KEYS = ("precopy", "p2p")


class ConfigError(ValueError):
    """A simulator setting is invalid."""


def _flag(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in _ON:
        return True
    if v in _OFF:
        return False
    raise ConfigError(f"{name}={value!r}: expected on or off")


@dataclass(frozen=True)
class DeviceConfig:
    """One simulated device."""

    device_id: str
    precopy: bool
    p2p: bool
    events: bool | None  # the device's own migration-events property; None = not set

    @property
    def qom_path(self) -> str:
        """Where QEMU puts a device with an id."""
        return f"/machine/peripheral/{self.device_id}"


@dataclass(frozen=True)
class SimConfig:
    """The simulator's settings for one domain."""

    devices: tuple[DeviceConfig, ...]
    prepare_state: bool = True
    # QEMU's first design (its review thread): the prepare as an event of its own, VFIO_MIGRATION_PREPARE,
    # whose device-state is the state about to be entered
    prepare_event: bool = False
    transition_s: float = 0.3
    fail_transition: str | None = None
    answering: frozenset[str] = frozenset({"running", "pre-copy"})
    fabric: Path | None = None
    global_events: bool | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], argv: Sequence[str]) -> SimConfig:
        """Read the settings from the environment and QEMU's command line."""
        precopy = _flag(env.get("ORCH_SIM_PRECOPY", "on"), "ORCH_SIM_PRECOPY")
        p2p = _flag(env.get("ORCH_SIM_P2P", "on"), "ORCH_SIM_P2P")
        overrides = _overrides(env.get(OVERRIDES, ""))
        devices: list[DeviceConfig] = []
        for options in vfio_devices(argv):
            device_id = options.get("id", "")
            if not device_id:
                raise ConfigError(f"-device {options['driver']} without id=: its events need the QEMU id")
            if any(d.device_id == device_id for d in devices):
                raise ConfigError(f"-device {options['driver']},id={device_id}: the id is used twice")
            own = options.get("migration-events")
            mine = overrides.pop(device_id, {})
            devices.append(
                DeviceConfig(
                    device_id=device_id,
                    precopy=mine.get("precopy", precopy),
                    p2p=mine.get("p2p", p2p),
                    events=None if own is None else _flag(own, f"-device id={device_id}: migration-events"),
                )
            )
        if overrides:
            raise ConfigError(
                f"{OVERRIDES} names {', '.join(sorted(overrides))}, which no vfio-pci -device declares"
            )
        behaviour = env.get("ORCH_SIM_BEHAVIOUR", "11.0")
        if behaviour not in BEHAVIOURS:
            raise ConfigError(f"ORCH_SIM_BEHAVIOUR={behaviour!r}: expected {', '.join(BEHAVIOURS)}")
        try:
            transition_ms = int(env.get("ORCH_SIM_TRANSITION_MS", "300"))
        except ValueError:
            raise ConfigError("ORCH_SIM_TRANSITION_MS: expected milliseconds") from None
        fail = env.get("ORCH_SIM_FAIL_TRANSITION") or None
        if fail is not None and fail not in STATES:
            raise ConfigError(f"ORCH_SIM_FAIL_TRANSITION={fail!r}: expected one of {', '.join(STATES)}")
        answering = frozenset(s.strip() for s in env.get("ORCH_SIM_ANSWERING", "running,pre-copy").split(","))
        fabric = env.get("ORCH_SIM_FABRIC")
        return cls(
            devices=tuple(devices),
            prepare_state=behaviour != "10.0",
            prepare_event=behaviour == "11.0-event",
            transition_s=max(transition_ms, 0) / 1000,
            fail_transition=fail,
            answering=answering,
            fabric=Path(fabric) if fabric else None,
            global_events=global_migration_events(argv),
        )

    def events_on(self, device: DeviceConfig) -> bool:
        """Whether QEMU would emit this device's events: its own property beats -global."""
        if device.events is not None:
            return device.events
        return bool(self.global_events)


def global_migration_events(argv: Sequence[str]) -> bool | None:
    """The value of `-global vfio-pci.migration-events=...` in QEMU's arguments (last wins)."""
    value: bool | None = None
    for flag, arg in itertools.pairwise(argv):
        if flag not in ("-global", "--global"):
            continue
        if arg.startswith("vfio-pci.migration-events="):
            raw = arg.split("=", 1)[1]
        else:
            parts = dict(p.partition("=")[::2] for p in arg.split(","))
            if parts.get("driver") != "vfio-pci" or parts.get("property") != "migration-events":
                continue
            raw = parts.get("value", "")
        if raw.lower() in _ON:
            value = True
        elif raw.lower() in _OFF:
            value = False
    return value


def _overrides(text: str) -> dict[str, dict[str, bool]]:
    """{device id: {setting: value}} from ``nic0:precopy=off,nic1:p2p=off``."""
    found: dict[str, dict[str, bool]] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        device_id, *options = entry.split(":")
        settings = found.setdefault(device_id, {})
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in _OVERRIDE_KEYS:
                hint = ""
                if key == "migration-events":
                    hint = " (a device's own migration-events goes in its -device options)"
                raise ConfigError(f"{OVERRIDES} entry {entry!r}: unknown option {option!r}{hint}")
            settings[key] = _flag(value, f"{OVERRIDES} entry {entry!r}: {key}")
    return found


def device_options(value: str) -> dict[str, str]:
    """A -device value's options, keyval (``,,`` is a literal comma) or JSON; the driver as "driver"."""
    if value.lstrip().startswith("{"):
        try:
            decoded = json.loads(value)
        except ValueError:
            return {}
        if not isinstance(decoded, dict):
            return {}
        return {str(k): ("on" if v else "off") if isinstance(v, bool) else str(v) for k, v in decoded.items()}
    options: dict[str, str] = {}
    # QEMU's argv holds no NUL: it stands in for an escaped comma while splitting.
    for index, item in enumerate(value.replace(",,", "\0").split(",")):
        key, sep, setting = item.replace("\0", ",").partition("=")
        if index == 0 and not sep:
            options["driver"] = key  # the implied first key
        elif sep:
            options[key] = setting
    return options


def _vfio_device_indexes(argv: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(index of the -device flag, options) of each vfio-pci -device in QEMU's arguments."""
    found = []
    index = 0
    while index < len(argv) - 1:
        if argv[index] in ("-device", "--device"):
            options = device_options(argv[index + 1])
            if options.get("driver") in VFIO_DRIVERS:
                found.append((index, options))
            index += 2
        else:
            index += 1
    return found


def vfio_devices(argv: Sequence[str]) -> list[dict[str, str]]:
    """The options of each vfio-pci (or vfio-pci-nohotplug) -device, in order."""
    return [options for _, options in _vfio_device_indexes(argv)]


def without_vfio_devices(argv: Sequence[str]) -> list[str]:
    """QEMU's arguments without the vfio-pci devices (and their -device flags)."""
    dropped = {i + offset for i, _ in _vfio_device_indexes(argv) for offset in (0, 1)}
    return [arg for i, arg in enumerate(argv) if i not in dropped]


def monitor_fd(argv: Sequence[str]) -> tuple[int, int] | None:
    """(index of the chardev argument, fd) of libvirt's monitor socket, if it passed one."""
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "-chardev" and arg.startswith("socket,") and "id=charmonitor" in arg:
            for part in arg.split(","):
                if part.startswith("fd="):
                    return i, int(part[3:])
    return None


def domain_name(argv: Sequence[str]) -> str:
    """The domain name from `-name guest=NAME,...`."""
    for flag, arg in itertools.pairwise(argv):
        if flag == "-name":
            for part in arg.split(","):
                if part.startswith("guest="):
                    return part[6:]
            return arg.split(",", 1)[0]
    return "unknown"


# --- the device model -----------------------------------------------------------------------


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


# --- the proxy ------------------------------------------------------------------------------


class Proxy:
    """Relays libvirt <-> QEMU monitor traffic and runs the simulator's steps."""

    def __init__(self, listener: socket.socket, qemu: socket.socket, sim: Simulator, domain: str) -> None:
        self.listener = listener
        self.qemu = qemu
        self.sim = sim
        self.domain = domain
        self.libvirt: socket.socket | None = None
        self.sel = selectors.DefaultSelector()
        self.from_libvirt = b""
        self.pending_fds: list[int] = []
        self.from_qemu = b""
        # Everything bound for libvirt, in order, while a scripted sequence runs (a P2P
        # transition blocks QEMU's later output for its duration, as the real ioctl would).
        self.script: deque[Step] = deque()
        self.wake_at: float | None = None
        self.blocked = False  # a wait has run since the queue was last empty
        self.swallow_ids: set[str] = set()
        self.schema_ids: set[str] = set()

    # output ------------------------------------------------------------------------------
    def send_libvirt(self, line: bytes) -> None:
        if self.libvirt is not None:
            self.libvirt.sendall(line)

    def enqueue(self, steps: Sequence[Step]) -> None:
        """Append steps and run them unless a wait is in progress."""
        self.script.extend(steps)
        if self.wake_at is None:
            self.run_script()

    def run_script(self) -> None:
        """Run steps until a wait or the end of the queue."""
        while self.script:
            step = self.script.popleft()
            if step.kind == "wait":
                self.wake_at = time.monotonic() + step.seconds
                self.blocked = True
                return
            if step.kind == "forward":
                self.send_libvirt(restamp(step.line) if self.blocked else step.line)
            elif step.kind == "emit" and step.device is not None:
                line = self.sim.event(step.device, step.state)
                if line is not None:
                    self.send_libvirt(line)
            elif step.kind == "quiet" and step.device is not None:
                step.device.quiet = True
            elif step.kind == "cancel":
                self.swallow_ids.add("vfio-sim-cancel")
                self.qemu.sendall(b'{"execute": "migrate_cancel", "id": "vfio-sim-cancel"}\r\n')
        self.wake_at = None
        self.blocked = False

    # input -------------------------------------------------------------------------------
    def on_libvirt(self) -> bool:
        assert self.libvirt is not None
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = self.libvirt.recvmsg(
                65536, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
            )
        except ConnectionResetError:
            return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        self.pending_fds.extend(fds)
        if not data:
            return False
        self.from_libvirt += data
        # Forward whole commands only, so that an injected command never splits one of libvirt's.
        while b"\n" in self.from_libvirt:
            line, self.from_libvirt = self.from_libvirt.split(b"\n", 1)
            line += b"\n"
            self.inspect_command(line)
            if self.pending_fds:
                self.qemu.sendmsg(
                    [line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.pending_fds))]
                )
                for fd in self.pending_fds:
                    os.close(fd)
                self.pending_fds = []
            else:
                self.qemu.sendall(line)
        return True

    def inspect_command(self, line: bytes) -> None:
        try:
            command = json.loads(line)
        except ValueError:
            return
        if isinstance(command, dict):
            self.sim.on_command(command)
            if (
                command.get("execute") == "query-qmp-schema"
                and self.sim.config.prepare_state
                and "id" in command
            ):
                self.schema_ids.add(json.dumps(command["id"]))

    def on_qemu(self) -> bool:
        data = self.qemu.recv(262144)
        if not data:
            return False
        self.from_qemu += data
        while b"\n" in self.from_qemu:
            line, self.from_qemu = self.from_qemu.split(b"\n", 1)
            self.from_qemu_line(line + b"\n")
        return True

    def from_qemu_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.enqueue([Step("forward", line=line)])
            return
        if "id" in message:
            if message["id"] in self.swallow_ids:  # the reply to a command we injected
                self.swallow_ids.discard(message["id"])
                return
            reply_id = json.dumps(message["id"])
            if reply_id in self.schema_ids and isinstance(message.get("return"), list):
                self.schema_ids.discard(reply_id)
                if add_prepare_state(message["return"]):
                    line = json.dumps(message).encode() + b"\r\n"
        before: list[Step] = []
        after: list[Step] = []
        if "event" in message:
            before, after = self.sim.on_event(message)
        self.enqueue([*before, Step("forward", line=line), *after])

    def on_probe(self, device: Device) -> None:
        assert device.probe is not None
        try:
            _data, addr = device.probe.recvfrom(64)
        except OSError:
            return
        if not addr:
            return
        # `quiet`: the lab's own annotation (no real device says it), so that the peers can tell the
        # device's quiet time from an outage of this machine's making (a starved process answers nothing).
        word = "alive" if self.sim.answering(device) else "quiet" if device.quiet else None
        if word is not None:
            with contextlib.suppress(OSError):
                device.probe.sendto(f"{word} {device.state}".encode(), addr)

    # loop --------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run until QEMU or libvirt closes the monitor."""
        self.open_probes()
        try:
            self.listener.setblocking(True)
            self.libvirt, _ = self.listener.accept()
            self.listener.close()
            self.sel.register(self.libvirt, selectors.EVENT_READ, "libvirt")
            self.sel.register(self.qemu, selectors.EVENT_READ, "qemu")
            while True:
                timeout = None if self.wake_at is None else max(0.0, self.wake_at - time.monotonic())
                for key, _mask in self.sel.select(timeout):
                    if key.data == "libvirt" and not self.on_libvirt():
                        return
                    if key.data == "qemu" and not self.on_qemu():
                        return
                    if isinstance(key.data, Device):
                        self.on_probe(key.data)
                if self.wake_at is not None and time.monotonic() >= self.wake_at:
                    self.wake_at = None
                    self.run_script()
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            self.close_probes()

    def open_probes(self) -> None:
        fabric = self.sim.config.fabric
        if fabric is None:
            return
        for device in self.sim.devices:
            directory = fabric / self.domain
            try:
                directory.mkdir(parents=True, exist_ok=True)
                path = directory / f"{device.config.device_id}@{os.getpid()}.sock"
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                probe.bind(str(path))
            except OSError as exc:
                log(f"liveness socket for {device.config.device_id} unavailable: {exc}")
                continue
            probe.setblocking(False)
            device.probe, device.probe_path = probe, path
            self.sel.register(probe, selectors.EVENT_READ, device)

    def close_probes(self) -> None:
        for device in self.sim.devices:
            if device.probe is not None:
                device.probe.close()
            if device.probe_path is not None:
                device.probe_path.unlink(missing_ok=True)


def log(message: str) -> None:
    """One line into the domain's QEMU log (our stderr is QEMU's)."""
    with contextlib.suppress(OSError):
        sys.stderr.write(f"vfio-sim[{os.getpid()}]: {message}\n")
        sys.stderr.flush()


def real_qemu(env: Mapping[str, str]) -> str:
    """The QEMU binary to exec."""
    binary = env.get("ORCH_SIM_QEMU") or shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    return binary


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: act as QEMU, with simulated VFIO devices when the domain declares some."""
    args = list(sys.argv[1:] if argv is None else argv)
    qemu = real_qemu(os.environ)
    if not vfio_devices(args):
        os.execv(qemu, [qemu, *args])  # noqa: S606 - capability probes and plain guests: just QEMU
    try:
        config = SimConfig.from_env(os.environ, args)
    except ConfigError as exc:
        sys.stderr.write(f"vfio-sim: invalid setting: {exc}\n")
        sys.exit(1)
    args = without_vfio_devices(args)  # no VFIO hardware here: QEMU gets none of them
    found = monitor_fd(args)
    if found is None:
        log("no monitor fd from libvirt: the vfio-pci devices are not simulated")
        os.execv(qemu, [qemu, *args])  # noqa: S606
    assert found is not None
    index, libvirt_fd = found
    qemu_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    args[index] = f"socket,id=charmonitor,fd={qemu_end.fileno()},server=off"
    domain = domain_name(args)
    # Double fork: the proxy is reparented away from QEMU, which would never reap it.
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            qemu_end.close()
            # The device is hardware in real life: it must not queue behind this machine's other work.
            refused = make_realtime()
            if refused is not None:
                log(refused)
            listener = socket.socket(fileno=libvirt_fd)
            try:
                Proxy(listener, proxy_end, Simulator(config), domain).serve()
            except Exception as exc:
                log(f"proxy failed: {exc!r}")
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    proxy_end.close()
    os.close(libvirt_fd)
    os.set_inheritable(qemu_end.fileno(), True)
    os.execv(qemu, [qemu, *args])  # noqa: S606 - become QEMU, with no shell in between


if __name__ == "__main__":
    main()
