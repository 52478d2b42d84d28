"""The simulated VFIO device's settings (orchestrator.lab.simulator): read from the domain's environment
(the ORCH_SIM_* variables) and QEMU's command line (its vfio-pci devices, `-global`, libvirt's monitor
fd, the domain's name). Pure: no I/O.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
