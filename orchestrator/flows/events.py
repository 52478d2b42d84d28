"""`orchestrator events status|enable|disable`: make a domain's VFIO devices emit migration events.

Composes the pure XML reads of `domxml` and edits of `domxml_edit` with the libvirt edge: read the
definition, edit it, define it back, read it again to prove the change landed. A running VM is
never restarted: the property only takes effect when QEMU starts, at the next cold boot.
"""

from __future__ import annotations

import copy
import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.core import domxml, domxml_edit
from orchestrator.core.errors import BadInput, NothingToDo, OrchestratorError, shell_uri
from orchestrator.core.vfio import schema_support

if TYPE_CHECKING:  # annotations only: importing virt imports libvirt, which unit tests run without
    from orchestrator.edges.virt import Domain, Host

OVERRIDE_MIN_LIBVIRT = 8_002_000  # <qemu:override> exists since libvirt 8.2.0
COLD_BOOT = (
    "it takes effect at the next cold boot of {name}: shut it down and start it again "
    "(a reboot from inside the guest is not enough); the running VM was not touched"
)
NO_VFIO_HINT = (
    "only VFIO PCI or mdev hostdevs and vfio-pci devices on the QEMU command line "
    "(-device vfio-pci in <qemu:commandline>) emit migration events"
)


def enable_command(name: str, uri: str, mode: str) -> str:
    """The `orchestrator events enable` command line for a hint."""
    return f"orchestrator events enable {shlex.quote(name)} --mode {mode} -c {shell_uri(uri)}"


def no_vfio_device(name: str) -> NothingToDo:
    """Exit 6, nothing to do: the domain has no device that could emit VFIO migration events."""
    return NothingToDo(f"{name} has no VFIO device", NO_VFIO_HINT)


def _naming(exc: OrchestratorError, name: str, uri: str) -> OrchestratorError:
    """The same error (class, exit code) naming the domain, for the parts that do not know it (the
    XML edits, libvirt's refusal), with a `virsh edit` hint that works when pasted."""
    named = copy.copy(exc)
    named.message = f"{name}: {exc.message}"
    named.args = (named.message,)
    named.hint = exc.hint.replace("(virsh edit)", f"(virsh -c {shell_uri(uri)} edit {shlex.quote(name)})")
    return named


def version_text(number: int) -> str:
    """libvirt's integer version (major*1e6 + minor*1e3 + micro) as text."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def allowed_modes(libvirt_version: int) -> list[str]:
    """The injection modes this libvirt supports, the preferred first."""
    return ["override", "global"] if libvirt_version >= OVERRIDE_MIN_LIBVIRT else ["global"]


@dataclass(frozen=True)
class DeviceRow:
    """One VFIO device: where it is and whether it emits events (defined / running)."""

    alias: str | None
    kind: str
    host_address: str | None
    defined_on: bool | None  # None: the domain has no persistent definition
    running_on: bool | None  # None: the domain is not running


@dataclass
class StatusReport:
    """What `events status` shows."""

    domain: str
    uri: str
    state: str
    libvirt_version: str
    qemu_version: str
    modes: list[str]
    devices: list[DeviceRow] = field(default_factory=list)
    global_defined: bool | None = None
    global_running: bool | None = None
    qemu_knows_event: bool | None = None  # None: not running, QEMU not asked
    qemu_knows_prepare: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """One JSON document."""
        return asdict(self)


@dataclass
class ChangeReport:
    """What `events enable|disable` did."""

    domain: str
    action: str
    mode: str | None
    changed: bool
    dry_run: bool
    state: str
    diff: str
    message: str

    def to_json(self) -> dict[str, Any]:
        """One JSON document."""
        return asdict(self)


def _key(device: domxml.VfioDevice) -> tuple[str, str | None]:
    # Live XML renames aliases (hostdev0) but never the host address; command-line devices keep ids.
    return (device.kind, device.host_address if device.kind != "commandline" else device.alias)


def status(host: Host, name: str) -> StatusReport:
    """Every VFIO device of the domain, with events on in the definition and in the running VM."""
    dom = host.domain(name)
    state = dom.state()
    running = state in ("running", "paused")
    libvirt_version, qemu_version = host.versions()
    defined = domxml.events_status(host.xml(dom, inactive=True)) if host.is_persistent(dom) else None
    live = domxml.events_status(host.xml(dom)) if running else None
    report = StatusReport(
        domain=dom.name(),
        uri=host.uri,
        state=state,
        libvirt_version=version_text(libvirt_version),
        qemu_version=version_text(qemu_version),
        modes=allowed_modes(libvirt_version),
        global_defined=None if defined is None else bool(defined.global_on),
        global_running=None if live is None else bool(live.global_on),
    )
    seen: dict[tuple[str, str | None], domxml.VfioDevice] = {}
    for source in (defined, live):
        for device in (*source.devices, *source.commandline_devices) if source else ():
            seen.setdefault(_key(device), device)
    for key, device in seen.items():
        report.devices.append(
            DeviceRow(
                alias=_alias(live, key) or device.alias,
                kind=device.kind,
                host_address=device.host_address if device.kind != "commandline" else None,
                defined_on=_enabled(defined, key),
                running_on=_enabled(live, key),
            )
        )
    if running:
        schema = host.monitor_command(dom, {"execute": "query-qmp-schema"})
        report.qemu_knows_event, report.qemu_knows_prepare = schema_support(schema)
    return report


def _find(status: domxml.EventsStatus | None, key: tuple[str, str | None]) -> domxml.VfioDevice | None:
    if status is None:
        return None
    return next((d for d in (*status.devices, *status.commandline_devices) if _key(d) == key), None)


def _alias(status: domxml.EventsStatus | None, key: tuple[str, str | None]) -> str | None:
    device = _find(status, key)
    return device.alias if device else None


def _enabled(status: domxml.EventsStatus | None, key: tuple[str, str | None]) -> bool | None:
    device = _find(status, key)
    if status is None or device is None:
        return None
    return status.device_enabled(device)


def _definition(host: Host, dom: Domain) -> str:
    if not host.is_persistent(dom):
        raise BadInput(
            f"domain {dom.name()!r} is transient: it has no persistent definition to edit",
            f"make it persistent first: virsh -c {shell_uri(host.uri)} dumpxml {shlex.quote(dom.name())} "
            f"> vm.xml, then virsh -c {shell_uri(host.uri)} define vm.xml",
        )
    return host.xml(dom, inactive=True, secure=True)


def change(host: Host, name: str, *, enable: bool, mode: str | None, dry_run: bool) -> ChangeReport:
    """Enable or disable the events in the persistent definition (or show the diff with dry_run)."""
    dom = host.domain(name)
    state = dom.state()
    before = _definition(host, dom)
    libvirt_version, _ = host.versions()
    try:
        if enable:
            modes = allowed_modes(libvirt_version)
            # <qemu:override> cannot reach command-line devices: global is the only default that works.
            chosen = mode or ("global" if domxml.events_status(before).commandline_devices else modes[0])
            if chosen not in modes:
                raise BadInput(
                    f"--mode {chosen} needs libvirt >= 8.2.0, {host.uri} runs libvirt "
                    f"{version_text(libvirt_version)}",
                    f"use: {enable_command(dom.name(), host.uri, 'global')}",
                )
            after, changed = domxml_edit.enable_events(
                before, "override" if chosen == "override" else "global"
            )
        else:
            chosen = None
            after, changed = domxml_edit.disable_events(before)
    except NothingToDo:
        raise no_vfio_device(dom.name()) from None
    except OrchestratorError as exc:
        raise _naming(exc, dom.name(), host.uri) from None
    diff = domxml_edit.unified_diff(before, after, f"{dom.name()}.xml")
    running = state in ("running", "paused")
    if not changed:
        verb = "on" if enable else "off"
        message = f"migration events are already {verb} in the definition of {dom.name()}: nothing changed"
    elif dry_run:
        message = f"dry run: the definition of {dom.name()} was not changed"
    else:
        try:
            host.define(after)
        except OrchestratorError as exc:
            raise _naming(exc, dom.name(), host.uri) from None
        _verify(host, dom.name(), enable)
        done = "enabled" if enable else "disabled"
        message = f"migration events {done} in the definition of {dom.name()}" + (
            "; " + COLD_BOOT.format(name=dom.name()) if running else "; they apply when it starts"
        )
    return ChangeReport(
        dom.name(), "enable" if enable else "disable", chosen, changed, dry_run, state, diff, message
    )


def _verify(host: Host, name: str, enable: bool) -> None:
    """Read the definition back from libvirt: the change must have survived its normalisation."""
    result = domxml.events_status(host.xml(host.domain(name), inactive=True))
    everything = [*result.devices, *result.commandline_devices]
    if enable and not result.all_enabled:
        raise OrchestratorError(
            f"libvirt accepted the new definition of {name} but dropped the events property",
            "check the libvirt version (qemu:override needs >= 8.2.0) or try: "
            + enable_command(name, host.uri, "global"),
        )
    if not enable and any(result.device_enabled(d) for d in everything):
        raise OrchestratorError(
            f"the events property is still on in the definition of {name}",
            "remove the remaining qemu:commandline or qemu:override entries by hand "
            f"(virsh -c {shell_uri(host.uri)} edit {shlex.quote(name)})",
        )
